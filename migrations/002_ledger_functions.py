"""002 ledger functions: every PostgreSQL money movement as one reviewed call.

Each public function is one round trip from the app and one implicit
transaction (peewee runs psycopg2 in autocommit, so a single SELECT is
atomic). The accounts involved are locked FOR UPDATE in id order, so two
movements over the same pair can never deadlock, and the overdraft rule is
checked under that lock. These functions are the only copy of the rules:
hoardrun/ledger.py validates arguments, calls them and maps their errors.

Errors use our own SQLSTATEs so the app can map them to domain errors:
HR001 insufficient funds, HR002 account not active, HR003 currency mismatch,
HR004 same account, HR005 reversal not allowed, HR404 not found.

PL/pgSQL plans are cached per session by the server, so these functions get
the benefit of prepared statements without the app preparing anything, and
they survive PgBouncer in transaction mode.

NOTE: peewee hands this SQL to psycopg2 with an empty parameter tuple, so a
literal percent sign must be written '%%' (as in %%ROWTYPE).
"""


POSTING_TYPE = """
CREATE TYPE hoardrun_posting AS (
    movement_id uuid, currency text, amount bigint,
    debit_account uuid, debit_entry uuid, debit_balance bigint,
    credit_account uuid, credit_entry uuid, credit_balance bigint,
    posted_at timestamptz)"""

FUNCTIONS = {
    "hoardrun_settlement_account(text)": r"""
CREATE FUNCTION hoardrun_settlement_account(p_currency text) RETURNS uuid
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
$$""",
    "hoardrun_lock_pair(uuid, uuid, bigint, text, boolean)": r"""
CREATE FUNCTION hoardrun_lock_pair(
    p_debit uuid, p_credit uuid, p_amount bigint, p_currency text, p_allow_frozen boolean,
    OUT pair_currency text, OUT debit_user uuid, OUT credit_user uuid)
LANGUAGE plpgsql AS $$
DECLARE
    r accounts%%ROWTYPE;
    d accounts%%ROWTYPE;
    c accounts%%ROWTYPE;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'HR001', MESSAGE = 'amount must be greater than zero';
    END IF;
    IF p_debit = p_credit THEN
        RAISE EXCEPTION USING ERRCODE = 'HR004',
            MESSAGE = 'source and destination are the same account';
    END IF;
    -- Lock in id order: the one global order that makes deadlock impossible.
    FOR r IN SELECT * FROM accounts a WHERE a.id IN (p_debit, p_credit) ORDER BY a.id FOR UPDATE
    LOOP
        IF r.id = p_debit THEN d := r; ELSE c := r; END IF;
    END LOOP;
    IF d.id IS NULL OR c.id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    IF d.status <> 'active' AND NOT (p_allow_frozen AND d.status = 'suspended') THEN
        RAISE EXCEPTION USING ERRCODE = 'HR002',
            MESSAGE = 'account ' || d.id || ' is ' || d.status;
    END IF;
    IF c.status <> 'active' AND NOT (p_allow_frozen AND c.status = 'suspended') THEN
        RAISE EXCEPTION USING ERRCODE = 'HR002',
            MESSAGE = 'account ' || c.id || ' is ' || c.status;
    END IF;
    IF d.currency <> c.currency OR (p_currency IS NOT NULL AND p_currency <> d.currency) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR003',
            MESSAGE = 'currency mismatch: ' || d.currency || ' / ' || c.currency
                      || coalesce(' / requested ' || p_currency, '');
    END IF;
    IF d.type <> 'settlement' AND d.balance - p_amount < -d.overdraft_limit THEN
        RAISE EXCEPTION USING ERRCODE = 'HR001', MESSAGE = 'insufficient funds';
    END IF;
    pair_currency := d.currency;
    debit_user := d.user_id;
    credit_user := c.user_id;
END
$$""",
    "hoardrun_apply_pair(uuid, uuid, uuid, bigint, text, text, text, text, uuid, uuid, "
    "uuid, text, text, uuid, uuid, uuid)": r"""
CREATE FUNCTION hoardrun_apply_pair(
    p_movement uuid, p_debit uuid, p_credit uuid, p_amount bigint, p_currency text,
    p_debit_type text, p_credit_type text, p_description text,
    p_transfer uuid, p_p2p uuid, p_card uuid, p_merchant_name text, p_merchant_category text,
    p_reverses_debit uuid, p_reverses_credit uuid, p_refund_of uuid)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    r hoardrun_posting;
BEGIN
    -- Callers have locked both rows with hoardrun_lock_pair in this transaction.
    -- The clock is read after the locks (now() is the transaction's start), so
    -- one account's entries sort by time in the order their balances were written.
    r.posted_at := clock_timestamp();
    UPDATE accounts SET balance = balance - p_amount, updated_at = now()
     WHERE id = p_debit RETURNING balance INTO r.debit_balance;
    UPDATE accounts SET balance = balance + p_amount, updated_at = now()
     WHERE id = p_credit RETURNING balance INTO r.credit_balance;
    r.debit_entry := gen_random_uuid();
    r.credit_entry := gen_random_uuid();
    INSERT INTO transactions (id, account_id, movement_id, type, direction, amount, currency,
                              balance_after, description, merchant_name, merchant_category,
                              card_id, transfer_id, p2p_id, reverses_id, reference, status,
                              refund_of_id, created_at)
    VALUES (r.debit_entry, p_debit, p_movement, p_debit_type, 'outbound', p_amount, p_currency,
            r.debit_balance, p_description, p_merchant_name, p_merchant_category,
            p_card, p_transfer, p_p2p, p_reverses_debit,
            'E' || replace(r.debit_entry::text, '-', ''), 'completed', NULL, r.posted_at),
           (r.credit_entry, p_credit, p_movement, p_credit_type, 'inbound', p_amount, p_currency,
            r.credit_balance, p_description, p_merchant_name, p_merchant_category,
            p_card, p_transfer, p_p2p, p_reverses_credit,
            'E' || replace(r.credit_entry::text, '-', ''), 'completed', p_refund_of, r.posted_at);
    r.movement_id := p_movement;
    r.currency := p_currency;
    r.amount := p_amount;
    r.debit_account := p_debit;
    r.credit_account := p_credit;
    RETURN r;
END
$$""",
    "hoardrun_cash(uuid, uuid, uuid, bigint, text, boolean, text)": r"""
CREATE FUNCTION hoardrun_cash(
    p_movement uuid, p_user uuid, p_account uuid, p_amount bigint, p_currency text,
    p_inbound boolean, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    v_currency text;
    v_owner uuid;
    v_settlement uuid;
    k record;
BEGIN
    SELECT a.currency, a.user_id INTO v_currency, v_owner FROM accounts a
     WHERE a.id = p_account AND a.type <> 'settlement';
    IF v_currency IS NULL OR (p_user IS NOT NULL AND v_owner IS DISTINCT FROM p_user) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    v_settlement := hoardrun_settlement_account(v_currency);
    IF p_inbound THEN
        k := hoardrun_lock_pair(v_settlement, p_account, p_amount, p_currency, false);
        RETURN hoardrun_apply_pair(
            p_movement, v_settlement, p_account, p_amount, k.pair_currency, 'settlement', 'deposit',
            p_description, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
    ELSE
        k := hoardrun_lock_pair(p_account, v_settlement, p_amount, p_currency, false);
        RETURN hoardrun_apply_pair(
            p_movement, p_account, v_settlement, p_amount, k.pair_currency, 'withdrawal', 'settlement',
            p_description, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
    END IF;
END
$$""",
    "hoardrun_transfer(uuid, uuid, uuid, uuid, bigint, text, text, text)": r"""
CREATE FUNCTION hoardrun_transfer(
    p_id uuid, p_user uuid, p_from uuid, p_to uuid, p_amount bigint, p_currency text,
    p_reference text, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    k record;
BEGIN
    k := hoardrun_lock_pair(p_from, p_to, p_amount, p_currency, false);
    IF k.debit_user IS DISTINCT FROM p_user OR k.credit_user IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    INSERT INTO transfers (id, user_id, from_account_id, to_account_id, amount, currency,
                           reference, description, status, completed_at)
    VALUES (p_id, p_user, p_from, p_to, p_amount, k.pair_currency, p_reference, p_description,
            'completed', now());
    RETURN hoardrun_apply_pair(
        p_id, p_from, p_to, p_amount, k.pair_currency, 'transfer_out', 'transfer_in', p_description,
        p_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
END
$$""",
    "hoardrun_p2p(uuid, uuid, uuid, uuid, bigint, text, text, text)": r"""
CREATE FUNCTION hoardrun_p2p(
    p_id uuid, p_sender uuid, p_sender_account uuid, p_recipient_account uuid,
    p_amount bigint, p_currency text, p_reference text, p_note text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    k record;
BEGIN
    k := hoardrun_lock_pair(p_sender_account, p_recipient_account, p_amount, p_currency, false);
    IF k.debit_user IS DISTINCT FROM p_sender OR k.credit_user IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    IF k.credit_user = p_sender THEN
        RAISE EXCEPTION USING ERRCODE = 'HR004', MESSAGE = 'cannot pay yourself';
    END IF;
    INSERT INTO p2p_transactions (id, sender_id, recipient_id, sender_account_id,
                                  recipient_account_id, amount, currency, note, reference,
                                  status, completed_at)
    VALUES (p_id, p_sender, k.credit_user, p_sender_account, p_recipient_account, p_amount,
            k.pair_currency, p_note, p_reference, 'completed', now());
    RETURN hoardrun_apply_pair(
        p_id, p_sender_account, p_recipient_account, p_amount, k.pair_currency, 'p2p_out', 'p2p_in',
        p_note, NULL, p_id, NULL, NULL, NULL, NULL, NULL, NULL);
END
$$""",
    "hoardrun_reverse(uuid, uuid, text)": r"""
CREATE FUNCTION hoardrun_reverse(p_entry uuid, p_movement uuid, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    e transactions%%ROWTYPE;
    o transactions%%ROWTYPE;
    k record;
BEGIN
    SELECT * INTO e FROM transactions WHERE id = p_entry;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'entry not found';
    END IF;
    IF e.type = 'reversal' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR005', MESSAGE = 'a reversal cannot be reversed';
    END IF;
    SELECT * INTO o FROM transactions t
     WHERE t.movement_id = e.movement_id AND t.id <> e.id AND t.direction <> e.direction;
    IF NOT FOUND OR (SELECT count(*) FROM transactions WHERE movement_id = e.movement_id) <> 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'HR005',
            MESSAGE = 'only a two-entry movement can be reversed';
    END IF;
    IF EXISTS (SELECT 1 FROM transactions WHERE reverses_id IN (e.id, o.id)) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR005', MESSAGE = 'already reversed';
    END IF;
    -- Money flows back: the account that was credited is debited.
    IF e.direction = 'inbound' THEN
        k := hoardrun_lock_pair(e.account_id, o.account_id, e.amount, e.currency, true);
        RETURN hoardrun_apply_pair(
            p_movement, e.account_id, o.account_id, e.amount, e.currency, 'reversal', 'reversal',
            p_description, e.transfer_id, e.p2p_id, e.card_id, NULL, NULL, e.id, o.id, NULL);
    ELSE
        k := hoardrun_lock_pair(o.account_id, e.account_id, e.amount, e.currency, true);
        RETURN hoardrun_apply_pair(
            p_movement, o.account_id, e.account_id, e.amount, e.currency, 'reversal', 'reversal',
            p_description, e.transfer_id, e.p2p_id, e.card_id, NULL, NULL, o.id, e.id, NULL);
    END IF;
END
$$""",
}


def migrate(migrator, database, *, fake=False):
    """Install the ledger functions."""
    migrator.sql(POSTING_TYPE)
    for ddl in FUNCTIONS.values():
        migrator.sql(ddl)


def rollback(migrator, database, *, fake=False):
    """Drop the ledger functions, callers first."""
    for signature in reversed(list(FUNCTIONS)):
        migrator.sql(f"DROP FUNCTION IF EXISTS {signature}")
    migrator.sql("DROP TYPE IF EXISTS hoardrun_posting")
