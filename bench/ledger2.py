"""Standalone measurements for issue 13 (Ledger II), to be wired into ``invoke bench``.

    DATABASE_URL=postgresql://…/scratch python -m bench.ledger2 [--seconds 10] [--clients 8]
        [--entries 10000,1000000] [--skip-throughput] [--skip-as-of]

The database is migrated first and gets bench users and accounts: use a
scratch database. Prints one JSON report:

* ``throughput``: keyed single transfers/s against legs/s in batches of 100
  (each batch one ``POST /payments/batch``), both over HTTP on an in-process
  waitress server with the same client threads, in the same run; target
  ``batch_legs_per_s >= 5 * transfers_per_s``.
* ``as_of``: ``GET /accounts/{id}/balance?as_of=`` latency at random instants
  of a history of N entries in one account (in-process test client, so the
  app's own work is included; the database query alone is reported too);
  target p99 < 5 ms at 1M entries, within 1.5x between the smallest and
  largest N.
"""

import argparse
import http.client
import json
import os
import random
import statistics
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

from bench.seed import seed_scaling_account
from hoardrun import auth, history, schema
from hoardrun.config import load_settings
from hoardrun.db import init_db


def _percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _summary(samples_ms):
    return {"n": len(samples_ms), "p50_ms": round(_percentile(samples_ms, 50), 3),
            "p99_ms": round(_percentile(samples_ms, 99), 3),
            "mean_ms": round(statistics.fmean(samples_ms), 3)}


def _people(database, count):
    """``count`` verified users, each with two funded USD accounts and a long token."""
    from hoardrun import accounts, ledger
    from hoardrun.models import User

    out = []
    for i in range(count):
        now = datetime.now(timezone.utc)
        user = User.create(email=f"l2bench-{uuid.uuid4().hex[:10]}@bench.hoardrun.test",
                           first_name="Bench", last_name=str(i), password_hash="x",
                           status="active", email_verified=True, created_at=now,
                           updated_at=now)
        pair = [accounts.open_account(user.id, "checking", "USD", f"A{n}").id for n in (0, 1)]
        for account in pair:
            ledger.deposit(account, 10**12)
        token, _ = auth.issue_token(user.id, ttl=86400)
        out.append((token, [str(a) for a in pair]))
    return out


def _drive(server, people, seconds, make_body, path):
    """Client threads POSTing ``make_body(n, i)`` for ``seconds``; (requests, errors)."""
    done, errors, stop = [0] * len(people), [0] * len(people), time.monotonic() + seconds

    def run(n):
        token, _ = people[n]
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        i = 0
        while time.monotonic() < stop:
            conn.request("POST", path, body=json.dumps(make_body(n, i)), headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json",
                "Idempotency-Key": f"b{n}-{i}-{uuid.uuid4().hex}"})
            response = conn.getresponse()
            response.read()
            if response.status == 201:
                done[n] += 1
            else:
                errors[n] += 1
            i += 1
        conn.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(people))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done), sum(errors), time.monotonic() - started


class _Server:
    """The app under waitress on a free loopback port, in a background thread."""

    def __init__(self, app, settings, threads):
        from hoardrun.api import serve

        self._serve = serve
        self.server = serve.create_server(app, settings, host="127.0.0.1", port=0,
                                          threads=threads)
        self.host, self.port = "127.0.0.1", self.server.effective_port
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._serve.stop(self.server, self.thread)


def throughput(settings, database, *, clients, seconds):
    from hoardrun.api import create_app

    people = _people(database, clients)
    app = create_app(settings)

    def transfer(n, i):
        a, b = people[n][1]
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        return {"from_account_id": src, "to_account_id": dst, "amount": "1.00"}

    def batch(n, i):
        a, b = people[n][1]
        return {"legs": [{"from_account_id": a if k % 2 == 0 else b,
                          "to_account_id": b if k % 2 == 0 else a, "amount": "1.00"}
                         for k in range(100)]}

    with _Server(app, settings, threads=max(8, clients)) as server:
        t_done, t_err, t_time = _drive(server, people, seconds, transfer, "/api/v1/transfers")
        b_done, b_err, b_time = _drive(server, people, seconds, batch, "/api/v1/payments/batch")
    transfers_per_s = t_done / t_time
    legs_per_s = 100 * b_done / b_time
    return {"clients": clients, "seconds": seconds,
            "transfers_per_s": round(transfers_per_s, 1), "transfer_errors": t_err,
            "batches_per_s": round(b_done / b_time, 1), "batch_errors": b_err,
            "batch_legs_per_s": round(legs_per_s, 1),
            "ratio": round(legs_per_s / transfers_per_s, 2) if transfers_per_s else None,
            "target_met": bool(transfers_per_s) and legs_per_s >= 5 * transfers_per_s}


def as_of(settings, database, url, sizes, samples=2000):
    from falcon import testing

    from hoardrun.api import create_app

    client = testing.TestClient(create_app(settings))
    report = {}
    for size in sizes:
        user_id, account_id = seed_scaling_account(url, size)
        token, _ = auth.issue_token(uuid.UUID(user_id), ttl=86400)
        now = datetime.now(timezone.utc)
        instants = [now - timedelta(seconds=random.uniform(0, size + 10))
                    for _ in range(samples)]
        db_ms, http_ms = [], []
        for moment in instants:
            t0 = time.perf_counter()
            history.balance_at(user_id, account_id, moment, now=now)
            db_ms.append((time.perf_counter() - t0) * 1000)
        headers = {"Authorization": f"Bearer {token}"}
        for moment in instants:
            t0 = time.perf_counter()
            result = client.simulate_get(f"/api/v1/accounts/{account_id}/balance",
                                         headers=headers,
                                         params={"as_of": moment.isoformat()})
            http_ms.append((time.perf_counter() - t0) * 1000)
            assert result.status_code == 200, result.text
        report[str(size)] = {"domain_call": _summary(db_ms), "http": _summary(http_ms)}
    smallest, largest = report[str(min(sizes))], report[str(max(sizes))]
    report["target_met"] = (largest["http"]["p99_ms"] < 5
                            and largest["http"]["p99_ms"] <= 1.5 * max(
                                smallest["http"]["p99_ms"], 1.0))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--entries", default="10000,1000000")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-as-of", action="store_true")
    args = parser.parse_args(argv)
    url = os.environ["DATABASE_URL"]
    settings = load_settings({**os.environ, "HOARDRUN_ENV": "production"}
                             if os.environ.get("HOARDRUN_ENV") == "production" else os.environ)
    database = init_db(settings)
    schema.migrate(database)
    report = {}
    if not args.skip_throughput:
        report["throughput"] = throughput(settings, database, clients=args.clients,
                                          seconds=args.seconds)
    if not args.skip_as_of:
        report["as_of"] = as_of(settings, database, url,
                                [int(n) for n in args.entries.split(",")])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
