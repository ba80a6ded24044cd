"""Seeding the bench database: users, accounts and history, fast but by the rules.

Money still moves through the ledger's own functions (server-side, one
statement per batch), so the seeded books pass ``db.verify``. Only the
scaling accounts get a synthetic history written directly, in closed form:
N deposits of one minor unit, each pair of entries consistent with the
balances, which is what lets a million entries land in seconds.
"""

import logging
import time

import psycopg2
import psycopg2.extras

from hoardrun.accounts import new_account_number
from hoardrun.security import hash_password

log = logging.getLogger("hoardrun.bench")

BENCH_PASSWORD = "bench-Password-1"
FUNDING_MINOR_UNITS = 100_000_000  # 1,000,000.00 USD per account: no bench transfer runs dry
BATCH = 10_000


def _connect(url):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def seed(url, *, users, accounts, entries):
    """Create ``users`` users with ``accounts`` accounts between them and ``entries`` entries.

    Every user also gets a funded USD investment account (for investment
    orders). Returns ``{"users": [(user_id, email, {type: account_id})...]}``
    (types ``checking``, ``savings``, ``investment``; with more accounts per
    user than two, ``savings`` is the last of them).
    """
    per_user = max(1, accounts // users)
    password_hash = hash_password(BENCH_PASSWORD)
    conn = _connect(url)
    started = time.monotonic()
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO users (id, email, first_name, last_name, password_hash, status, "
            "email_verified) "
            "SELECT gen_random_uuid(), 'bench' || i || '@bench.hoardrun.test', 'Bench', "
            "'User ' || i, %s, 'active', TRUE FROM generate_series(1, %s) i",
            (password_hash, users))
        cur.execute("SELECT id, email FROM users WHERE email LIKE 'bench%%' ORDER BY email")
        people = cur.fetchall()
        rows = []
        for user_id, _ in people:
            for n in range(per_user):
                rows.append((user_id, new_account_number(), "Checking" if n == 0 else f"Savings {n}",
                             "checking" if n == 0 else "savings", n == 0))
            rows.append((user_id, new_account_number(), "Investments", "investment", False))
        psycopg2.extras.execute_values(
            cur, "INSERT INTO accounts (id, user_id, account_number, name, type, currency, "
                 "is_primary) VALUES %s",
            rows, template="(gen_random_uuid(), %s, %s, %s, %s, 'USD', %s)", page_size=1000)
        cur.execute("SELECT hoardrun_cash(gen_random_uuid(), NULL, id, %s, 'USD', true, "
                    "'Bench funding') FROM accounts WHERE type <> 'settlement'",
                    (FUNDING_MINOR_UNITS,))
        cur.execute(
            "CREATE TABLE bench_pairs AS SELECT row_number() OVER (ORDER BY u.id) AS n, "
            "u.id AS user_id, a1.id AS a1, a2.id AS a2 FROM users u "
            "JOIN accounts a1 ON a1.user_id = u.id AND a1.type = 'checking' "
            "JOIN accounts a2 ON a2.user_id = u.id AND a2.type = 'savings' "
            "WHERE u.email LIKE 'bench%%'")
        cur.execute("CREATE UNIQUE INDEX ON bench_pairs (n)")
        cur.execute("SELECT count(*) FROM bench_pairs")
        pairs = cur.fetchone()[0]
        transfers = max(0, (entries - 2 * len(rows)) // 2)
        done = 0
        while done < transfers and pairs:
            batch = min(BATCH, transfers - done)
            # Alternate direction so no account drifts; 1..100 minor units each.
            cur.execute(
                "SELECT hoardrun_transfer(gen_random_uuid(), p.user_id, "
                "CASE WHEN i %% 2 = 0 THEN p.a1 ELSE p.a2 END, "
                "CASE WHEN i %% 2 = 0 THEN p.a2 ELSE p.a1 END, "
                "1 + (i %% 100), 'USD', 'TRF-' || replace(gen_random_uuid()::text, '-', ''), "
                "'Bench history') "
                "FROM generate_series(%s, %s) i JOIN bench_pairs p ON p.n = 1 + i %% %s",
                (done, done + batch - 1, pairs))
            done += batch
            log.info("seeded %d/%d history transfers", done, transfers)
        cur.execute("ANALYZE")
        cur.execute("SELECT u.id, u.email, array_agg(a.type || '=' || a.id ORDER BY a.created_at, "
                    "a.id) FROM users u JOIN accounts a ON a.user_id = u.id "
                    "WHERE u.email LIKE 'bench%%' GROUP BY u.id, u.email ORDER BY u.email")
        result = [(str(uid), email, dict(pair.split("=", 1) for pair in accs))
                  for uid, email, accs in cur.fetchall()]
    conn.close()
    log.info("seeded %d users, %d accounts, ~%d entries in %.1f s", users, len(rows),
             2 * len(rows) + 2 * transfers, time.monotonic() - started)
    return {"users": result}


def seed_scaling_account(url, entries):
    """One user with one account holding exactly ``entries`` entries; return (user_id, account_id)."""
    deposits = entries  # each deposit puts one entry on the account (its twin on settlement)
    conn = _connect(url)
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO users (id, email, first_name, last_name, password_hash, status) "
            "VALUES (gen_random_uuid(), %s, 'Scale', %s, 'x', 'active') RETURNING id",
            (f"scale{entries}@bench.hoardrun.test", str(entries)))
        user_id = cur.fetchone()[0]
        cur.execute("INSERT INTO accounts (id, user_id, account_number, name, type, currency, "
                    "is_primary) VALUES (gen_random_uuid(), %s, %s, 'Scale', 'checking', 'USD', "
                    "true) RETURNING id", (user_id, new_account_number()))
        account_id = cur.fetchone()[0]
        cur.execute("SELECT hoardrun_settlement_account('USD')")
        settlement = cur.fetchone()[0]
        cur.execute("BEGIN")
        cur.execute("SELECT balance FROM accounts WHERE id = %s FOR UPDATE", (settlement,))
        s0 = cur.fetchone()[0]
        # Deposit i (1-based) of one minor unit: the account holds i after it, the
        # settlement account s0 - i; one second apart so the order is the history's.
        cur.execute(
            "WITH m AS (SELECT i, gen_random_uuid() AS mid, "
            "now() - make_interval(secs => %(n)s - i) AS at FROM generate_series(1, %(n)s) i) "
            "INSERT INTO transactions (id, account_id, movement_id, type, direction, amount, "
            "currency, balance_after, description, reference, status, created_at) "
            "SELECT e.id, e.account_id, m.mid, e.type, e.direction, 1, 'USD', e.balance_after, "
            "'Scale deposit', 'E' || replace(e.id::text, '-', ''), 'completed', m.at FROM m "
            "CROSS JOIN LATERAL (VALUES "
            "(gen_random_uuid(), %(account)s::uuid, 'deposit', 'inbound', m.i::bigint), "
            "(gen_random_uuid(), %(settlement)s::uuid, 'settlement', 'outbound', %(s0)s - m.i)) "
            "AS e(id, account_id, type, direction, balance_after)",
            {"n": deposits, "account": account_id, "settlement": settlement, "s0": s0})
        cur.execute("UPDATE accounts SET balance = %s WHERE id = %s", (deposits, account_id))
        cur.execute("UPDATE accounts SET balance = %s WHERE id = %s",
                    (s0 - deposits, settlement))
        cur.execute("COMMIT")
        cur.execute("ANALYZE transactions")
    conn.close()
    return str(user_id), str(account_id)
