"""010 ledger integrity: PostgreSQL refuses an unbalanced book, and history is hash-chained.

Until now the ledger's rules lived in the ledger functions and db.verify found
drift after the fact. This migration makes the wrong states impossible to
commit, whoever writes them (a future function with a bug, or raw SQL):

- Every entry gets ``seq``, its position in its account's history (1, 2, ...;
  UNIQUE with the account), and ``chain_hash``, sha256 of the previous entry's
  hash and the entry's own canonical content (hoardrun_entry_hash): an edit
  made behind the application's back, even by a superuser with the triggers
  disabled, breaks the chain at that entry (``invoke db.verify --chain``).
  The chain is per account, and an account's entries are written under its
  row lock, so it adds no new hot row. ``seq`` and not (created_at, id) orders
  the chain: the wall clock may step back, a counter cannot.
- Deferred constraint triggers check, at COMMIT, each entry written and each
  account balance changed in the transaction, by index seeks only (never by
  summing an account's history):
    ledger_movement_balanced   a movement's entries sum to zero per currency;
    ledger_entry_currency      an entry is in its account's currency;
    ledger_balance_continuity  balance_after = previous entry's +/- amount;
    ledger_chain_hash          the entry's hash is its chain's next link;
    ledger_balance_stored      an account's balance is its latest entry's
                               balance_after (0 without entries);
    ledger_single_reversal     a movement is reversed at most once, by entries
                               on the reversed entries' own accounts, in the
                               other direction, for no more than they moved;
    ledger_refund_limit        a payment's refunds (those not reversed) plus
                               its reversal never exceed the payment.
  Each refusal is SQLSTATE 23514 (check_violation) with the rule's name as
  the constraint name and at the start of the message.

Existing entries are numbered and chained in (created_at, id) order per
account: the one backfill UPDATE, with the append-only trigger disabled for
it (as 004 did).

Redefined: hoardrun_apply_pair_at (writes seq and chain_hash); the rollback
restores 004's definition verbatim.

NOTE: '%%' stands for a literal percent sign (peewee passes this SQL to
psycopg2 with an empty parameter tuple).
"""

import peewee as pw

# The canonical content of an entry, version 1. Every field is quoted (or NULL)
# so no two different entries can produce the same text; the time is epoch
# microseconds and the quantity has the column's scale, so the text does not
# depend on the session's TimeZone or on how the caller spelt the number.
ENTRY_HASH = r"""
CREATE FUNCTION hoardrun_entry_hash(
    p_prev bytea, p_id uuid, p_account uuid, p_seq bigint, p_movement uuid, p_type text,
    p_direction text, p_amount bigint, p_currency text, p_balance_after bigint,
    p_description text, p_merchant_name text, p_merchant_category text, p_card uuid,
    p_transfer uuid, p_p2p uuid, p_reverses uuid, p_refund_of uuid, p_reference text,
    p_status text, p_created_at timestamptz, p_symbol text, p_quantity numeric)
RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(coalesce(p_prev, '\x'::bytea) || convert_to(concat_ws(',',
        'hr1', quote_nullable(p_id), quote_nullable(p_account), quote_nullable(p_seq),
        quote_nullable(p_movement), quote_nullable(p_type), quote_nullable(p_direction),
        quote_nullable(p_amount), quote_nullable(p_currency), quote_nullable(p_balance_after),
        quote_nullable(p_description), quote_nullable(p_merchant_name),
        quote_nullable(p_merchant_category), quote_nullable(p_card),
        quote_nullable(p_transfer), quote_nullable(p_p2p), quote_nullable(p_reverses),
        quote_nullable(p_refund_of), quote_nullable(p_reference), quote_nullable(p_status),
        quote_nullable((extract(epoch FROM p_created_at) * 1000000)::bigint),
        quote_nullable(p_symbol), quote_nullable(p_quantity::numeric(24, 8))), 'UTF8'))
$$"""

# The same, for a stored row: what the triggers and db.verify --chain recompute.
ROW_HASH = r"""
CREATE FUNCTION hoardrun_entry_hash(p_prev bytea, e transactions)
RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT hoardrun_entry_hash(
        p_prev, e.id, e.account_id, e.seq, e.movement_id, e.type, e.direction, e.amount,
        e.currency, e.balance_after, e.description, e.merchant_name, e.merchant_category,
        e.card_id, e.transfer_id, e.p2p_id, e.reverses_id, e.refund_of_id, e.reference,
        e.status, e.created_at, e.symbol, e.quantity)
$$"""

# Number and chain the entries written before this migration, account by account.
BACKFILL = r"""
DO $$
DECLARE
    e transactions%%ROWTYPE;
    v_account uuid;
    v_seq bigint;
    v_hash bytea;
BEGIN
    FOR e IN SELECT * FROM transactions ORDER BY account_id, created_at, id LOOP
        IF v_account IS DISTINCT FROM e.account_id THEN
            v_account := e.account_id;
            v_seq := 0;
            v_hash := NULL;
        END IF;
        v_seq := v_seq + 1;
        e.seq := v_seq;
        v_hash := hoardrun_entry_hash(v_hash, e);
        UPDATE transactions SET seq = v_seq, chain_hash = v_hash WHERE id = e.id;
    END LOOP;
END
$$"""

CHECK_ENTRY = r"""
CREATE FUNCTION hoardrun_check_entry() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    a record;
    p record;
    r record;
    v_prev_balance bigint := 0;
    v_signed bigint;
    v_prev_hash bytea;
    v_latest bigint;
    v_currency text;
    v_total bigint;
    v_payment uuid;
    v_paid bigint;
    v_back bigint;
BEGIN
    -- Deferred to COMMIT: every row read here is as the transaction leaves it.
    SELECT x.currency, x.balance INTO a FROM accounts x WHERE x.id = NEW.account_id;
    IF a.currency IS DISTINCT FROM NEW.currency THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_entry_currency',
            MESSAGE = 'ledger_entry_currency: entry ' || NEW.id || ' is in ' || NEW.currency
                      || ' but its account is in ' || coalesce(a.currency, 'no currency');
    END IF;
    IF NEW.seq > 1 THEN
        SELECT t.balance_after, t.chain_hash INTO p FROM transactions t
         WHERE t.account_id = NEW.account_id AND t.seq = NEW.seq - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'check_violation',
                CONSTRAINT = 'ledger_balance_continuity',
                MESSAGE = 'ledger_balance_continuity: entry ' || NEW.id || ' is number '
                          || NEW.seq || ' of its account, but there is no number ' || NEW.seq - 1;
        END IF;
        v_prev_balance := p.balance_after;
        v_prev_hash := p.chain_hash;
    END IF;
    v_signed := CASE NEW.direction WHEN 'inbound' THEN NEW.amount ELSE -NEW.amount END;
    IF NEW.balance_after <> v_prev_balance + v_signed THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_balance_continuity',
            MESSAGE = 'ledger_balance_continuity: entry ' || NEW.id || ' leaves '
                      || NEW.balance_after || ', but the entry before it left ' || v_prev_balance
                      || ' and it moves ' || v_signed;
    END IF;
    IF NEW.chain_hash IS DISTINCT FROM hoardrun_entry_hash(v_prev_hash, NEW) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_chain_hash',
            MESSAGE = 'ledger_chain_hash: entry ' || NEW.id
                      || ' does not carry sha256 of the previous hash and its own content';
    END IF;
    SELECT t.balance_after INTO v_latest FROM transactions t
     WHERE t.account_id = NEW.account_id ORDER BY t.seq DESC LIMIT 1;
    IF a.balance <> v_latest THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_balance_stored',
            MESSAGE = 'ledger_balance_stored: account ' || NEW.account_id || ' has balance '
                      || a.balance || ' but its latest entry leaves ' || v_latest;
    END IF;
    SELECT t.currency, sum(CASE t.direction WHEN 'inbound' THEN t.amount ELSE -t.amount END)
      INTO v_currency, v_total
      FROM transactions t WHERE t.movement_id = NEW.movement_id
     GROUP BY t.currency
    HAVING sum(CASE t.direction WHEN 'inbound' THEN t.amount ELSE -t.amount END) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_movement_balanced',
            MESSAGE = 'ledger_movement_balanced: movement ' || NEW.movement_id
                      || ' does not balance in ' || v_currency || ' (off by ' || v_total || ')';
    END IF;
    IF NEW.reverses_id IS NOT NULL THEN
        SELECT * INTO r FROM transactions t WHERE t.id = NEW.reverses_id;
        IF r.type = 'reversal' OR r.account_id <> NEW.account_id
           OR r.direction = NEW.direction OR NEW.amount > r.amount THEN
            RAISE EXCEPTION USING ERRCODE = 'check_violation',
                CONSTRAINT = 'ledger_single_reversal',
                MESSAGE = 'ledger_single_reversal: entry ' || NEW.id || ' cannot reverse entry '
                          || r.id || ' (a reversal reverses no reversal, on the same account, '
                          || 'in the other direction, for at most its amount)';
        END IF;
        IF EXISTS (SELECT 1 FROM transactions o JOIN transactions x ON x.reverses_id = o.id
                    WHERE o.movement_id = r.movement_id AND x.movement_id <> NEW.movement_id) THEN
            RAISE EXCEPTION USING ERRCODE = 'check_violation',
                CONSTRAINT = 'ledger_single_reversal',
                MESSAGE = 'ledger_single_reversal: movement ' || r.movement_id
                          || ' is reversed more than once';
        END IF;
        IF r.type = 'payment' THEN
            v_payment := r.id;
        END IF;
    END IF;
    IF NEW.refund_of_id IS NOT NULL THEN
        SELECT * INTO r FROM transactions t WHERE t.id = NEW.refund_of_id;
        IF r.type <> 'payment' OR r.account_id <> NEW.account_id OR NEW.direction <> 'inbound' THEN
            RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_refund_limit',
                MESSAGE = 'ledger_refund_limit: entry ' || NEW.id || ' refunds entry ' || r.id
                          || ', which is not a payment from its account';
        END IF;
        v_payment := r.id;
    END IF;
    IF v_payment IS NOT NULL THEN
        -- What came back for the payment: refunds not reversed, and its own reversal.
        SELECT t.amount INTO v_paid FROM transactions t WHERE t.id = v_payment;
        SELECT coalesce(sum(t.amount), 0) INTO v_back FROM transactions t
         WHERE t.refund_of_id = v_payment
           AND NOT EXISTS (SELECT 1 FROM transactions x WHERE x.reverses_id = t.id);
        v_back := v_back + coalesce(
            (SELECT x.amount FROM transactions x WHERE x.reverses_id = v_payment), 0);
        IF v_back > v_paid THEN
            RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_refund_limit',
                MESSAGE = 'ledger_refund_limit: payment ' || v_payment || ' of ' || v_paid
                          || ' would give back ' || v_back;
        END IF;
    END IF;
    RETURN NULL;
END
$$"""

CHECK_ACCOUNT = r"""
CREATE FUNCTION hoardrun_check_account() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    a record;
    e record;
BEGIN
    -- NEW may be an intermediate version: read the row as the transaction leaves it.
    SELECT x.balance, x.currency INTO a FROM accounts x WHERE x.id = NEW.id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT t.balance_after, t.currency INTO e FROM transactions t
     WHERE t.account_id = NEW.id ORDER BY t.seq DESC LIMIT 1;
    IF a.balance <> coalesce(e.balance_after, 0) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_balance_stored',
            MESSAGE = 'ledger_balance_stored: account ' || NEW.id || ' has balance ' || a.balance
                      || ' but its latest entry leaves ' || coalesce(e.balance_after, 0);
    END IF;
    IF e.currency IS NOT NULL AND e.currency <> a.currency THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_entry_currency',
            MESSAGE = 'ledger_entry_currency: account ' || NEW.id || ' is in ' || a.currency
                      || ' but its entries are in ' || e.currency;
    END IF;
    RETURN NULL;
END
$$"""

TRIGGERS = {
    "transactions_ledger_rules": (
        "transactions", "CREATE CONSTRAINT TRIGGER transactions_ledger_rules "
        "AFTER INSERT ON transactions DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION hoardrun_check_entry()"),
    "accounts_ledger_balance": (
        "accounts", "CREATE CONSTRAINT TRIGGER accounts_ledger_balance "
        "AFTER INSERT OR UPDATE OF balance, currency ON accounts DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION hoardrun_check_account()"),
}

APPLY_PAIR_AT = r"""
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
    INSERT INTO transactions (id, account_id, movement_id, type, direction, amount, currency,
                              balance_after, description, merchant_name, merchant_category,
                              card_id, transfer_id, p2p_id, reverses_id, reference, status,
                              refund_of_id, created_at, symbol, quantity, seq, chain_hash)
    VALUES (r.debit_entry, p_debit, p_movement, p_debit_type, 'outbound', p_amount, p_currency,
            r.debit_balance, p_description, p_merchant_name, p_merchant_category,
            p_card, p_transfer, p_p2p, p_reverses_debit,
            'E' || replace(r.debit_entry::text, '-', ''), 'completed', NULL, r.posted_at,
            v_debit_symbol, v_debit_quantity, v_debit_seq,
            hoardrun_entry_hash(
                v_debit_prev, r.debit_entry, p_debit, v_debit_seq, p_movement, p_debit_type,
                'outbound', p_amount, p_currency, r.debit_balance, p_description,
                p_merchant_name, p_merchant_category, p_card, p_transfer, p_p2p,
                p_reverses_debit, NULL, 'E' || replace(r.debit_entry::text, '-', ''),
                'completed', r.posted_at, v_debit_symbol, v_debit_quantity)),
           (r.credit_entry, p_credit, p_movement, p_credit_type, 'inbound', p_amount, p_currency,
            r.credit_balance, p_description, p_merchant_name, p_merchant_category,
            p_card, p_transfer, p_p2p, p_reverses_credit,
            'E' || replace(r.credit_entry::text, '-', ''), 'completed', p_refund_of, r.posted_at,
            v_credit_symbol, v_credit_quantity, v_credit_seq,
            hoardrun_entry_hash(
                v_credit_prev, r.credit_entry, p_credit, v_credit_seq, p_movement, p_credit_type,
                'inbound', p_amount, p_currency, r.credit_balance, p_description,
                p_merchant_name, p_merchant_category, p_card, p_transfer, p_p2p,
                p_reverses_credit, p_refund_of, 'E' || replace(r.credit_entry::text, '-', ''),
                'completed', r.posted_at, v_credit_symbol, v_credit_quantity));
    r.movement_id := p_movement;
    r.currency := p_currency;
    r.amount := p_amount;
    r.debit_account := p_debit;
    r.credit_account := p_credit;
    RETURN r;
END
$$"""

# 004's definition, verbatim: the rollback puts it back.
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
    r.debit_entry := gen_random_uuid();
    r.credit_entry := gen_random_uuid();
    -- A trade's symbol and quantity go on the customer's leg, never the settlement one.
    INSERT INTO transactions (id, account_id, movement_id, type, direction, amount, currency,
                              balance_after, description, merchant_name, merchant_category,
                              card_id, transfer_id, p2p_id, reverses_id, reference, status,
                              refund_of_id, created_at, symbol, quantity)
    VALUES (r.debit_entry, p_debit, p_movement, p_debit_type, 'outbound', p_amount, p_currency,
            r.debit_balance, p_description, p_merchant_name, p_merchant_category,
            p_card, p_transfer, p_p2p, p_reverses_debit,
            'E' || replace(r.debit_entry::text, '-', ''), 'completed', NULL, r.posted_at,
            CASE WHEN p_debit_type <> 'settlement' THEN p_symbol END,
            CASE WHEN p_debit_type <> 'settlement' THEN p_quantity END),
           (r.credit_entry, p_credit, p_movement, p_credit_type, 'inbound', p_amount, p_currency,
            r.credit_balance, p_description, p_merchant_name, p_merchant_category,
            p_card, p_transfer, p_p2p, p_reverses_credit,
            'E' || replace(r.credit_entry::text, '-', ''), 'completed', p_refund_of, r.posted_at,
            CASE WHEN p_credit_type <> 'settlement' THEN p_symbol END,
            CASE WHEN p_credit_type <> 'settlement' THEN p_quantity END);
    r.movement_id := p_movement;
    r.currency := p_currency;
    r.amount := p_amount;
    r.debit_account := p_debit;
    r.credit_account := p_credit;
    RETURN r;
END
$$"""

# Functions this migration adds, callers last (the rollback drops them in reverse).
NEW_FUNCTIONS = {
    "hoardrun_entry_hash(bytea, uuid, uuid, bigint, uuid, text, text, bigint, text, bigint, "
    "text, text, text, uuid, uuid, uuid, uuid, uuid, text, text, timestamptz, text, numeric)":
        ENTRY_HASH,
    "hoardrun_entry_hash(bytea, transactions)": ROW_HASH,
    "hoardrun_check_entry()": CHECK_ENTRY,
    "hoardrun_check_account()": CHECK_ACCOUNT,
}


def migrate(migrator, database, *, fake=False):
    """Number and chain every entry, then install the commit-time rules and the new writer."""
    migrator.add_fields("transactions", seq=pw.BigIntegerField(null=True),
                        chain_hash=pw.BlobField(null=True))
    for ddl in NEW_FUNCTIONS.values():
        migrator.sql(ddl)
    # The one UPDATE of ledger entries since 004: numbering and chaining what
    # exists (amounts and everything else untouched).
    migrator.sql("ALTER TABLE transactions DISABLE TRIGGER transactions_append_only")
    migrator.sql(BACKFILL)
    migrator.sql("ALTER TABLE transactions ENABLE TRIGGER transactions_append_only")
    # NOTE: not add_not_null: it would make the pending ADD COLUMN above NOT NULL
    # too (the operations run later, on the same field objects) and fail on a
    # table with rows. New field objects keep the two apart.
    migrator.change_fields("transactions", seq=pw.BigIntegerField(),
                           chain_hash=pw.BlobField())
    migrator.sql("ALTER TABLE transactions ADD CONSTRAINT transactions_seq_positive "
                 "CHECK (seq > 0)")
    migrator.add_index("transactions", "account", "seq", unique=True)
    for _, ddl in TRIGGERS.values():
        migrator.sql(ddl)
    migrator.sql(APPLY_PAIR_AT)


def rollback(migrator, database, *, fake=False):
    """Put 004's writer back, drop the rules and the chain columns."""
    migrator.sql(PREVIOUS_APPLY_PAIR_AT)
    for name, (table, _) in reversed(list(TRIGGERS.items())):
        migrator.sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    migrator.drop_index("transactions", "account", "seq")
    migrator.sql("ALTER TABLE transactions DROP CONSTRAINT transactions_seq_positive")
    for signature in reversed(list(NEW_FUNCTIONS)):
        migrator.sql(f"DROP FUNCTION IF EXISTS {signature}")
    migrator.remove_fields("transactions", "seq", "chain_hash")
