"""A short real bench run (--quick): seeding, both load paths, ceilings, CPU, checks."""

import hashlib
import shutil
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from bench import ceiling, runner
from hoardrun import db as dbm
from tests.conftest import pg_url


@pytest.fixture
def bench_url():
    parts = urlsplit(pg_url())
    url = urlunsplit((parts.scheme, parts.netloc, parts.path + "_bench", parts.query, ""))
    yield url
    dbm.close_db()
    runner.drop_database(url)


@pytest.mark.slow
def test_a_quick_bench_measures_every_part_and_reads_its_own_report(bench_url):
    scenarios = "bare,health,transfer,batch,deposit,card_payment,investment_buy,history_deep"
    report = runner.run(quick=True, server="granian", workers=1, threads=4, clients=4,
                        scenario=scenarios, url=bench_url, keep=True)
    (run,) = report["runs"]
    rows = {r["scenario"]: r for r in run["scenarios"]}
    assert list(rows) == scenarios.split(",")
    for row in rows.values():
        assert row["requests"] > 0 and row["rps"] > 0, row
        assert row["errors"] == 0, row["error_samples"]
        assert row["app_cpu_us"] > 0, row  # the server's processes were found and read
    # PostgreSQL's backends of the bench database did the money work
    assert rows["transfer"]["pg_cpu_us"] > 0 and rows["bare"]["pg_cpu_us"] is None
    assert report["loadgen"] == ("wrk" if shutil.which("wrk") else "python")
    ceilings = report["ceilings"]
    assert ceilings["ledger"]["rps"] > 0 and ceilings["ledger"]["errors"] == 0
    if shutil.which("pgbench"):
        full = ceilings["full"]
        assert full["rps"] > 0 and full["errors"] == 0 and full["round_trips"] == 3
        assert "hoardrun_transfer" in report["captured"][1]
    assert report["verify"] == []  # 4 clients x 100-leg batches left the books consistent
    # batches: 100 legs each, legs/s derived from the batches that completed
    batch = rows["batch"]
    assert batch["legs"] == 100 and batch["legs_per_s"] == pytest.approx(100 * batch["rps"], 0.01)
    # the chain's cost: both variants ran every round, error-free, and the copy is gone
    chain = report["chain_cost"]
    assert chain["rounds"] == 3 and chain["round_seconds"] == 1
    for variant in ("chain", "neutralised"):
        assert len(chain[variant]["rounds_rps"]) == 3 and min(chain[variant]["rounds_rps"]) > 0
        assert chain[variant]["errors"] == 0 and chain[variant]["pg_cpu_us"] > 0
    assert chain["slowdown_pct"] == round(
        100 * (1 - chain["chain"]["rps"] / chain["neutralised"]["rps"]), 1)
    assert chain["pg_cpu_extra_pct"] == round(
        100 * (chain["chain"]["pg_cpu_us"] / chain["neutralised"]["pg_cpu_us"] - 1), 1)
    assert not _databases_like(bench_url, urlsplit(bench_url).path.lstrip("/") + "_nochain")
    # quick mode's scaling step: history pages and balances as of T at 1k and 4k entries
    scaled = {r["scenario"]: r for r in report["scaling"]}
    assert sorted(scaled) == sorted(f"{kind}@{n}" for n in (1000, 4000) for kind in (
        "history_first", "history_deep", "balance_as_of"))
    for row in scaled.values():
        assert row["requests"] > 10 and row["errors"] == 0, row
        assert 0 < row["p50_ms"] <= row["p99_ms"], row
    names = [c[0] for c in report["checks"]]
    assert "[granian x1] transfer / full-request ceiling" in names or not shutil.which("pgbench")
    assert "[granian x1] health / bare WSGI app" in names
    for name in ("[granian x1] batch legs/s / transfer/s", "balance as of p99 ms at 4k entries",
                 "balance as of p99 spread 1k..4k", "history first page spread 1k..4k",
                 "history deep page spread 1k..4k",
                 "ledger call: % slower with the chain than with its hash neutralised"):
        assert name in names
    # the deposit target is reported, marked as item 2's until the hot row is gone
    (deposit,) = [c for c in report["checks"] if c[0] == "[granian x1] deposit / transfer"]
    assert "item 2" in deposit[4]
    text = runner.format_report({**report, "path": "x.json"})
    assert "granian, 1 worker(s) x 4 threads" in text and "PASS  db.verify problems: 0" in text
    assert "legs/s (100 legs x" in text and "balance_as_of@4000" in text
    assert "ledger call, chain hash neutralised" in text
    _the_copy_writes_a_constant_hash_where_the_bench_database_writes_the_chain(bench_url)


def _the_copy_writes_a_constant_hash_where_the_bench_database_writes_the_chain(bench_url):
    copy = ceiling.copy_of(bench_url)
    try:
        hash_body = ceiling.ChainHash(copy)
        newest = {}
        for variant in ("neutralised", "chain"):  # and back: the swap goes both ways
            hash_body.use(variant)
            conn = psycopg2.connect(copy)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(ceiling.TRANSFER_SQL.format(n=1))  # the writer, every rule
                cur.execute("SELECT e.seq, e.chain_hash, hoardrun_entry_hash(prev.chain_hash, e) "
                            "FROM transactions e JOIN bench_pairs p ON e.account_id = p.a1 "
                            "JOIN transactions prev ON prev.account_id = e.account_id "
                            "AND prev.seq = e.seq - 1 WHERE p.n = 1 ORDER BY e.seq DESC LIMIT 1")
                seq, stored, recomputed = cur.fetchone()
                newest[variant] = (seq, bytes(stored), bytes(recomputed))
            conn.close()
        constant = hashlib.sha256(b"").digest()
        # one entry after the other on the same account, each hashed by its variant
        assert newest["chain"][0] == newest["neutralised"][0] + 1
        assert newest["neutralised"][1] == newest["neutralised"][2] == constant
        assert newest["chain"][1] == newest["chain"][2] != constant
    finally:
        ceiling.drop_copy(copy)
    assert not _databases_like(bench_url, urlsplit(bench_url).path.lstrip("/") + "_nochain")


def _databases_like(url, pattern):
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))
        names = [r[0] for r in cur.fetchall()]
    conn.close()
    return names


@pytest.mark.slow
def test_the_python_load_generator_still_works_and_the_report_says_so(bench_url):
    report = runner.run(quick=True, server="waitress", threads=4, clients=2,
                        scenario="health", loadgen="python", url=bench_url, keep=True,
                        scaling_sizes=())  # the first test runs the scaling step
    assert "scaling" not in report
    (row,) = report["runs"][0]["scenarios"]
    assert row["requests"] > 0 and row["errors"] == 0
    assert "the Python load generator ran on the same cores" in runner.format_report(
        {**report, "path": "x.json"})
