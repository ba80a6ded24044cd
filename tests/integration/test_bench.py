"""A short real bench run (--quick): seeding, both load paths, ceilings, CPU, checks."""

import shutil
from urllib.parse import urlsplit, urlunsplit

import pytest

from bench import runner
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
    scenarios = "bare,health,transfer,deposit,card_payment,investment_buy,history_deep"
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
    assert report["verify"] == []
    names = [c[0] for c in report["checks"]]
    assert "[granian x1] transfer / full-request ceiling" in names or not shutil.which("pgbench")
    assert "[granian x1] health / bare WSGI app" in names
    # the deposit target is reported, marked as item 2's until the hot row is gone
    (deposit,) = [c for c in report["checks"] if c[0] == "[granian x1] deposit / transfer"]
    assert "item 2" in deposit[4]
    text = runner.format_report({**report, "path": "x.json"})
    assert "granian, 1 worker(s) x 4 threads" in text and "PASS  db.verify problems: 0" in text


@pytest.mark.slow
def test_the_python_load_generator_still_works_and_the_report_says_so(bench_url):
    report = runner.run(quick=True, server="waitress", threads=4, clients=2,
                        scenario="health", loadgen="python", url=bench_url, keep=True)
    (row,) = report["runs"][0]["scenarios"]
    assert row["requests"] > 0 and row["errors"] == 0
    assert "the Python load generator ran on the same cores" in runner.format_report(
        {**report, "path": "x.json"})
