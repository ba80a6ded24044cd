"""015 the ledger's hot path: held sums with a cached plan, compact CHECKs, one balance UPDATE.

Profiled with ``perf`` on a PostgreSQL 15 backend serving one keyed transfer
after another (``bench``'s ledger call), three costs had nothing to do with
what the ledger checks:

1. **``hoardrun_held`` was planned on every call.** It is a SQL-language
   function whose body has a FROM clause, so PostgreSQL cannot inline it,
   and before PostgreSQL 18 a SQL function's plan is not kept between calls:
   each funds check (and each account read, which shows ``held``) parsed,
   analysed and planned the sum again, about 0.1 ms of the backend's CPU
   (``track_functions``: 111 us a call against 18 us as PL/pgSQL, which
   keeps its plan for the session). Same body, same result, same
   volatility; only the language changes. ``hoardrun_funds_ok`` calls it
   and is unchanged.
2. **Every CHECK constraint is re-read from its stored text by every
   statement that writes the table** (the executor's ``ExecRelCheck``
   runs ``stringToNode`` on each constraint once per statement, not once
   per session). ``currency IN ('AED', ..., 'ZAR')`` is stored as an ARRAY
   of 32 casted constants, 5.8 kB of node text, and it sits on every table
   a movement writes: parsing CHECK text was 12 % of the backend's CPU and
   evaluating CHECKs 18 %. Written as ``currency::text = ANY ('{AED,...}'
   ::text[])`` the list is one constant of 1.2 kB, and the rule is the same
   (a NULL still passes, as it did). Every list CHECK built by the models'
   ``_in`` changes this way, so migrated and model-built schemas stay
   equal; the names stay. Each table is scanned once to validate its new
   constraints (under the ALTER's lock, no rewrite).
3. **``hoardrun_apply_pair_at`` updated the two accounts with two
   statements.** Each UPDATE pays the executor's start-up and the accounts'
   CHECKs again; one UPDATE of both rows (the debit by ``-amount``, the
   credit by ``+amount``) returns both new balances. The callers still hold
   both row locks (``hoardrun_lock_pair``) and never pass the same account
   twice (HR004); the writer refuses it too, since one UPDATE would then
   move the account once, not twice. Everything else is 014's writer.

The commit-time rules of migration 010 are untouched: every entry and every
updated account is still checked at COMMIT.

The rollback restores 008's ``hoardrun_held``, the ``IN (...)`` CHECKs and
014's writer.
"""

CURRENCY_CODES = ('AED', 'AUD', 'BHD', 'BRL', 'CAD', 'CHF', 'CLP', 'CNY', 'CZK', 'DKK', 'EUR',
                  'GBP', 'GHS', 'HKD', 'INR', 'ISK', 'JOD', 'JPY', 'KES', 'KRW', 'KWD', 'MXN',
                  'NGN', 'NOK', 'NZD', 'OMR', 'PLN', 'SEK', 'SGD', 'TND', 'USD', 'ZAR')
MOVEMENT_STATUSES = ('pending', 'completed', 'failed', 'cancelled', 'reversed')
INVESTMENT_TYPES = ('stock', 'etf', 'bond', 'mutual_fund', 'crypto')

#: (table, constraint, column, allowed values): every CHECK the models build with ``_in``.
LIST_CHECKS = (
    ("users", "users_role", "role", ('user', 'premium', 'admin')),
    ("users", "users_status", "status", ('pending', 'active', 'suspended', 'deactivated')),
    ("accounts", "accounts_type", "type",
     ('checking', 'savings', 'investment', 'credit', 'business', 'settlement')),
    ("accounts", "accounts_status", "status",
     ('active', 'inactive', 'suspended', 'closed', 'pending')),
    ("accounts", "accounts_currency_iso", "currency", CURRENCY_CODES),
    ("cards", "cards_type", "type", ('debit', 'credit', 'prepaid')),
    ("cards", "cards_status", "status", ('active', 'inactive', 'blocked', 'expired', 'cancelled')),
    ("transfers", "transfers_currency_iso", "currency", CURRENCY_CODES),
    ("transfers", "transfers_status", "status", MOVEMENT_STATUSES),
    ("p2p_transactions", "p2p_transactions_currency_iso", "currency", CURRENCY_CODES),
    ("p2p_transactions", "p2p_status", "status", MOVEMENT_STATUSES),
    ("transactions", "transactions_type", "type",
     ('deposit', 'withdrawal', 'transfer_in', 'transfer_out', 'p2p_in', 'p2p_out', 'payment',
      'refund', 'fee', 'interest', 'investment_buy', 'investment_sell', 'reversal',
      'settlement')),
    ("transactions", "transactions_direction", "direction", ('inbound', 'outbound')),
    ("transactions", "transactions_currency_iso", "currency", CURRENCY_CODES),
    ("transactions", "transactions_status", "status", ('pending', 'completed', 'failed')),
    ("investments", "investments_type", "type", INVESTMENT_TYPES),
    ("investments", "investments_currency_iso", "currency", CURRENCY_CODES),
    ("instrument_prices", "instrument_prices_type", "type", INVESTMENT_TYPES),
    ("instrument_prices", "instrument_prices_currency_iso", "currency", CURRENCY_CODES),
    ("email_codes", "email_codes_purpose", "purpose", ('verify_email', 'reset_password')),
    ("mail_outbox", "mail_outbox_status", "status", ('pending', 'sent', 'failed')),
    ("card_holds", "card_holds_currency_iso", "currency", CURRENCY_CODES),
    ("card_holds", "card_holds_status", "status", ('active', 'captured', 'voided', 'expired')),
    ("card_holds", "card_holds_channel", "channel", ('online', 'contactless', 'chip')),
)
#: The one compound CHECK with a list inside: ``{}`` is where the list goes.
TRADE_CHECK = ("transactions", "transactions_trade",
               "(quantity IS NOT NULL) = ({}) AND (symbol IS NOT NULL) = (quantity IS NOT NULL) "
               "AND (quantity IS NULL OR quantity > 0)", "type",
               ('investment_buy', 'investment_sell'))


def one_of(column, values):
    """The compact list rule, exactly as the models' ``_in`` writes it."""
    return "{}::text = ANY ('{{{}}}'::text[])".format(column, ",".join(values))


def in_list(column, values):
    """The list rule as migrations 001-008 wrote it."""
    return "{} IN ({})".format(column, ", ".join("'%s'" % v for v in values))


def _alter_checks(rule):
    """ALTER TABLE statements re-creating every list CHECK with ``rule``, one per table."""
    by_table = {}
    for table, name, column, values in LIST_CHECKS:
        by_table.setdefault(table, []).append((name, rule(column, values)))
    table, name, template, column, values = TRADE_CHECK
    by_table[table].append((name, template.format(rule(column, values))))
    return [f"ALTER TABLE {table} " + ", ".join(
                f"DROP CONSTRAINT {name}, ADD CONSTRAINT {name} CHECK ({expression})"
                for name, expression in checks)
            for table, checks in by_table.items()]


HELD = r"""
CREATE OR REPLACE FUNCTION hoardrun_held(p_account uuid, p_at timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- What active holds reserve on the account at p_at: an expired hold counts
    -- for nothing from its expires_at on, swept or not. PL/pgSQL, not SQL, so
    -- the plan of this sum is made once per session, not on every call.
    RETURN (SELECT coalesce(sum(h.amount), 0)::bigint FROM card_holds h
             WHERE h.account_id = p_account AND h.status = 'active' AND h.expires_at > p_at);
END
$$"""

PREVIOUS_HELD = r"""
CREATE OR REPLACE FUNCTION hoardrun_held(p_account uuid, p_at timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    -- What active holds reserve on the account at p_at: an expired hold counts
    -- for nothing from its expires_at on, swept or not.
    SELECT coalesce(sum(h.amount), 0)::bigint FROM card_holds h
     WHERE h.account_id = p_account AND h.status = 'active' AND h.expires_at > p_at
$$"""

# The writer as 014 left it, verbatim: the rollback puts it back (peewee-migrate
# runs a migration's text without ``__file__``, so 014's module cannot be loaded).
PREVIOUS_APPLY_PAIR_AT = r"""
CREATE OR REPLACE FUNCTION hoardrun_apply_pair_at(
    p_movement uuid, p_debit uuid, p_credit uuid, p_amount bigint, p_currency text,
    p_debit_type text, p_credit_type text, p_description text,
    p_transfer uuid, p_p2p uuid, p_card uuid, p_merchant_name text, p_merchant_category text,
    p_reverses_debit uuid, p_reverses_credit uuid, p_refund_of uuid,
    p_posted_at timestamptz, p_symbol text, p_quantity numeric)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    r hoardrun_posting;
    v_debit_seq bigint;
    v_debit_prev bytea;
    v_credit_seq bigint;
    v_credit_prev bytea;
    v_debit_symbol text := CASE WHEN p_debit_type <> 'settlement' THEN p_symbol END;
    v_debit_quantity numeric := CASE WHEN p_debit_type <> 'settlement' THEN p_quantity END;
    v_credit_symbol text := CASE WHEN p_credit_type <> 'settlement' THEN p_symbol END;
    v_credit_quantity numeric := CASE WHEN p_credit_type <> 'settlement' THEN p_quantity END;
    v_debit transactions;
    v_credit transactions;
BEGIN
    -- Callers have locked both rows with hoardrun_lock_pair in this transaction
    -- and read p_posted_at after the locks (clock_timestamp(), not now(), the
    -- transaction's start), so one account's entries sort by time in the order
    -- their balances were written.
    r.posted_at := p_posted_at;
    UPDATE accounts SET balance = balance - p_amount, updated_at = now()
     WHERE id = p_debit RETURNING balance INTO r.debit_balance;
    UPDATE accounts SET balance = balance + p_amount, updated_at = now()
     WHERE id = p_credit RETURNING balance INTO r.credit_balance;
    -- Each account's chain: its latest entry (an index seek; the account's row
    -- lock, held since hoardrun_lock_pair, keeps anyone else from appending).
    SELECT t.seq, t.chain_hash INTO v_debit_seq, v_debit_prev FROM transactions t
     WHERE t.account_id = p_debit ORDER BY t.seq DESC LIMIT 1;
    SELECT t.seq, t.chain_hash INTO v_credit_seq, v_credit_prev FROM transactions t
     WHERE t.account_id = p_credit ORDER BY t.seq DESC LIMIT 1;
    v_debit_seq := coalesce(v_debit_seq, 0) + 1;
    v_credit_seq := coalesce(v_credit_seq, 0) + 1;
    r.debit_entry := gen_random_uuid();
    r.credit_entry := gen_random_uuid();
    -- A trade's symbol and quantity go on the customer's leg, never the settlement one.
    v_debit := hoardrun_entry(
        v_debit_prev, r.debit_entry, p_debit, v_debit_seq, p_movement, p_debit_type,
        'outbound', p_amount, p_currency, r.debit_balance, p_description, p_merchant_name,
        p_merchant_category, p_card, p_transfer, p_p2p, p_reverses_debit, NULL, r.posted_at,
        v_debit_symbol, v_debit_quantity);
    v_credit := hoardrun_entry(
        v_credit_prev, r.credit_entry, p_credit, v_credit_seq, p_movement, p_credit_type,
        'inbound', p_amount, p_currency, r.credit_balance, p_description, p_merchant_name,
        p_merchant_category, p_card, p_transfer, p_p2p, p_reverses_credit, p_refund_of,
        r.posted_at, v_credit_symbol, v_credit_quantity);
    INSERT INTO transactions SELECT * FROM unnest(ARRAY[v_debit, v_credit]);
    r.movement_id := p_movement;
    r.currency := p_currency;
    r.amount := p_amount;
    r.debit_account := p_debit;
    r.credit_account := p_credit;
    RETURN r;
END
$$"""

# 014's two UPDATEs, one per side ...
TWO_UPDATES = """    r.posted_at := p_posted_at;
    UPDATE accounts SET balance = balance - p_amount, updated_at = now()
     WHERE id = p_debit RETURNING balance INTO r.debit_balance;
    UPDATE accounts SET balance = balance + p_amount, updated_at = now()
     WHERE id = p_credit RETURNING balance INTO r.credit_balance;
"""
# ... become one UPDATE of both rows, behind a guard against one account on both sides.
ONE_UPDATE = """    IF p_debit = p_credit THEN
        -- One UPDATE below would move the account once, not out and back in.
        RAISE EXCEPTION USING ERRCODE = 'HR004',
            MESSAGE = 'source and destination are the same account';
    END IF;
    r.posted_at := p_posted_at;
    -- Both balances in one statement: the executor's start-up and the accounts'
    -- CHECKs are paid once, not once per side.
    WITH moved AS (
        UPDATE accounts
           SET balance = balance + CASE WHEN id = p_debit THEN -p_amount ELSE p_amount END,
               updated_at = now()
         WHERE id IN (p_debit, p_credit)
        RETURNING id, balance)
    SELECT max(m.balance) FILTER (WHERE m.id = p_debit),
           max(m.balance) FILTER (WHERE m.id = p_credit)
      INTO r.debit_balance, r.credit_balance FROM moved m;
"""
assert PREVIOUS_APPLY_PAIR_AT.count(TWO_UPDATES) == 1
#: 015's writer: 014's with TWO_UPDATES replaced by ONE_UPDATE, nothing else.
APPLY_PAIR_AT = PREVIOUS_APPLY_PAIR_AT.replace(TWO_UPDATES, ONE_UPDATE)


def migrate(migrator, database, *, fake=False):
    """Cache the held sum's plan, compact the list CHECKs, update both balances at once."""
    migrator.sql(HELD)
    for statement in _alter_checks(one_of):
        migrator.sql(statement)
    migrator.sql(APPLY_PAIR_AT)


def rollback(migrator, database, *, fake=False):
    """Put back 014's writer, the IN (...) CHECKs and 008's SQL-language held sum."""
    migrator.sql(PREVIOUS_APPLY_PAIR_AT)
    for statement in _alter_checks(in_list):
        migrator.sql(statement)
    migrator.sql(PREVIOUS_HELD)
