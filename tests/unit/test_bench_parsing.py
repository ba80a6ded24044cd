"""The bench's own arithmetic: wrk's output, the replayed SQL, CPU accounting."""

import json
import subprocess
import sys

import psutil
import pytest

from bench import cpu, replay, runner, wrk

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
