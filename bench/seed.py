"""Seeding the bench database: users, accounts and history, fast but by the rules.

Money still moves through the ledger's own functions (server-side, one
statement per batch), so the seeded books pass ``db.verify``. Only the
scaling accounts get a synthetic history written directly by one
server-side loop: N deposits of one minor unit, each pair of entries
consistent with the balances and chained like the ledger's own, which is
what lets a million entries land in about a minute.
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


# Deposit i (1-based) of one minor unit: the account holds i after it, the
# settlement account s0 - i; one second apart, oldest first, so the order of
# time is the order of the history. Each entry is chained to its account's
# previous one with hoardrun_entry_hash, the ledger's own definition.
_SCALE_FUNCTION = r"""
CREATE FUNCTION pg_temp.hr_seed_scale(p_account uuid, p_settlement uuid, p_n bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s0 bigint;
    s_seq bigint;
    s_hash bytea;
    a_hash bytea;
    v_id uuid;
    v_mid uuid;
    v_at timestamptz;
BEGIN
    SELECT balance INTO s0 FROM accounts WHERE id = p_settlement FOR UPDATE;
    SELECT seq, chain_hash INTO s_seq, s_hash FROM transactions
     WHERE account_id = p_settlement ORDER BY seq DESC LIMIT 1;
    s_seq := coalesce(s_seq, 0);
    FOR i IN 1..p_n LOOP
        v_mid := gen_random_uuid();
        v_at := now() - make_interval(secs => p_n - i);
        v_id := gen_random_uuid();
        a_hash := hoardrun_entry_hash(a_hash, v_id, p_account, i, v_mid, 'deposit', 'inbound',
            1, 'USD', i, 'Scale deposit', NULL, NULL, NULL, NULL, NULL, NULL, NULL,
            'E' || replace(v_id::text, '-', ''), 'completed', v_at, NULL, NULL);
        INSERT INTO transactions (id, account_id, movement_id, type, direction, amount, currency,
                                  balance_after, description, reference, status, created_at,
                                  seq, chain_hash)
        VALUES (v_id, p_account, v_mid, 'deposit', 'inbound', 1, 'USD', i, 'Scale deposit',
                'E' || replace(v_id::text, '-', ''), 'completed', v_at, i, a_hash);
        v_id := gen_random_uuid();
        s_hash := hoardrun_entry_hash(s_hash, v_id, p_settlement, s_seq + i, v_mid, 'settlement',
            'outbound', 1, 'USD', s0 - i, 'Scale deposit', NULL, NULL, NULL, NULL, NULL, NULL,
            NULL, 'E' || replace(v_id::text, '-', ''), 'completed', v_at, NULL, NULL);
        INSERT INTO transactions (id, account_id, movement_id, type, direction, amount, currency,
                                  balance_after, description, reference, status, created_at,
                                  seq, chain_hash)
        VALUES (v_id, p_settlement, v_mid, 'settlement', 'outbound', 1, 'USD', s0 - i,
                'Scale deposit', 'E' || replace(v_id::text, '-', ''), 'completed', v_at,
                s_seq + i, s_hash);
    END LOOP;
    UPDATE accounts SET balance = p_n WHERE id = p_account;
    UPDATE accounts SET balance = s0 - p_n WHERE id = p_settlement;
END
$$"""


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
        # Entries are numbered and hash-chained per account (migration 010), so
        # the synthetic history is written by one server-side loop that links
        # each entry to the one before, as hoardrun_apply_pair_at would. The
        # commit-time ledger triggers are skipped for this bulk load only (the
        # bench connects as a superuser): every row is consistent by
        # construction, and db.verify and db.verify --chain check them after.
        cur.execute(_SCALE_FUNCTION)
        cur.execute("BEGIN")
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute("SELECT pg_temp.hr_seed_scale(%s, %s, %s)",
                    (account_id, settlement, deposits))
        cur.execute("COMMIT")
        cur.execute("ANALYZE transactions")
    conn.close()
    return str(user_id), str(account_id)
