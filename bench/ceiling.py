"""The database ceiling: the ledger's own transfer SQL, with no app in the way.

The statement is exactly what the API's transfer path sends for the money
movement (``hoardrun_transfer``: lock both accounts in id order, check,
update both balances, insert the transfer row and its two entries), driven
by pgbench when it is installed (simple protocol, as psycopg2 speaks), else
by psycopg2 threads, with the same number of clients as the API run.
"""

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from urllib.parse import parse_qsl, urlsplit

import psycopg2

TRANSFER_SQL = ("SELECT hoardrun_transfer(gen_random_uuid(), p.user_id, p.a1, p.a2, 1, 'USD', "
                "'TRF-' || replace(gen_random_uuid()::text, '-', ''), 'ceiling') "
                "FROM bench_pairs p WHERE p.n = {n}")


def measure(url, *, clients, seconds, pairs):
    """Transfers per second and latencies (ms) at ``clients`` concurrent sessions."""
    if shutil.which("pgbench"):
        return _pgbench(url, clients, seconds, pairs)
    return _threads(url, clients, seconds, pairs)


def connection_args(url):
    """``-h/-p/-U`` for a libpq client: the URL's query (``?host=/socket``) wins."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return ["-h", query.get("host") or parts.hostname or "127.0.0.1",
            "-p", str(query.get("port") or parts.port or 5432),
            "-U", query.get("user") or parts.username or "postgres"]


def _pgbench(url, clients, seconds, pairs):
    script = f"\\set n random(1, {pairs})\n" + TRANSFER_SQL.format(n=":n") + ";\n"
    return run_pgbench(url, clients, seconds, [script])


def run_pgbench(url, clients, seconds, scripts, defines=None):
    """Drive ``scripts`` (pgbench script texts, chosen at random per transaction).

    Simple protocol, as psycopg2 speaks; latencies from pgbench's per-transaction log.
    """
    parts = urlsplit(url)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, text in enumerate(scripts):
            path = os.path.join(tmp, f"script{i}.sql")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            files += ["-f", f"{path}@1"]
        env = dict(os.environ, PGPASSWORD=parts.password or "")
        cmd = ["pgbench", "-n", "-M", "simple", "-c", str(clients), "-j", str(min(clients, 2)),
               "-T", str(int(seconds)), *files, "-l", "--log-prefix",
               os.path.join(tmp, "lat"), *connection_args(url)]
        for name, value in (defines or {}).items():
            cmd += ["-D", f"{name}={value}"]
        cmd.append(parts.path.lstrip("/"))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError("pgbench failed: " + (done.stderr or done.stdout).strip()[-500:])
        latencies, failed = [], 0
        for path in glob.glob(os.path.join(tmp, "lat*")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    fields = line.split()
                    # client_id transaction_no time script_no time_epoch time_us
                    if fields[2] == "failed" or fields[2] == "skipped":
                        failed += 1
                    else:
                        latencies.append(int(fields[2]) / 1000.0)
    return {"tool": "pgbench", "latencies": latencies, "errors": failed,
            "elapsed": float(seconds), "error_samples": []}


def _threads(url, clients, seconds, pairs):
    out = {"tool": "psycopg2", "latencies": [], "errors": 0, "error_samples": []}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        latencies, errors = [], 0
        n = k
        while time.perf_counter() < stop_at:
            n = n % pairs + 1
            started = time.perf_counter()
            try:
                cur.execute(TRANSFER_SQL.format(n="%s"), (n,))
                cur.fetchall()
            except psycopg2.Error:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000.0)
        conn.close()
        with lock:
            out["latencies"].extend(latencies)
            out["errors"] += errors

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["elapsed"] = time.perf_counter() - started
    return out
