"""Do cash movements queue on the settlement side? Deposits against transfers, same run.

A standalone driver (not part of ``invoke bench``): pgbench replays, at each
client count, two scripts that differ only in the ledger call. Each is one
transaction shaped like the API's (the ledger call, an audit row, COMMIT),
so a lock taken by the ledger call is held until the commit has flushed,
as it is behind HTTP:

- transfer: ``hoardrun_transfer`` between a random pair's two accounts (no
  row shared between clients: the control);
- deposit: ``hoardrun_cash`` into a random pair's first account, posted
  against the currency's settlement side.

Usage (against a database migrated with ``invoke db.migrate``; seeded on
first use with ``--pairs`` users of two funded USD accounts each)::

    python -m bench.settlement_contention --url postgresql://postgres@127.0.0.1/hr_x \\
        [--clients 8,32] [--seconds 15] [--pairs 400]

Prints transactions/s, p50 and p99 latency per scenario, the deposit/transfer
ratio per client count, and how the deposits spread over settlement accounts.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

import psycopg2

SCRIPTS = {
    "transfer": (
        "SELECT hoardrun_transfer(gen_random_uuid(), p.user_id, p.a1, p.a2, 1, 'USD', "
        "'TRF-' || replace(gen_random_uuid()::text, '-', ''), 'contention') "
        "FROM bench_pairs p WHERE p.n = :n;"),
    "deposit": (
        "SELECT hoardrun_cash(gen_random_uuid(), p.user_id, p.a1, 1, 'USD', true, "
        "'contention') FROM bench_pairs p WHERE p.n = :n;"),
}

AUDIT = ("INSERT INTO audit_log (id, actor_id, action, entity_type, entity_id, after) "
         "VALUES (gen_random_uuid(), NULL, 'bench.{name}', 'bench', :n, '{{}}');")


def _script(name, pairs):
    return "\n".join([f"\\set n random(1, {pairs})", "BEGIN;", SCRIPTS[name],
                      AUDIT.format(name=name), "COMMIT;", ""])


def _ensure_seeded(url, pairs):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('bench_pairs') IS NOT NULL")
        seeded = cur.fetchone()[0]
    conn.close()
    if not seeded:
        from bench.seed import seed

        seed(url, users=pairs, accounts=2 * pairs, entries=0)


def _pgbench(url, script, clients, seconds):
    parts = urlsplit(url)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "script.sql")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        cmd = ["pgbench", "-n", "-M", "simple", "-c", str(clients),
               "-j", str(min(clients, 2)), "-T", str(seconds), "-f", path, "-l",
               "--log-prefix", os.path.join(tmp, "lat"),
               "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432),
               "-U", parts.username or "postgres", parts.path.lstrip("/")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env=dict(os.environ, PGPASSWORD=parts.password or ""))
        if done.returncode != 0:
            raise SystemExit("pgbench failed: " + (done.stderr or done.stdout)[-800:])
        latencies, failed = [], 0
        for log in glob.glob(os.path.join(tmp, "lat*")):
            with open(log, encoding="utf-8") as f:
                for line in f:
                    fields = line.split()
                    if fields[2] in ("failed", "skipped"):
                        failed += 1
                    else:
                        latencies.append(int(fields[2]) / 1000.0)
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    return {"tps": len(latencies) / seconds, "p50": pct(0.50), "p99": pct(0.99),
            "max": latencies[-1] if latencies else 0.0, "errors": failed}


def _spread(url):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT a.account_number, count(t.id) FROM accounts a "
                    "LEFT JOIN transactions t ON t.account_id = a.id "
                    "WHERE a.type = 'settlement' AND a.currency = 'USD' "
                    "GROUP BY a.account_number ORDER BY a.account_number")
        rows = cur.fetchall()
    conn.close()
    return rows


def main(argv=None):
    """Run the comparison and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args(argv)
    _ensure_seeded(args.url, args.pairs)
    print(f"{'clients':>7} {'scenario':>9} {'tx/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'errors':>6}")
    for clients in [int(c) for c in args.clients.split(",")]:
        results = {}
        for name in ("transfer", "deposit"):
            r = results[name] = _pgbench(args.url, _script(name, args.pairs), clients,
                                         args.seconds)
            print(f"{clients:>7} {name:>9} {r['tps']:>8.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
                  f"{r['max']:>8.1f} {r['errors']:>6}", flush=True)
        ratio = results["deposit"]["tps"] / max(results["transfer"]["tps"], 1e-9)
        print(f"{clients:>7} {'ratio':>9} {ratio:>8.2f}  (deposits / transfers)", flush=True)
    rows = _spread(args.url)
    print(f"USD settlement accounts: {len(rows)}; entries per account: "
          + ", ".join(f"{number}={n}" for number, n in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
