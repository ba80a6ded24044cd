"""004 ledger fixes: one clock per movement, reversals that respect refunds and
holdings, frozen refunds refused, house-favoured trade rounding, one cap on
every amount, reversed transfers and P2P payments that say so.

- Time: a transfer or P2P row and its two entries carry one timestamp, read
  once after the locks (hoardrun_apply_pair_at takes it as a parameter), so
  the 201 body and every later GET agree to the microsecond.
- Ownership first: hoardrun_transfer and hoardrun_p2p check who owns the
  accounts (immutable columns, so no lock is needed) before any status,
  currency or funds check, so another user's account answers exactly like a
  missing one (HR404 'account not found').
- Card payments: a reversal of a card entry takes the card row lock, the one
  payments and refunds take, so reversal and refund are serialised. A
  reversed payment cannot be refunded (HR019); a reversal of a payment gives
  back only what its (unreversed) refunds have not (HR005 when nothing is
  left). Refunds obey frozen accounts like every movement (HR002).
- Trades: a trade entry cannot be reversed (HR005): the holding would not
  follow and the shares could then be sold for money from nothing; the
  opposite order is the way back. Trade entries now record the symbol and
  quantity they moved, so db.verify checks each holding against the trades
  that made it (existing trade entries are backfilled from the description
  the ledger wrote: 'Buy <quantity> <symbol>').
- Rounding: cash legs round in the house's favour, buys up (ceiling) and
  sells down (floor) to the minor unit, so no sequence of orders can farm
  rounding; holdings are valued by the sell rule (what a sale would pay now).
- Amounts: every amount a movement moves, including a trade's computed
  cash leg, is at most 10^15 minor units (hoardrun.money.MAX_MINOR_UNITS,
  frozen here as a literal); HR020 otherwise.
- Reversed movements: transfers and P2P payments get status 'reversed' and
  reversal_id, the movement id of the reversing pair.

New SQLSTATEs: HR019 payment was reversed, HR020 amount too large.

The rollback restores the previous definitions verbatim (copied from 002 and
003), drops what this migration added and turns 'reversed' rows back into
'completed' ones (the reversing entries stay; only the status is lost).

NOTE: '%%' stands for a literal percent sign (peewee passes this SQL to
psycopg2 with an empty parameter tuple).
"""

import peewee as pw

# hoardrun.money.MAX_MINOR_UNITS, frozen: the largest amount one movement moves.
MAX_MINOR_UNITS = "1000000000000000"

MOVEMENT_STATUSES_BEFORE = ('pending', 'completed', 'failed', 'cancelled')
MOVEMENT_STATUSES = MOVEMENT_STATUSES_BEFORE + ('reversed',)


def _in(column, values):
    return "{} IN ({})".format(column, ", ".join("'%s'" % v for v in values))


# Functions this migration adds (dropped by the rollback, callers first).
NEW_FUNCTIONS = {
    "hoardrun_minor_ceil(numeric, int)": r"""
CREATE FUNCTION hoardrun_minor_ceil(p_value numeric, p_exponent int) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    -- What a buyer pays: any fraction of a minor unit is charged in full.
    SELECT ceil(p_value * (10::numeric ^ p_exponent))
$$""",
    "hoardrun_minor_floor(numeric, int)": r"""
CREATE FUNCTION hoardrun_minor_floor(p_value numeric, p_exponent int) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    -- What a seller is paid (and what a holding is worth): fractions are dropped.
    SELECT floor(p_value * (10::numeric ^ p_exponent))
$$""",
    "hoardrun_apply_pair_at(uuid, uuid, uuid, bigint, text, text, text, text, uuid, uuid, "
    "uuid, text, text, uuid, uuid, uuid, timestamptz, text, numeric)": r"""
CREATE FUNCTION hoardrun_apply_pair_at(
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
$$""",
}

# Functions this migration replaces (same signatures), in dependency order.
FUNCTIONS = {
    "hoardrun_lock_pair(uuid, uuid, bigint, text, boolean)": r"""
CREATE OR REPLACE FUNCTION hoardrun_lock_pair(
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
    IF p_amount > MAX_MINOR_UNITS THEN
        RAISE EXCEPTION USING ERRCODE = 'HR020', MESSAGE = 'amount is too large';
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
    -- No account id in these messages: the other side may be another user's.
    IF d.status <> 'active' AND NOT (p_allow_frozen AND d.status = 'suspended') THEN
        RAISE EXCEPTION USING ERRCODE = 'HR002',
            MESSAGE = 'the source account is ' || d.status;
    END IF;
    IF c.status <> 'active' AND NOT (p_allow_frozen AND c.status = 'suspended') THEN
        RAISE EXCEPTION USING ERRCODE = 'HR002',
            MESSAGE = 'the destination account is ' || c.status;
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
$$""".replace("MAX_MINOR_UNITS", MAX_MINOR_UNITS),
    "hoardrun_apply_pair(uuid, uuid, uuid, bigint, text, text, text, text, uuid, uuid, "
    "uuid, text, text, uuid, uuid, uuid)": r"""
CREATE OR REPLACE FUNCTION hoardrun_apply_pair(
    p_movement uuid, p_debit uuid, p_credit uuid, p_amount bigint, p_currency text,
    p_debit_type text, p_credit_type text, p_description text,
    p_transfer uuid, p_p2p uuid, p_card uuid, p_merchant_name text, p_merchant_category text,
    p_reverses_debit uuid, p_reverses_credit uuid, p_refund_of uuid)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
BEGIN
    -- Callers have locked both rows: the clock is read after the locks.
    RETURN hoardrun_apply_pair_at(
        p_movement, p_debit, p_credit, p_amount, p_currency, p_debit_type, p_credit_type,
        p_description, p_transfer, p_p2p, p_card, p_merchant_name, p_merchant_category,
        p_reverses_debit, p_reverses_credit, p_refund_of, clock_timestamp(), NULL, NULL);
END
$$""",
    "hoardrun_transfer(uuid, uuid, uuid, uuid, bigint, text, text, text)": r"""
CREATE OR REPLACE FUNCTION hoardrun_transfer(
    p_id uuid, p_user uuid, p_from uuid, p_to uuid, p_amount bigint, p_currency text,
    p_reference text, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    k record;
    v_at timestamptz;
BEGIN
    -- Ownership before anything else: another user's account must look exactly
    -- like a missing one, not answer with its status, currency or funds. An
    -- account's owner never changes, so this needs no lock.
    IF NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = p_from AND a.user_id = p_user)
       OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = p_to AND a.user_id = p_user) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    k := hoardrun_lock_pair(p_from, p_to, p_amount, p_currency, false);
    IF k.debit_user IS DISTINCT FROM p_user OR k.credit_user IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    -- One clock reading for the row and its entries, taken after the locks.
    v_at := clock_timestamp();
    INSERT INTO transfers (id, user_id, from_account_id, to_account_id, amount, currency,
                           reference, description, status, created_at, completed_at)
    VALUES (p_id, p_user, p_from, p_to, p_amount, k.pair_currency, p_reference, p_description,
            'completed', v_at, v_at);
    RETURN hoardrun_apply_pair_at(
        p_id, p_from, p_to, p_amount, k.pair_currency, 'transfer_out', 'transfer_in', p_description,
        p_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, v_at, NULL, NULL);
END
$$""",
    "hoardrun_p2p(uuid, uuid, uuid, uuid, bigint, text, text, text)": r"""
CREATE OR REPLACE FUNCTION hoardrun_p2p(
    p_id uuid, p_sender uuid, p_sender_account uuid, p_recipient_account uuid,
    p_amount bigint, p_currency text, p_reference text, p_note text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    k record;
    v_at timestamptz;
BEGIN
    -- Ownership before anything else (owners never change, so no lock is
    -- needed): the sender's account must be the sender's and the recipient's
    -- a customer's, before any status, currency or funds check.
    IF NOT EXISTS (SELECT 1 FROM accounts a
                    WHERE a.id = p_sender_account AND a.user_id = p_sender)
       OR NOT EXISTS (SELECT 1 FROM accounts a
                       WHERE a.id = p_recipient_account AND a.user_id IS NOT NULL) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    k := hoardrun_lock_pair(p_sender_account, p_recipient_account, p_amount, p_currency, false);
    IF k.debit_user IS DISTINCT FROM p_sender OR k.credit_user IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    IF k.credit_user = p_sender THEN
        RAISE EXCEPTION USING ERRCODE = 'HR004', MESSAGE = 'cannot pay yourself';
    END IF;
    -- One clock reading for the row and its entries, taken after the locks.
    v_at := clock_timestamp();
    INSERT INTO p2p_transactions (id, sender_id, recipient_id, sender_account_id,
                                  recipient_account_id, amount, currency, note, reference,
                                  status, created_at, completed_at)
    VALUES (p_id, p_sender, k.credit_user, p_sender_account, p_recipient_account, p_amount,
            k.pair_currency, p_note, p_reference, 'completed', v_at, v_at);
    RETURN hoardrun_apply_pair_at(
        p_id, p_sender_account, p_recipient_account, p_amount, k.pair_currency, 'p2p_out', 'p2p_in',
        p_note, NULL, p_id, NULL, NULL, NULL, NULL, NULL, NULL, v_at, NULL, NULL);
END
$$""",
    "hoardrun_reverse(uuid, uuid, text)": r"""
CREATE OR REPLACE FUNCTION hoardrun_reverse(p_entry uuid, p_movement uuid, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    e transactions%%ROWTYPE;
    o transactions%%ROWTYPE;
    v_payment uuid;
    v_refunded bigint;
    v_amount bigint;
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
    -- Moving the cash back would leave the holding as it is (shares bought
    -- for nothing, or sold shares gone for nothing): place the opposite order.
    IF e.type IN ('investment_buy', 'investment_sell')
       OR o.type IN ('investment_buy', 'investment_sell') THEN
        RAISE EXCEPTION USING ERRCODE = 'HR005',
            MESSAGE = 'an investment order cannot be reversed; place the opposite order';
    END IF;
    -- A card entry: the card row lock payments and refunds take, so a refund
    -- and a reversal of one payment happen one after the other. Taken before
    -- the accounts, as they do.
    IF e.card_id IS NOT NULL THEN
        PERFORM 1 FROM cards WHERE id = e.card_id FOR UPDATE;
    END IF;
    IF EXISTS (SELECT 1 FROM transactions WHERE reverses_id IN (e.id, o.id)) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR005', MESSAGE = 'already reversed';
    END IF;
    v_amount := e.amount;
    v_payment := CASE WHEN e.type = 'payment' THEN e.id WHEN o.type = 'payment' THEN o.id END;
    IF v_payment IS NOT NULL THEN
        -- What the payment's refunds (those not reversed themselves) gave back
        -- is not given back a second time.
        SELECT coalesce(sum(t.amount), 0) INTO v_refunded
          FROM transactions t
         WHERE t.refund_of_id = v_payment AND t.type = 'refund'
           AND NOT EXISTS (SELECT 1 FROM transactions x WHERE x.reverses_id = t.id);
        IF v_refunded >= v_amount THEN
            RAISE EXCEPTION USING ERRCODE = 'HR005',
                MESSAGE = 'the payment was refunded in full; nothing is left to reverse';
        END IF;
        v_amount := v_amount - v_refunded;
    END IF;
    -- Money flows back: the account that was credited is debited.
    IF e.direction = 'inbound' THEN
        k := hoardrun_lock_pair(e.account_id, o.account_id, v_amount, e.currency, true);
    ELSE
        k := hoardrun_lock_pair(o.account_id, e.account_id, v_amount, e.currency, true);
    END IF;
    -- The movement says it was reversed, and by which movement.
    IF e.transfer_id IS NOT NULL THEN
        UPDATE transfers SET status = 'reversed', reversal_id = p_movement
         WHERE id = e.transfer_id;
    END IF;
    IF e.p2p_id IS NOT NULL THEN
        UPDATE p2p_transactions SET status = 'reversed', reversal_id = p_movement
         WHERE id = e.p2p_id;
    END IF;
    IF e.direction = 'inbound' THEN
        RETURN hoardrun_apply_pair(
            p_movement, e.account_id, o.account_id, v_amount, e.currency, 'reversal', 'reversal',
            p_description, e.transfer_id, e.p2p_id, e.card_id, NULL, NULL, e.id, o.id, NULL);
    ELSE
        RETURN hoardrun_apply_pair(
            p_movement, o.account_id, e.account_id, v_amount, e.currency, 'reversal', 'reversal',
            p_description, e.transfer_id, e.p2p_id, e.card_id, NULL, NULL, o.id, e.id, NULL);
    END IF;
END
$$""",
    "hoardrun_card_refund(uuid, uuid, uuid, bigint, text)": r"""
CREATE OR REPLACE FUNCTION hoardrun_card_refund(
    p_movement uuid, p_user uuid, p_payment uuid, p_amount bigint, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    p transactions%%ROWTYPE;
    c cards%%ROWTYPE;
    v_refunded bigint;
    v_settlement uuid;
    k record;
BEGIN
    SELECT * INTO p FROM transactions t WHERE t.id = p_payment AND t.type = 'payment';
    IF NOT FOUND OR p.card_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'payment not found';
    END IF;
    -- Same lock as payments and reversals of this card's entries: refunds and
    -- reversals of one payment are serialised, and see each other.
    SELECT * INTO c FROM cards WHERE id = p.card_id FOR UPDATE;
    IF c.user_id IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'payment not found';
    END IF;
    IF EXISTS (SELECT 1 FROM transactions t WHERE t.reverses_id = p.id) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR019',
            MESSAGE = 'the payment was reversed; nothing is left to refund';
    END IF;
    -- A refund that was itself reversed gave nothing back.
    SELECT coalesce(sum(t.amount), 0) INTO v_refunded
      FROM transactions t
     WHERE t.refund_of_id = p_payment AND t.type = 'refund'
       AND NOT EXISTS (SELECT 1 FROM transactions x WHERE x.reverses_id = t.id);
    IF v_refunded + p_amount > p.amount THEN
        RAISE EXCEPTION USING ERRCODE = 'HR015',
            MESSAGE = 'refunds would exceed the payment (' || (p.amount - v_refunded)
                      || ' minor units left to refund)';
    END IF;
    v_settlement := hoardrun_settlement_account(p.currency);
    -- A frozen account takes no money in either: no allowance for refunds.
    k := hoardrun_lock_pair(v_settlement, p.account_id, p_amount, p.currency, false);
    RETURN hoardrun_apply_pair(
        p_movement, v_settlement, p.account_id, p_amount, p.currency, 'settlement', 'refund',
        p_description, NULL, NULL, p.card_id, p.merchant_name, p.merchant_category,
        NULL, NULL, p_payment);
END
$$""",
    "hoardrun_trade(uuid, uuid, uuid, text, numeric, boolean)": r"""
CREATE OR REPLACE FUNCTION hoardrun_trade(
    p_movement uuid, p_user uuid, p_account uuid, p_symbol text, p_quantity numeric,
    p_buy boolean)
RETURNS hoardrun_trade LANGUAGE plpgsql AS $$
DECLARE
    a accounts%%ROWTYPE;
    pr instrument_prices%%ROWTYPE;
    h investments%%ROWTYPE;
    r hoardrun_trade;
    v_exact numeric;
    v_cash bigint;
    v_basis_out bigint;
    v_settlement uuid;
    k record;
BEGIN
    SELECT * INTO a FROM accounts WHERE id = p_account;
    IF NOT FOUND OR a.user_id IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    IF a.type <> 'investment' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR017', MESSAGE = 'not an investment account';
    END IF;
    SELECT * INTO pr FROM instrument_prices WHERE symbol = p_symbol;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'unknown symbol ' || p_symbol;
    END IF;
    IF pr.currency <> a.currency THEN
        RAISE EXCEPTION USING ERRCODE = 'HR003',
            MESSAGE = 'currency mismatch: ' || p_symbol || ' trades in ' || pr.currency;
    END IF;
    -- The house's favour: a buy pays any fraction of a minor unit in full, a
    -- sell drops it, so no sequence of orders can farm the rounding.
    v_exact := CASE WHEN p_buy
                    THEN hoardrun_minor_ceil(p_quantity * pr.price,
                                             hoardrun_currency_exponent(a.currency))
                    ELSE hoardrun_minor_floor(p_quantity * pr.price,
                                              hoardrun_currency_exponent(a.currency))
               END;
    IF v_exact > MAX_MINOR_UNITS THEN
        RAISE EXCEPTION USING ERRCODE = 'HR020',
            MESSAGE = 'the order''s cash amount is too large';
    END IF;
    v_cash := v_exact;
    IF v_cash <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'HR018', MESSAGE = 'order is worth less than one minor unit';
    END IF;
    v_settlement := hoardrun_settlement_account(a.currency);
    -- Accounts first, holding second: one lock order for buys and sells.
    IF p_buy THEN
        k := hoardrun_lock_pair(p_account, v_settlement, v_cash, a.currency, false);
        r.posting := hoardrun_apply_pair_at(
            p_movement, p_account, v_settlement, v_cash, a.currency, 'investment_buy',
            'settlement', 'Buy ' || p_quantity || ' ' || p_symbol,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, clock_timestamp(), p_symbol, p_quantity);
        INSERT INTO investments AS i (id, user_id, account_id, symbol, name, type, quantity,
                                      cost_basis, current_price, currency)
        VALUES (gen_random_uuid(), p_user, p_account, p_symbol, pr.name, pr.type, p_quantity,
                v_cash, pr.price, a.currency)
        ON CONFLICT (account_id, symbol) DO UPDATE
           SET quantity = i.quantity + EXCLUDED.quantity,
               cost_basis = i.cost_basis + EXCLUDED.cost_basis,
               current_price = EXCLUDED.current_price,
               updated_at = now()
        RETURNING * INTO h;
    ELSE
        k := hoardrun_lock_pair(v_settlement, p_account, v_cash, a.currency, false);
        SELECT * INTO h FROM investments i
         WHERE i.account_id = p_account AND i.symbol = p_symbol FOR UPDATE;
        IF NOT FOUND OR h.quantity < p_quantity THEN
            RAISE EXCEPTION USING ERRCODE = 'HR016',
                MESSAGE = 'holding ' || coalesce(h.quantity, 0) || ' ' || p_symbol
                          || ', cannot sell ' || p_quantity;
        END IF;
        -- The cost basis leaves in proportion to the quantity sold.
        v_basis_out := CASE WHEN h.quantity = p_quantity THEN h.cost_basis
                            ELSE hoardrun_minor_half_even(h.cost_basis * p_quantity / h.quantity, 0)
                       END;
        r.posting := hoardrun_apply_pair_at(
            p_movement, v_settlement, p_account, v_cash, a.currency, 'settlement',
            'investment_sell', 'Sell ' || p_quantity || ' ' || p_symbol,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, clock_timestamp(), p_symbol, p_quantity);
        UPDATE investments i
           SET quantity = i.quantity - p_quantity, cost_basis = i.cost_basis - v_basis_out,
               current_price = pr.price, updated_at = now()
         WHERE i.id = h.id
        RETURNING * INTO h;
    END IF;
    r.holding_id := h.id;
    r.price := pr.price;
    r.held_quantity := h.quantity;
    r.cost_basis := h.cost_basis;
    RETURN r;
END
$$""".replace("MAX_MINOR_UNITS", MAX_MINOR_UNITS),
}

# The definitions above replace, verbatim from 002 and 003: the rollback puts them back.
PREVIOUS = {
    'hoardrun_lock_pair(uuid, uuid, bigint, text, boolean)': r"""
CREATE OR REPLACE FUNCTION hoardrun_lock_pair(
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
CREATE OR REPLACE FUNCTION hoardrun_apply_pair(
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
    'hoardrun_transfer(uuid, uuid, uuid, uuid, bigint, text, text, text)': r"""
CREATE OR REPLACE FUNCTION hoardrun_transfer(
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
    'hoardrun_p2p(uuid, uuid, uuid, uuid, bigint, text, text, text)': r"""
CREATE OR REPLACE FUNCTION hoardrun_p2p(
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
    'hoardrun_reverse(uuid, uuid, text)': r"""
CREATE OR REPLACE FUNCTION hoardrun_reverse(p_entry uuid, p_movement uuid, p_description text)
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
    'hoardrun_card_refund(uuid, uuid, uuid, bigint, text)': r"""
CREATE OR REPLACE FUNCTION hoardrun_card_refund(
    p_movement uuid, p_user uuid, p_payment uuid, p_amount bigint, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    p transactions%%ROWTYPE;
    c cards%%ROWTYPE;
    v_refunded bigint;
    v_settlement uuid;
    k record;
BEGIN
    SELECT * INTO p FROM transactions t WHERE t.id = p_payment AND t.type = 'payment';
    IF NOT FOUND OR p.card_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'payment not found';
    END IF;
    -- Same lock as payments: refunds of one card's payments are serialised.
    SELECT * INTO c FROM cards WHERE id = p.card_id FOR UPDATE;
    IF c.user_id IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'payment not found';
    END IF;
    SELECT coalesce(sum(t.amount), 0) INTO v_refunded
      FROM transactions t WHERE t.refund_of_id = p_payment AND t.type = 'refund';
    IF v_refunded + p_amount > p.amount THEN
        RAISE EXCEPTION USING ERRCODE = 'HR015',
            MESSAGE = 'refunds would exceed the payment (' || (p.amount - v_refunded)
                      || ' minor units left to refund)';
    END IF;
    v_settlement := hoardrun_settlement_account(p.currency);
    k := hoardrun_lock_pair(v_settlement, p.account_id, p_amount, p.currency, true);
    RETURN hoardrun_apply_pair(
        p_movement, v_settlement, p.account_id, p_amount, p.currency, 'settlement', 'refund',
        p_description, NULL, NULL, p.card_id, p.merchant_name, p.merchant_category,
        NULL, NULL, p_payment);
END
$$""",
    'hoardrun_trade(uuid, uuid, uuid, text, numeric, boolean)': r"""
CREATE OR REPLACE FUNCTION hoardrun_trade(
    p_movement uuid, p_user uuid, p_account uuid, p_symbol text, p_quantity numeric,
    p_buy boolean)
RETURNS hoardrun_trade LANGUAGE plpgsql AS $$
DECLARE
    a accounts%%ROWTYPE;
    pr instrument_prices%%ROWTYPE;
    h investments%%ROWTYPE;
    r hoardrun_trade;
    v_cash bigint;
    v_basis_out bigint;
    v_settlement uuid;
    k record;
BEGIN
    SELECT * INTO a FROM accounts WHERE id = p_account;
    IF NOT FOUND OR a.user_id IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'account not found';
    END IF;
    IF a.type <> 'investment' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR017', MESSAGE = 'not an investment account';
    END IF;
    SELECT * INTO pr FROM instrument_prices WHERE symbol = p_symbol;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'unknown symbol ' || p_symbol;
    END IF;
    IF pr.currency <> a.currency THEN
        RAISE EXCEPTION USING ERRCODE = 'HR003',
            MESSAGE = 'currency mismatch: ' || p_symbol || ' trades in ' || pr.currency;
    END IF;
    v_cash := hoardrun_minor_half_even(p_quantity * pr.price, hoardrun_currency_exponent(a.currency));
    IF v_cash <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'HR018', MESSAGE = 'order is worth less than one minor unit';
    END IF;
    v_settlement := hoardrun_settlement_account(a.currency);
    -- Accounts first, holding second: one lock order for buys and sells.
    IF p_buy THEN
        k := hoardrun_lock_pair(p_account, v_settlement, v_cash, a.currency, false);
        r.posting := hoardrun_apply_pair(
            p_movement, p_account, v_settlement, v_cash, a.currency, 'investment_buy',
            'settlement', 'Buy ' || p_quantity || ' ' || p_symbol,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        INSERT INTO investments AS i (id, user_id, account_id, symbol, name, type, quantity,
                                      cost_basis, current_price, currency)
        VALUES (gen_random_uuid(), p_user, p_account, p_symbol, pr.name, pr.type, p_quantity,
                v_cash, pr.price, a.currency)
        ON CONFLICT (account_id, symbol) DO UPDATE
           SET quantity = i.quantity + EXCLUDED.quantity,
               cost_basis = i.cost_basis + EXCLUDED.cost_basis,
               current_price = EXCLUDED.current_price,
               updated_at = now()
        RETURNING * INTO h;
    ELSE
        k := hoardrun_lock_pair(v_settlement, p_account, v_cash, a.currency, false);
        SELECT * INTO h FROM investments i
         WHERE i.account_id = p_account AND i.symbol = p_symbol FOR UPDATE;
        IF NOT FOUND OR h.quantity < p_quantity THEN
            RAISE EXCEPTION USING ERRCODE = 'HR016',
                MESSAGE = 'holding ' || coalesce(h.quantity, 0) || ' ' || p_symbol
                          || ', cannot sell ' || p_quantity;
        END IF;
        -- The cost basis leaves in proportion to the quantity sold.
        v_basis_out := CASE WHEN h.quantity = p_quantity THEN h.cost_basis
                            ELSE hoardrun_minor_half_even(h.cost_basis * p_quantity / h.quantity, 0)
                       END;
        r.posting := hoardrun_apply_pair(
            p_movement, v_settlement, p_account, v_cash, a.currency, 'settlement',
            'investment_sell', 'Sell ' || p_quantity || ' ' || p_symbol,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        UPDATE investments i
           SET quantity = i.quantity - p_quantity, cost_basis = i.cost_basis - v_basis_out,
               current_price = pr.price, updated_at = now()
         WHERE i.id = h.id
        RETURNING * INTO h;
    END IF;
    r.holding_id := h.id;
    r.price := pr.price;
    r.held_quantity := h.quantity;
    r.cost_basis := h.cost_basis;
    RETURN r;
END
$$""",
}

TRADE_TYPES = ('investment_buy', 'investment_sell')

# (table, constraint, expression before, expression after) of the CHECKs that change.
CHECKS = (
    ("transfers", "transfers_status",
     _in("status", MOVEMENT_STATUSES_BEFORE), _in("status", MOVEMENT_STATUSES)),
    ("transfers", "transfers_completed_at",
     "(status = 'completed') = (completed_at IS NOT NULL)",
     "(status IN ('completed', 'reversed')) = (completed_at IS NOT NULL)"),
    ("p2p_transactions", "p2p_status",
     _in("status", MOVEMENT_STATUSES_BEFORE), _in("status", MOVEMENT_STATUSES)),
    ("p2p_transactions", "p2p_completed_at",
     "(status = 'completed') = (completed_at IS NOT NULL)",
     "(status IN ('completed', 'reversed')) = (completed_at IS NOT NULL)"),
)

# (table, constraint, expression) of the CHECKs this migration adds.
NEW_CHECKS = (
    ("transfers", "transfers_reversal", "(status = 'reversed') = (reversal_id IS NOT NULL)"),
    ("p2p_transactions", "p2p_reversal", "(status = 'reversed') = (reversal_id IS NOT NULL)"),
    ("transactions", "transactions_trade",
     # Every trade entry on the customer's side, and only those, says what it moved.
     f"(quantity IS NOT NULL) = ({_in('type', TRADE_TYPES)}) "
     "AND (symbol IS NOT NULL) = (quantity IS NOT NULL) AND (quantity IS NULL OR quantity > 0)"),
)

# Trade entries written before this migration: the ledger wrote their
# description as 'Buy <quantity> <symbol>' / 'Sell <quantity> <symbol>'.
BACKFILL_TRADES = f"""
UPDATE transactions
   SET quantity = split_part(description, ' ', 2)::numeric,
       symbol = split_part(description, ' ', 3)
 WHERE {_in('type', TRADE_TYPES)}"""

# Transfers and P2P payments reversed before this migration say so too.
BACKFILL_REVERSED = """
UPDATE {table} m
   SET status = 'reversed',
       reversal_id = (SELECT r.movement_id FROM transactions o
                        JOIN transactions r ON r.reverses_id = o.id
                       WHERE o.movement_id = m.id LIMIT 1)
 WHERE m.status = 'completed'
   AND EXISTS (SELECT 1 FROM transactions o JOIN transactions r ON r.reverses_id = o.id
                WHERE o.movement_id = m.id)"""


def _is_postgres(database):
    if isinstance(database, pw.DatabaseProxy):
        database = database.obj
    return isinstance(database, pw.PostgresqlDatabase)


def _reversal_field():
    return pw.UUIDField(null=True)


def migrate(migrator, database, *, fake=False):
    """Add the reversal link and trade quantities, then the fixed ledger functions."""
    migrator.add_fields("transfers", reversal_id=_reversal_field())
    migrator.add_fields("p2p_transactions", reversal_id=_reversal_field())
    migrator.add_fields(
        "transactions", symbol=pw.CharField(max_length=12, null=True),
        quantity=pw.DecimalField(max_digits=24, decimal_places=8, auto_round=False, null=True))
    if not _is_postgres(database):
        return
    # The one UPDATE of ledger entries ever: filling the two new columns of
    # existing trades from what the ledger itself wrote (amounts untouched).
    migrator.sql("ALTER TABLE transactions DISABLE TRIGGER transactions_append_only")
    migrator.sql(BACKFILL_TRADES)
    migrator.sql("ALTER TABLE transactions ENABLE TRIGGER transactions_append_only")
    for table, name, _, after in CHECKS:
        migrator.sql(f"ALTER TABLE {table} DROP CONSTRAINT {name}, "
                     f"ADD CONSTRAINT {name} CHECK ({after})")
    for table in ("transfers", "p2p_transactions"):
        migrator.sql(BACKFILL_REVERSED.format(table=table))
    for table, name, expression in NEW_CHECKS:
        migrator.sql(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({expression})")
    for ddl in NEW_FUNCTIONS.values():
        migrator.sql(ddl)
    for ddl in FUNCTIONS.values():
        migrator.sql(ddl)


def rollback(migrator, database, *, fake=False):
    """Put 002/003's functions back, drop the new ones, then the new columns.

    A reversed transfer or P2P payment becomes 'completed' again (its
    reversing entries stay, so the books still balance).
    """
    if _is_postgres(database):
        for ddl in PREVIOUS.values():
            migrator.sql(ddl)
        for signature in reversed(list(NEW_FUNCTIONS)):
            migrator.sql(f"DROP FUNCTION IF EXISTS {signature}")
        for table, name, _ in reversed(NEW_CHECKS):
            migrator.sql(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        for table in ("transfers", "p2p_transactions"):
            migrator.sql(f"UPDATE {table} SET status = 'completed', reversal_id = NULL "
                         "WHERE status = 'reversed'")
        for table, name, before, _ in reversed(CHECKS):
            migrator.sql(f"ALTER TABLE {table} DROP CONSTRAINT {name}, "
                         f"ADD CONSTRAINT {name} CHECK ({before})")
    migrator.remove_fields("transactions", "symbol", "quantity")
    migrator.remove_fields("p2p_transactions", "reversal_id")
    migrator.remove_fields("transfers", "reversal_id")
