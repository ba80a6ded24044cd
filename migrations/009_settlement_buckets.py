"""009 settlement buckets: cash movements no longer queue on one row per currency.

Before: every deposit, withdrawal, card payment, refund and trade cash leg
posted against THE settlement account of its currency, so each one locked
and updated the same row and held that lock until its transaction committed
(behind HTTP: the audit row, the idempotency row and the commit's flush).
All cash movements of a currency ran one at a time, whatever the hardware:
measured with pgbench (bench/settlement_contention.py, same run), 377
deposits/s against 1,598 transfers/s at 32 clients, p99 424 ms. After
this migration, same driver and machine: 0.94 x transfers at 8 clients and
1.05 x at 32, deposit p99 55 ms at 32 (transfers' own p99 there: 57 ms).

Design: the settlement side of a currency is up to BUCKETS (32) settlement
accounts, each numbered by a new ``settlement_bucket`` column (0..99; NULL
exactly on customer accounts, a CHECK), unique per (currency, bucket) in
place of the old one-per-currency index. They are ordinary accounts to the
ledger: each movement posts its two entries against one bucket, so each
bucket's balance is the signed sum of its entries, the currency's buckets
together stand for the outside world, and every currency still sums to
zero over all its accounts exactly as before. ``db.verify`` needs no new
rule: it already checks each account and each currency's total.

hoardrun_settlement_account(currency) (the only ledger function redefined
here; every cash movement calls it) picks the bucket for the movement:

- it starts at pg_backend_pid() mod BUCKETS, so each pooled connection has a
  bucket of its own when there is no contention, and tries each bucket from
  there with pg_try_advisory_xact_lock, taking the first one no other
  transaction has reserved; with at most BUCKETS cash movements of a
  currency in flight, none waits for another;
- the reservation is a hint, not the lock that protects money: the bucket's
  row is still locked FOR UPDATE by hoardrun_lock_pair, with the customer's
  account, in id order, exactly as before. A try-lock never waits, so it
  adds no edge to any wait-for graph and cannot cause a deadlock (unlike
  SELECT ... FOR UPDATE SKIP LOCKED here, which would lock the bucket before
  the customer's account, out of id order, and could deadlock with a
  reversal that locks the same pair in id order). When every bucket is
  reserved, the movement waits on its start bucket's row lock, as every
  movement did before this migration;
- the reservation lasts as long as the row lock (both end with the
  transaction), and the same transaction asking again gets the same bucket
  (advisory locks are re-entrant), so a transaction never spreads itself
  over two buckets of one currency;
- buckets are created on first use. Bucket 0 is the settlement account a
  database already has (its number, '99' and the currency letters' codes,
  8 digits, is unchanged); bucket k > 0 appends k as two digits (10
  digits). Customer numbers have 11, so the ranges still never meet.

Advisory keys: (ADVISORY_CLASS, currency letters as a base-26 number x 100
+ bucket), in the two-int4 key space, which nothing else in HoardRun uses.

Rollback: the ledger is append-only, so entries cannot be moved from one
bucket to another without rewriting history (and every balance_after of
the bucket they join). The rollback therefore merges only what merges
without rewriting: per currency it keeps the one bucket that has entries
(or the lowest, when none has), deletes the others, which must have no
entries and a zero balance, and gives the kept one the number and name 002
gives a settlement account. When a currency has entries on more than one
bucket it refuses, with a message saying so, and changes nothing (the
migration runs in one transaction): restore a backup taken before 009, or
stay on 009 (SQLSTATE HR009, used only here). This was chosen over
silently rewriting immutable entries.
"""

import peewee as pw

# Settlement accounts per currency that movements spread over (at most 100:
# the bucket is two digits of the account number).
BUCKETS = 32
# The first int4 of every settlement-bucket advisory key ('HR', 009).
ADVISORY_CLASS = 72820009

OLD_INDEX = "accounts_one_settlement_per_currency"
NEW_INDEX = "accounts_one_settlement_per_bucket"
CHECK_NAME = "accounts_settlement_bucket"
CHECK = ("(type = 'settlement') = (settlement_bucket IS NOT NULL) "
         "AND (settlement_bucket IS NULL OR settlement_bucket BETWEEN 0 AND 99)")

NEW_FUNCTIONS = {
    "hoardrun_settlement_bucket(text)": r"""
CREATE FUNCTION hoardrun_settlement_bucket(p_currency text) RETURNS smallint
LANGUAGE plpgsql AS $$
DECLARE
    -- The currency's letters as a base-26 number: distinct per currency, < 17,576.
    v_key int := ((ascii(substr(p_currency, 1, 1)) - 65) * 676
                  + (ascii(substr(p_currency, 2, 1)) - 65) * 26
                  + (ascii(substr(p_currency, 3, 1)) - 65)) * 100;
    v_start int := mod(pg_backend_pid(), BUCKETS);
    v_bucket int;
BEGIN
    -- Reserve the first bucket nobody else has: a try-lock never waits, so it
    -- cannot deadlock; the row itself is locked later, in id order.
    FOR i IN 0 .. BUCKETS - 1 LOOP
        v_bucket := mod(v_start + i, BUCKETS);
        IF pg_try_advisory_xact_lock(ADVISORY_CLASS, v_key + v_bucket) THEN
            RETURN v_bucket;
        END IF;
    END LOOP;
    -- All reserved: queue on this connection's own bucket, as before 009.
    RETURN v_start;
END
$$""".replace("ADVISORY_CLASS", str(ADVISORY_CLASS)).replace("BUCKETS", str(BUCKETS)),
}

FUNCTION = r"""
CREATE OR REPLACE FUNCTION hoardrun_settlement_account(p_currency text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_bucket smallint := hoardrun_settlement_bucket(p_currency);
    v_id uuid;
BEGIN
    SELECT id INTO v_id FROM accounts
     WHERE type = 'settlement' AND currency = p_currency AND settlement_bucket = v_bucket;
    IF v_id IS NULL THEN
        -- The number is '99' and the currency letters' codes (8 digits), then
        -- the bucket as two digits unless it is 0 (10 digits): never the
        -- length of a customer number, so the two can never collide.
        INSERT INTO accounts (id, user_id, account_number, name, type, status, currency,
                              settlement_bucket)
        VALUES (gen_random_uuid(), NULL,
                '99' || ascii(substr(p_currency, 1, 1)) || ascii(substr(p_currency, 2, 1))
                     || ascii(substr(p_currency, 3, 1))
                     || CASE WHEN v_bucket = 0 THEN '' ELSE lpad(v_bucket::text, 2, '0') END,
                'Settlement ' || p_currency
                     || CASE WHEN v_bucket = 0 THEN '' ELSE ' #' || v_bucket END,
                'settlement', 'active', p_currency, v_bucket)
        ON CONFLICT DO NOTHING;
        SELECT id INTO v_id FROM accounts
         WHERE type = 'settlement' AND currency = p_currency AND settlement_bucket = v_bucket;
    END IF;
    RETURN v_id;
END
$$"""

# 002's definition, verbatim: what the rollback puts back.
PREVIOUS = r"""
CREATE OR REPLACE FUNCTION hoardrun_settlement_account(p_currency text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    SELECT id INTO v_id FROM accounts WHERE type = 'settlement' AND currency = p_currency;
    IF v_id IS NULL THEN
        -- The number is '99' and the currency letters' codes: 8 digits, never
        -- the length of a customer number, so the two can never collide.
        INSERT INTO accounts (id, user_id, account_number, name, type, status, currency)
        VALUES (gen_random_uuid(), NULL,
                '99' || ascii(substr(p_currency, 1, 1)) || ascii(substr(p_currency, 2, 1))
                     || ascii(substr(p_currency, 3, 1)),
                'Settlement ' || p_currency, 'settlement', 'active', p_currency)
        ON CONFLICT DO NOTHING;
        SELECT id INTO v_id FROM accounts WHERE type = 'settlement' AND currency = p_currency;
    END IF;
    RETURN v_id;
END
$$"""

# The bucket each currency keeps on rollback: the one with entries, else the lowest.
_KEPT = """
SELECT DISTINCT ON (s.currency) s.id FROM accounts s
 WHERE s.type = 'settlement'
 ORDER BY s.currency,
          EXISTS (SELECT 1 FROM transactions t WHERE t.account_id = s.id) DESC,
          s.settlement_bucket"""

REFUSE_MERGE = r"""
DO $$
DECLARE
    v_currency text;
    v_count bigint;
BEGIN
    SELECT s.currency, count(*) INTO v_currency, v_count FROM accounts s
     WHERE s.type = 'settlement'
       AND EXISTS (SELECT 1 FROM transactions t WHERE t.account_id = s.id)
     GROUP BY s.currency HAVING count(*) > 1 ORDER BY s.currency LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HR009', MESSAGE =
            'cannot roll back 009_settlement_buckets: ' || v_currency || ' has entries on '
            || v_count || ' settlement buckets, and ledger entries are immutable, so they '
            || 'cannot be merged into one settlement account; restore a backup taken '
            || 'before 009 or stay on 009';
    END IF;
    SELECT s.currency INTO v_currency FROM accounts s
     WHERE s.type = 'settlement' AND s.balance <> 0 AND s.id NOT IN (KEPT)
     ORDER BY s.currency LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HR009', MESSAGE =
            'cannot roll back 009_settlement_buckets: a ' || v_currency || ' settlement '
            || 'bucket without entries has a non-zero balance (run db.verify)';
    END IF;
END
$$""".replace("KEPT", _KEPT)


def _accounts_model(migrator):
    return migrator.orm["accounts"]


def _without_index(model, name):
    model._meta.indexes = [index for index in model._meta.indexes
                           if getattr(index, "_name", None) != name]


def migrate(migrator, database, *, fake=False):
    """Number the settlement accounts by bucket and spread movements over the buckets."""
    migrator.add_fields("accounts", settlement_bucket=pw.SmallIntegerField(null=True))
    # The migrator's picture of the table follows the index change too, so the
    # autogenerator sees what the database has.
    accounts = _accounts_model(migrator)
    _without_index(accounts, OLD_INDEX)
    accounts.add_index(accounts.index(accounts.currency, accounts.settlement_bucket,
                                      unique=True, where=(accounts.type == "settlement"),
                                      name=NEW_INDEX))
    # The one settlement account a currency has today is its bucket 0.
    migrator.sql("UPDATE accounts SET settlement_bucket = 0 WHERE type = 'settlement'")
    migrator.sql(f"ALTER TABLE accounts ADD CONSTRAINT {CHECK_NAME} CHECK ({CHECK})")
    migrator.sql(f"DROP INDEX {OLD_INDEX}")
    migrator.sql(f"CREATE UNIQUE INDEX {NEW_INDEX} ON accounts (currency, settlement_bucket) "
                 "WHERE type = 'settlement'")
    for ddl in NEW_FUNCTIONS.values():
        migrator.sql(ddl)
    migrator.sql(FUNCTION)


def rollback(migrator, database, *, fake=False):
    """Merge each currency's buckets back into one account, or refuse when entries would move."""
    migrator.sql(REFUSE_MERGE)
    migrator.sql(f"DELETE FROM accounts WHERE type = 'settlement' AND id NOT IN ({_KEPT})")
    migrator.sql(
        "UPDATE accounts SET account_number = '99' || ascii(substr(currency, 1, 1)) "
        "|| ascii(substr(currency, 2, 1)) || ascii(substr(currency, 3, 1)), "
        "name = 'Settlement ' || currency WHERE type = 'settlement' AND settlement_bucket <> 0")
    migrator.sql(PREVIOUS)
    for signature in reversed(list(NEW_FUNCTIONS)):
        migrator.sql(f"DROP FUNCTION IF EXISTS {signature}")
    migrator.sql(f"DROP INDEX {NEW_INDEX}")
    migrator.sql(f"ALTER TABLE accounts DROP CONSTRAINT {CHECK_NAME}")
    accounts = _accounts_model(migrator)
    _without_index(accounts, NEW_INDEX)
    migrator.remove_fields("accounts", "settlement_bucket")
    migrator.sql(f"CREATE UNIQUE INDEX {OLD_INDEX} ON accounts (currency) "
                 "WHERE type = 'settlement'")
    accounts.add_index(accounts.index(accounts.currency, unique=True,
                                      where=(accounts.type == "settlement"), name=OLD_INDEX))
