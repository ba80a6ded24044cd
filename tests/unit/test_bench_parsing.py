"""The bench's own arithmetic: wrk's output, the replayed SQL, CPU accounting."""

import json
import subprocess
import sys

import psutil
import pytest

from bench import ceiling, cpu, replay, runner, wrk

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8123
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.90ms    2.10ms  40.00ms   90.00%
  11500 requests in 10.00s, 5.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   1150.00
HRWRK {"requests":11500,"duration_us":10000000,"bytes":5242880,"connect":0,"read":1,"write":0,"status":3,"timeout":0,"p50_us":6500,"p95_us":9800,"p99_us":14250,"max_us":40000,"mean_us":6900.5}
"""


def test_wrk_results_are_read_from_the_scripts_done_line():
    raw = wrk.parse(WRK_OUTPUT)
    assert raw["requests"] == 11500 and raw["elapsed"] == 10.0
    assert raw["errors"] == 4  # three bad statuses and one read error
    assert (raw["p50_ms"], raw["p99_ms"], raw["max_ms"]) == (6.5, 14.25, 40.0)
    assert raw["error_kinds"] == {"read": 1, "status": 3}


def test_wrk_output_without_the_done_line_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="no HRWRK line"):
        wrk.parse("Running 10s test\nRequests/sec: 1150.00\n")


def test_the_lua_script_carries_bodies_verbatim_and_keys_only_where_asked():
    text = wrk.script([{"method": "POST", "path": "/api/v1/transfers",
                        "headers": {"Authorization": "Bearer t"}, "unique_key": True,
                        "body": {"note": "it's \"quoted\" \\ [[x]]"}},
                       {"method": "GET", "path": "/api/health/"}], nonce="n1")
    assert '[====[{"note": "it\'s \\"quoted\\" \\\\ [[x]]"}]====]' in text
    assert "[ [====[key]====] ] = true" in text and "[ [====[key]====] ] = false" in text
    assert "[[[" not in text  # "[[" would open a Lua long string


def test_statements_split_at_top_level_semicolons_only():
    sql = "BEGIN; INSERT INTO t VALUES ('a;b', 'it''s;', $$x;y$$) -- c;d\n; COMMIT"
    assert replay.split_top_level(sql) == [
        "BEGIN", "INSERT INTO t VALUES ('a;b', 'it''s;', $$x;y$$) -- c;d", "COMMIT"]


def test_every_form_of_a_generated_id_becomes_the_same_fresh_variables():
    person = ("11111111-1111-4111-8111-111111111111", "u@x",
              {"checking": "22222222-2222-4222-8222-222222222222",
               "savings": "33333333-3333-4333-8333-333333333333"})
    moved = "abcdef12-3456-4789-8abc-def123456789"
    captured = {"person": person, "token_hash": "f" * 64, "prepare": [], "round_trips": [
        f"BEGIN; SELECT hoardrun_transfer('{moved.replace('-', '')}', "
        f"'{person[0].replace('-', '')}', 'TRF-{moved.replace('-', '').upper()}')",
        f"INSERT INTO audit_log VALUES ('{{\"id\": \"{moved}\"}}'); COMMIT"]}
    text, count = replay.template(captured)
    assert count == 1
    assert "'11111111111141118111111111111111'" in text  # the user's own id stays
    assert "':hra1:hrb1:hrc1:hrd1:hre1'" in text and "'TRF-:hra1:hrb1:hrc1:hrd1:hre1'" in text
    assert '"id": ":hra1-:hrb1-:hrc1-:hrd1-:hre1"' in text
    assert text.splitlines()[0].startswith("BEGIN \\; SELECT")  # still one round trip


def test_cpu_meter_counts_only_what_the_processes_used_while_it_ran():
    burn = subprocess.Popen([sys.executable, "-c",
                             "import time\nend = time.process_time() + 0.6\n"
                             "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        proc = psutil.Process(burn.pid)
        meter = cpu.CpuMeter({"burn": lambda: [proc], "none": lambda: []}, interval=0.05)
        meter.start()
        while cpu.cpu_seconds(proc) < 0.6:
            pass
        used = meter.stop()
        assert 0.3 < used["burn"] <= 0.7 + 0.1
        assert used["none"] == 0.0
        # once the work is done, a new window sees (almost) nothing
        idle = cpu.CpuMeter({"burn": lambda: [proc]}, interval=0.05).start()
        assert idle.stop()["burn"] < 0.05
    finally:
        burn.kill()
        burn.wait()
    assert cpu.per_request_us(0.5, 1000) == 500.0
    assert cpu.per_request_us(None, 1000) is None and cpu.per_request_us(1.0, 0) is None


def test_a_batch_request_is_a_full_batch_between_two_own_accounts_that_nets_to_zero():
    people = [(f"u{i}", f"u{i}@x", {"checking": f"c{i}", "savings": f"s{i}"}) for i in range(3)]
    tokens = {p[0]: f"t-{p[0]}" for p in people}
    requests = runner.build_requests("batch", people, tokens, url=None, count=20)
    assert len(requests) == 20
    for spec in requests:
        assert spec["method"] == "POST" and spec["path"] == "/api/v1/payments/batch"
        assert spec["unique_key"] is True  # one Idempotency-Key per batch, fresh each time
        legs = spec["body"]["legs"]
        assert len(legs) == runner.BATCH_LEGS == 100
        user = spec["headers"]["Authorization"].removeprefix("Bearer t-")
        own = {f"c{user[1:]}", f"s{user[1:]}"}
        net = {}
        for leg in legs:
            assert {leg["from_account_id"], leg["to_account_id"]} == own
            net[leg["from_account_id"]] = net.get(leg["from_account_id"], 0) - 1
            net[leg["to_account_id"]] = net.get(leg["to_account_id"], 0) + 1
        assert set(net.values()) == {0}
    # a ~16 KB body still reaches wrk whole: one long-bracket string literal
    body = json.dumps(requests[0]["body"])
    assert len(body) > 8000 and f"[====[{body}]====]" in wrk.script(requests[:1])


def test_the_neutralised_chain_hash_keeps_the_signature_and_drops_the_hashing():
    installed = ("CREATE OR REPLACE FUNCTION public.hoardrun_entry_hash(p_prev bytea, p_id uuid)\n"
                 " RETURNS bytea\n LANGUAGE sql\n STABLE PARALLEL SAFE\nAS $function$\n"
                 "    SELECT sha256(coalesce(p_prev, '\\x'::bytea) || convert_to(concat_ws(',',"
                 " 'hr1', quote_nullable(p_id)), 'UTF8'))\n$function$\n")
    ddl = ceiling.with_constant_body(installed)
    assert ddl.startswith(installed[:installed.index("$function$")])  # signature and all
    assert "concat_ws" not in ddl and "p_prev" not in ddl.split("AS $function$")[1]
    assert ddl.endswith("AS $function$\n    SELECT sha256('\\x'::bytea)\n$function$\n")
    # another dollar tag, and one in the body that is not the closing one
    assert ceiling.with_constant_body("AS $b$ SELECT '$x$' $b$").endswith(
        f"AS $b$\n    {ceiling.CONSTANT_HASH}\n$b$")
    with pytest.raises(ValueError, match="no dollar-quoted body"):
        ceiling.with_constant_body("CREATE FUNCTION f() RETURNS int AS 'SELECT 1'")


def _report(transfer_rps, batch_rps, as_of_p99s, slowdown_pct):
    row = {"requests": 100, "p50_ms": 1.0, "p95_ms": 2.0, "errors": 0, "error_samples": [],
           "clients": 8, "app_cpu_us": 100.0, "pg_cpu_us": 100.0}
    scaling = []
    for size, p99 in as_of_p99s.items():
        scaling += [{**row, "scenario": f"history_{page}@{size}", "entries": size,
                     "kind": "history", "page": page, "rps": 300.0, "p99_ms": 3.0}
                    for page in ("first", "deep")]
        scaling.append({**row, "scenario": f"balance_as_of@{size}", "entries": size,
                        "kind": "balance_as_of", "rps": 500.0, "p99_ms": p99})
    chain = {"rounds": 3, "round_seconds": 5, "slowdown_pct": slowdown_pct, "pg_cpu_extra_pct": 7.6,
             "chain": {**row, "scenario": "ledger call, with the chain", "rps": 900.0,
                       "p99_ms": 9.0, "rounds_rps": [900.0] * 3},
             "neutralised": {**row, "scenario": ceiling.NEUTRALISED_LABEL, "rps": 950.0,
                             "p99_ms": 9.0, "rounds_rps": [950.0] * 3}}
    return {"loadgen": "wrk", "clients": 8, "verify": [], "path": "x.json",
            "runs": [{"server": "granian", "workers": 2, "threads": 16,
                      "peak_rss_mib_per_worker": 70.0, "scenarios": [
                          {**row, "scenario": "transfer", "rps": transfer_rps, "p99_ms": 9.0},
                          {**row, "scenario": "batch", "rps": batch_rps, "p99_ms": 200.0,
                           "legs": 100, "legs_per_s": 100 * batch_rps}]}],
            "scaling": scaling, "chain_cost": chain}


def _verdicts(report):
    return {name: (measured, passed) for name, measured, _, passed, _ in runner.checks(report)}


def test_the_new_targets_pass_and_fail_where_they_should():
    good = _verdicts(_report(400.0, 21.0, {10_000: 2.0, 1_000_000: 2.9}, 9.5))
    assert good["[granian x2] batch legs/s / transfer/s"] == (5.25, True)
    assert good["balance as of p99 ms at 1M entries"] == (2.9, True)
    assert good["balance as of p99 spread 10k..1M"] == (1.45, True)
    assert good["ledger call: % slower with the chain than with its hash neutralised"] == (
        9.5, True)
    assert good["history first page spread 10k..1M"] == (1.0, True)
    bad = _verdicts(_report(400.0, 19.0, {10_000: 2.0, 1_000_000: 5.0}, 10.5))
    assert bad["[granian x2] batch legs/s / transfer/s"] == (4.75, False)
    assert bad["balance as of p99 ms at 1M entries"] == (5.0, False)  # strictly below 5
    assert bad["balance as of p99 spread 10k..1M"] == (2.5, False)
    assert bad["ledger call: % slower with the chain than with its hash neutralised"][1] is False
    # one size: no spread to compare, so no spread check that could only pass
    single = _verdicts(_report(400.0, 21.0, {4_000: 2.0}, 0.0))
    assert "balance as of p99 ms at 4k entries" in single
    assert not [name for name in single if "spread" in name]


def test_the_report_prints_each_new_part():
    text = runner.format_report({**_report(400.0, 21.0, {10_000: 2.0, 1_000_000: 3.0}, 5.3),
                                 "checks": []})
    assert "batch: 2100.0 legs/s (100 legs x 21.0 batches/s) = 5.25 x transfer/s" in text
    assert "ledger call, chain hash neutralised" in text and "5.3 % slower" in text
    assert "PostgreSQL CPU per call +7.6 %" in text
    assert "balance_as_of@1000000" in text and "p50 1.00 x, p99 1.50 x" in text
    assert runner.count_label(100_000) == "100k" and runner.count_label(1_500) == "1500"
