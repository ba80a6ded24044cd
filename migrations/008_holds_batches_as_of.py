"""008 Ledger II: card authorizations as two-phase holds, atomic multi-leg payments.

Holds (``card_holds``): an authorization reserves money on a card's account
without moving it. A hold is ``active`` until it is ``captured`` (once, for
at most its amount; the rest is released), ``voided`` or ``expired``; a
trigger refuses any change to a hold that is no longer active, so a hold is
resolved at most once whatever races to resolve it, and its amount, card,
account and times never change.

How much is held: COMPUTED, not stored. ``hoardrun_held(account, at)`` sums
the account's active holds whose ``expires_at`` is after ``at``, through the
partial index ``card_holds_active_account`` (only active holds are in it,
so it stays small however long the history grows). A stored per-account
total would keep counting a hold past its expiry until a sweep ran (or
every debit would have to sweep, taking hold-row locks after the account
lock, the reverse of capture's order); computed, an expired hold stops
counting at the instant it expires, with or without ``invoke
ledger.expire-holds``, which only records the expiry (``status='expired'``,
``resolved_at = expires_at``). Every funds check counts holds:
``hoardrun_lock_pair`` (used by withdrawals, transfers, P2P, card payments,
captures and trade buys) is redefined to refuse a debit that would take
``balance - held`` below ``-overdraft_limit`` (``hoardrun_funds_ok``, which
authorizations use too), and a batch starts each debited account's running
balance at ``balance - held``. Each of those checks runs under
the account row lock (FOR UPDATE) that authorizations take too, so two holds
can never both fit in money that is only there once.

Clocks: a hold's ``created_at``, ``expires_at`` and ``resolved_at`` are the
APP's clock (``p_now``, passed by hoardrun.holds, pinned by tests through
``create_app(clock=...)``); ledger entries keep the database's clock
(``clock_timestamp()`` after the locks). Authorize, capture, void, the
sweep and the account views compare expiry with the ``p_now`` they are
given; ``hoardrun_lock_pair`` has no app time and compares with
``clock_timestamp()``. In production the two clocks agree (NTP); a test that
wants a hold expired for every check authorizes it with a clock pinned in
the past.

Card limits: ``hoardrun_card_checks`` is the one copy of the card rules
(owner, status, expiry, channel, daily and monthly limits); spent is what
left the account on the card in the period less what came back, PLUS the
card's active holds authorized in the period. Card payments (redefined to
call it) and authorizations both use it, with the card row locked first.

Captures post exactly like a card payment (a ``payment`` entry carrying the
card and merchant against the settlement account), so migration 004's
refund and reversal rules apply to them unchanged. The hold records the
capture's movement id (UNIQUE).

Batches: ``hoardrun_batch`` moves up to 100 legs (transfers between the
caller's accounts, or P2P payments into other users' accounts) in one call:
every account of every leg is locked FOR UPDATE in id order by one loop,
every leg is checked against running balances (so a later leg sees the
earlier ones), and either every leg posts or the call raises HR030 with
each failing leg's index, SQLSTATE-style code and side in its DETAIL (JSON).
Each leg is its own transfer or P2P movement (two entries, reversible like
any other), stamped with its own strictly increasing time.

Balance as of T reads ``balance_after`` of the account's last entry at or
before T: one backward seek of the existing index
``transactions_account_id_created_at_id`` (account_id, created_at, id) from
migration 001, so no index is added for it.

New SQLSTATEs: HR030 batch refused, HR031 authorization already resolved,
HR032 authorization expired, HR033 capture exceeds the authorization.

Functions replaced (CREATE OR REPLACE, same signatures): hoardrun_lock_pair
(from 004) and hoardrun_card_payment (from 003); the rollback puts those
definitions back verbatim. hoardrun_settlement_account and
hoardrun_apply_pair_at are called, never redefined.

NOTE: '%%' stands for a literal percent sign (peewee passes this SQL to
psycopg2 with an empty parameter tuple).
"""

import uuid

import peewee as pw
from peewee import SQL

# hoardrun.money.MAX_MINOR_UNITS, frozen: the largest amount one movement moves.
MAX_MINOR_UNITS = "1000000000000000"
HOLD_STATUSES = ('active', 'captured', 'voided', 'expired')
CHANNELS = ('online', 'contactless', 'chip')
CURRENCY_CODES = ('AED', 'AUD', 'BHD', 'BRL', 'CAD', 'CHF', 'CLP', 'CNY', 'CZK', 'DKK', 'EUR',
                  'GBP', 'GHS', 'HKD', 'INR', 'ISK', 'JOD', 'JPY', 'KES', 'KRW', 'KWD', 'MXN',
                  'NGN', 'NOK', 'NZD', 'OMR', 'PLN', 'SEK', 'SGD', 'TND', 'USD', 'ZAR')


def _in(column, values):
    return "{} IN ({})".format(column, ", ".join("'%s'" % v for v in values))


def _check(name, expression):
    return SQL(f"CONSTRAINT {name} CHECK ({expression})")


class TimestampTZ(pw.Field):
    field_type = "TIMESTAMPTZ"


class FrozenModel(pw.Model):
    # As hoardrun.db.BaseModel: index names follow table names.
    class Meta:
        legacy_table_names = False


class User(FrozenModel):
    id = pw.UUIDField(primary_key=True)

    class Meta:
        table_name = "users"


class Account(FrozenModel):
    id = pw.UUIDField(primary_key=True)

    class Meta:
        table_name = "accounts"


class Card(FrozenModel):
    id = pw.UUIDField(primary_key=True)

    class Meta:
        table_name = "cards"


class CardHold(FrozenModel):
    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="card_holds", on_delete="RESTRICT")
    card = pw.ForeignKeyField(Card, backref="holds", on_delete="RESTRICT")
    account = pw.ForeignKeyField(Account, backref="holds", on_delete="RESTRICT")
    amount = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    status = pw.CharField(max_length=16, default="active", constraints=[SQL("DEFAULT 'active'")])
    captured_amount = pw.BigIntegerField(null=True)
    capture_movement_id = pw.UUIDField(null=True, unique=True)
    merchant_name = pw.CharField(max_length=200)
    merchant_category = pw.CharField(max_length=64)
    channel = pw.CharField(max_length=16)
    international = pw.BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])
    description = pw.CharField(max_length=500, null=True)
    created_at = TimestampTZ()
    expires_at = TimestampTZ()
    resolved_at = TimestampTZ(null=True)

    class Meta:
        table_name = "card_holds"
        constraints = [
            _check("card_holds_amount_positive", "amount > 0"),
            _check("card_holds_currency_iso", _in("currency", CURRENCY_CODES)),
            _check("card_holds_status", _in("status", HOLD_STATUSES)),
            _check("card_holds_channel", _in("channel", CHANNELS)),
            _check("card_holds_captured",
                   "(status = 'captured') = (captured_amount IS NOT NULL)"
                   " AND (status = 'captured') = (capture_movement_id IS NOT NULL)"
                   " AND (captured_amount IS NULL OR captured_amount BETWEEN 1 AND amount)"),
            _check("card_holds_resolved",
                   "(status = 'active') = (resolved_at IS NULL)"
                   " AND (resolved_at IS NULL OR resolved_at >= created_at)"),
            _check("card_holds_expiry",
                   "expires_at > created_at AND expires_at <= created_at + interval '30 days'"),
        ]
        indexes = (
            (("card", "created_at"), False),
            (("account", "created_at"), False),
        )


# Only active holds: what the funds check sums, and what the sweep looks for.
CardHold.add_index(CardHold.index(CardHold.account, CardHold.expires_at,
                                  where=(CardHold.status == "active"),
                                  name="card_holds_active_account"))
CardHold.add_index(CardHold.index(CardHold.expires_at, where=(CardHold.status == "active"),
                                  name="card_holds_active_expiry"))

GUARD_FUNCTION = r"""
CREATE FUNCTION hoardrun_card_hold_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A hold is resolved once: after that it is history, like an entry.
    IF TG_OP = 'DELETE' OR OLD.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'restrict_violation',
            MESSAGE = 'card_holds: a resolved hold cannot change (' || TG_OP || ' refused)';
    END IF;
    IF NEW.amount <> OLD.amount OR NEW.card_id <> OLD.card_id
       OR NEW.account_id <> OLD.account_id OR NEW.user_id <> OLD.user_id
       OR NEW.currency <> OLD.currency OR NEW.created_at <> OLD.created_at
       OR NEW.expires_at <> OLD.expires_at THEN
        RAISE EXCEPTION USING ERRCODE = 'restrict_violation',
            MESSAGE = 'card_holds: only the resolution of a hold can change';
    END IF;
    RETURN NEW;
END
$$"""
GUARD_TRIGGER = ("CREATE TRIGGER card_holds_resolve_once BEFORE UPDATE OR DELETE ON card_holds "
                 "FOR EACH ROW EXECUTE FUNCTION hoardrun_card_hold_guard()")

CAPTURE_TYPE = "CREATE TYPE hoardrun_capture AS (hold card_holds, posting hoardrun_posting)"

# Functions this migration adds (dropped by the rollback, callers last in this order).
NEW_FUNCTIONS = {
    "hoardrun_held(uuid, timestamptz)": r"""
CREATE FUNCTION hoardrun_held(p_account uuid, p_at timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    -- What active holds reserve on the account at p_at: an expired hold counts
    -- for nothing from its expires_at on, swept or not.
    SELECT coalesce(sum(h.amount), 0)::bigint FROM card_holds h
     WHERE h.account_id = p_account AND h.status = 'active' AND h.expires_at > p_at
$$""",
    "hoardrun_funds_ok(uuid, bigint, bigint, bigint, timestamptz)": r"""
CREATE FUNCTION hoardrun_funds_ok(p_account uuid, p_balance bigint, p_overdraft bigint,
                                  p_amount bigint, p_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
    -- The one funds rule: a debit may not take the balance, less what is held,
    -- below minus the overdraft limit. Callers hold the account row lock.
    SELECT p_balance - hoardrun_held(p_account, p_at) - p_amount >= -p_overdraft
$$""",
    "hoardrun_card_checks(uuid, uuid, bigint, text, boolean, timestamptz)": r"""
CREATE FUNCTION hoardrun_card_checks(
    p_user uuid, p_card uuid, p_amount bigint, p_channel text, p_international boolean,
    p_at timestamptz)
RETURNS cards LANGUAGE plpgsql AS $$
DECLARE
    c cards%%ROWTYPE;
    v_day bigint;
    v_month bigint;
    v_held_day bigint;
    v_held_month bigint;
    v_day_start timestamptz := date_trunc('day', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_month_start timestamptz := date_trunc('month', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
BEGIN
    -- The card row lock serialises every payment and authorization on this
    -- card: the limits below are checked against spending nobody else can
    -- change meanwhile. Taken before any account lock, always.
    SELECT * INTO c FROM cards WHERE id = p_card FOR UPDATE;
    IF NOT FOUND OR c.user_id IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'card not found';
    END IF;
    IF c.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR010', MESSAGE = 'card is ' || c.status;
    END IF;
    -- Valid through the last day of the expiry month, UTC.
    IF p_at >= make_timestamptz(c.expiry_year, c.expiry_month, 1, 0, 0, 0, 'UTC')
               + interval '1 month' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR011', MESSAGE = 'card expired';
    END IF;
    IF (p_channel = 'online' AND NOT c.online_enabled)
       OR (p_channel = 'contactless' AND NOT c.contactless_enabled)
       OR (p_international AND NOT c.international_enabled) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR012',
            MESSAGE = CASE WHEN p_international AND NOT c.international_enabled
                           THEN 'international payments are disabled on this card'
                           ELSE p_channel || ' payments are disabled on this card' END;
    END IF;
    -- Spent: what left the account on this card, less what came back ...
    SELECT coalesce(sum(CASE WHEN t.created_at >= v_day_start THEN
                             CASE t.direction WHEN 'outbound' THEN t.amount ELSE -t.amount END
                        END), 0),
           coalesce(sum(CASE t.direction WHEN 'outbound' THEN t.amount ELSE -t.amount END), 0)
      INTO v_day, v_month
      FROM transactions t
     WHERE t.card_id = p_card AND t.account_id = c.account_id AND t.created_at >= v_month_start;
    -- ... plus what its active holds of the period reserve.
    SELECT coalesce(sum(h.amount) FILTER (WHERE h.created_at >= v_day_start), 0),
           coalesce(sum(h.amount), 0)
      INTO v_held_day, v_held_month
      FROM card_holds h
     WHERE h.card_id = p_card AND h.created_at >= v_month_start
       AND h.status = 'active' AND h.expires_at > p_at;
    IF v_day + v_held_day + p_amount > c.daily_limit THEN
        RAISE EXCEPTION USING ERRCODE = 'HR013', MESSAGE = 'daily limit exceeded';
    END IF;
    IF v_month + v_held_month + p_amount > c.monthly_limit THEN
        RAISE EXCEPTION USING ERRCODE = 'HR014', MESSAGE = 'monthly limit exceeded';
    END IF;
    RETURN c;
END
$$""",
    "hoardrun_authorize(uuid, uuid, uuid, bigint, text, text, text, text, boolean, text, "
    "interval, timestamptz)": r"""
CREATE FUNCTION hoardrun_authorize(
    p_hold uuid, p_user uuid, p_card uuid, p_amount bigint, p_currency text,
    p_merchant_name text, p_merchant_category text, p_channel text, p_international boolean,
    p_description text, p_expires_in interval, p_now timestamptz)
RETURNS card_holds LANGUAGE plpgsql AS $$
DECLARE
    c cards%%ROWTYPE;
    a accounts%%ROWTYPE;
    h card_holds%%ROWTYPE;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'HR001', MESSAGE = 'amount must be greater than zero';
    END IF;
    IF p_amount > MAX_MINOR_UNITS THEN
        RAISE EXCEPTION USING ERRCODE = 'HR020', MESSAGE = 'amount is too large';
    END IF;
    -- Card first (as payments), then its account: one lock order.
    c := hoardrun_card_checks(p_user, p_card, p_amount, p_channel, p_international, p_now);
    SELECT * INTO a FROM accounts WHERE id = c.account_id FOR UPDATE;
    IF a.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR002', MESSAGE = 'the source account is ' || a.status;
    END IF;
    IF p_currency IS NOT NULL AND p_currency <> a.currency THEN
        RAISE EXCEPTION USING ERRCODE = 'HR003',
            MESSAGE = 'currency mismatch: ' || a.currency || ' / requested ' || p_currency;
    END IF;
    -- Under the account lock every debit and authorization takes: what is
    -- held now includes every hold committed before us.
    IF NOT hoardrun_funds_ok(a.id, a.balance, a.overdraft_limit, p_amount, p_now) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR001', MESSAGE = 'insufficient funds';
    END IF;
    INSERT INTO card_holds (id, user_id, card_id, account_id, amount, currency, status,
                            merchant_name, merchant_category, channel, international,
                            description, created_at, expires_at)
    VALUES (p_hold, p_user, p_card, a.id, p_amount, a.currency, 'active', p_merchant_name,
            p_merchant_category, p_channel, p_international, p_description, p_now,
            p_now + p_expires_in)
    RETURNING * INTO h;
    RETURN h;
END
$$""".replace("MAX_MINOR_UNITS", MAX_MINOR_UNITS),
    "hoardrun_lock_hold(uuid, uuid, timestamptz)": r"""
CREATE FUNCTION hoardrun_lock_hold(p_user uuid, p_hold uuid, p_now timestamptz)
RETURNS card_holds LANGUAGE plpgsql AS $$
DECLARE
    h card_holds%%ROWTYPE;
BEGIN
    -- Under READ COMMITTED a waiter re-reads the row its rival committed, so
    -- whoever comes second sees the hold resolved: exactly one resolution.
    SELECT * INTO h FROM card_holds WHERE id = p_hold FOR UPDATE;
    IF NOT FOUND OR h.user_id IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'authorization not found';
    END IF;
    IF h.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR031',
            MESSAGE = 'the authorization was already ' || h.status;
    END IF;
    IF h.expires_at <= p_now THEN
        RAISE EXCEPTION USING ERRCODE = 'HR032',
            MESSAGE = 'the authorization expired at ' || to_char(h.expires_at AT TIME ZONE 'UTC',
                                                               'YYYY-MM-DD"T"HH24:MI:SS"Z"');
    END IF;
    RETURN h;
END
$$""",
    "hoardrun_capture(uuid, uuid, uuid, bigint, timestamptz)": r"""
CREATE FUNCTION hoardrun_capture(
    p_movement uuid, p_user uuid, p_hold uuid, p_amount bigint, p_now timestamptz)
RETURNS hoardrun_capture LANGUAGE plpgsql AS $$
DECLARE
    h card_holds%%ROWTYPE;
    r hoardrun_capture;
    v_card uuid;
    v_amount bigint;
    v_settlement uuid;
    k record;
BEGIN
    SELECT card_id INTO v_card FROM card_holds WHERE id = p_hold AND user_id = p_user;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'authorization not found';
    END IF;
    -- The card lock first, as payments, refunds and reversals of card entries.
    PERFORM 1 FROM cards WHERE id = v_card FOR UPDATE;
    h := hoardrun_lock_hold(p_user, p_hold, p_now);
    v_amount := coalesce(p_amount, h.amount);
    IF v_amount <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'HR001', MESSAGE = 'amount must be greater than zero';
    END IF;
    IF v_amount > h.amount THEN
        RAISE EXCEPTION USING ERRCODE = 'HR033',
            MESSAGE = 'the capture exceeds the authorization (' || h.amount
                      || ' minor units held)';
    END IF;
    -- Resolved before the funds check, so the hold stops reserving what the
    -- capture now debits (the rest of it is released). The card's status is
    -- not checked again: the merchant was promised this money.
    UPDATE card_holds SET status = 'captured', captured_amount = v_amount,
                          capture_movement_id = p_movement, resolved_at = p_now
     WHERE id = h.id RETURNING * INTO h;
    v_settlement := hoardrun_settlement_account(h.currency);
    k := hoardrun_lock_pair(h.account_id, v_settlement, v_amount, h.currency, false);
    r.posting := hoardrun_apply_pair(
        p_movement, h.account_id, v_settlement, v_amount, h.currency, 'payment', 'settlement',
        coalesce(h.description, h.merchant_name), NULL, NULL, h.card_id, h.merchant_name,
        h.merchant_category, NULL, NULL, NULL);
    r.hold := h;
    RETURN r;
END
$$""",
    "hoardrun_void(uuid, uuid, timestamptz)": r"""
CREATE FUNCTION hoardrun_void(p_user uuid, p_hold uuid, p_now timestamptz)
RETURNS card_holds LANGUAGE plpgsql AS $$
DECLARE
    h card_holds%%ROWTYPE;
BEGIN
    -- Only the hold row is locked: a void releases money, it debits nothing.
    h := hoardrun_lock_hold(p_user, p_hold, p_now);
    UPDATE card_holds SET status = 'voided', resolved_at = p_now
     WHERE id = h.id RETURNING * INTO h;
    RETURN h;
END
$$""",
    "hoardrun_expire_holds(timestamptz, integer)": r"""
CREATE FUNCTION hoardrun_expire_holds(p_now timestamptz, p_limit integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    -- Records what already holds: these holds stopped counting at expires_at.
    -- SKIP LOCKED: a hold being captured or voided right now is left to that.
    UPDATE card_holds h SET status = 'expired', resolved_at = h.expires_at
     WHERE h.id IN (SELECT x.id FROM card_holds x
                     WHERE x.status = 'active' AND x.expires_at <= p_now
                     ORDER BY x.expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$""",
    "hoardrun_batch(uuid, uuid[], boolean[], uuid[], uuid[], bigint[], text[], text[])": r"""
CREATE FUNCTION hoardrun_batch(
    p_user uuid, p_ids uuid[], p_p2p boolean[], p_from uuid[], p_to uuid[],
    p_amounts bigint[], p_references text[], p_texts text[])
RETURNS SETOF hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_ids, 1), 0);
    i integer;
    f integer;
    t integer;
    r accounts%%ROWTYPE;
    v_ids uuid[] := '{}';
    v_users uuid[] := '{}';
    v_status text[] := '{}';
    v_currency text[] := '{}';
    v_balance bigint[] := '{}';
    v_overdraft bigint[] := '{}';
    v_type text[] := '{}';
    v_failures jsonb := '[]';
    v_code text;
    v_side text;
    v_message text;
    v_at timestamptz;
    v_prev timestamptz;
BEGIN
    IF n < 1 OR n > 100 OR coalesce(array_length(p_p2p, 1), 0) <> n
       OR coalesce(array_length(p_from, 1), 0) <> n OR coalesce(array_length(p_to, 1), 0) <> n
       OR coalesce(array_length(p_amounts, 1), 0) <> n
       OR coalesce(array_length(p_references, 1), 0) <> n
       OR coalesce(array_length(p_texts, 1), 0) <> n THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a batch has 1 to 100 legs';
    END IF;
    -- Every account of every leg, locked in id order by one loop: the one
    -- global order, so no batch deadlocks with another or with any movement.
    FOR r IN SELECT * FROM accounts a WHERE a.id = ANY (p_from || p_to) ORDER BY a.id FOR UPDATE
    LOOP
        v_ids := array_append(v_ids, r.id);
        v_users := array_append(v_users, r.user_id);
        v_status := array_append(v_status, r.status::text);
        v_currency := array_append(v_currency, r.currency::text);
        -- Holds reserve money on a debited account: it starts at balance - held.
        v_balance := array_append(v_balance, CASE WHEN r.id = ANY (p_from)
            THEN r.balance - hoardrun_held(r.id, clock_timestamp()) ELSE r.balance END);
        v_overdraft := array_append(v_overdraft, r.overdraft_limit);
        v_type := array_append(v_type, r.type::text);
    END LOOP;
    -- Legs in order against running balances; every failing leg is named.
    FOR i IN 1 .. n LOOP
        f := array_position(v_ids, p_from[i]);
        t := array_position(v_ids, p_to[i]);
        v_code := NULL;
        v_side := NULL;
        IF p_amounts[i] IS NULL OR p_amounts[i] <= 0 THEN
            v_code := 'HR001'; v_message := 'amount must be greater than zero';
        ELSIF p_amounts[i] > MAX_MINOR_UNITS THEN
            v_code := 'HR020'; v_message := 'amount is too large';
        ELSIF p_from[i] = p_to[i] THEN
            v_code := 'HR004'; v_message := 'source and destination are the same account';
        ELSIF f IS NULL OR v_users[f] IS DISTINCT FROM p_user OR v_type[f] = 'settlement' THEN
            v_code := 'HR404'; v_side := 'source'; v_message := 'account not found';
        ELSIF t IS NULL OR v_users[t] IS NULL
              OR (NOT p_p2p[i] AND v_users[t] <> p_user) THEN
            v_code := 'HR404'; v_side := 'destination'; v_message := 'account not found';
        ELSIF p_p2p[i] AND v_users[t] = p_user THEN
            v_code := 'HR004'; v_side := 'destination'; v_message := 'cannot pay yourself';
        ELSIF v_status[f] <> 'active' THEN
            v_code := 'HR002'; v_side := 'source';
            v_message := 'the source account is ' || v_status[f];
        ELSIF v_status[t] <> 'active' THEN
            v_code := 'HR002'; v_side := 'destination';
            v_message := 'the destination account is ' || v_status[t];
        ELSIF v_currency[f] <> v_currency[t] THEN
            v_code := 'HR003'; v_side := 'destination';
            v_message := 'currency mismatch: ' || v_currency[f] || ' / ' || v_currency[t];
        ELSIF v_balance[f] - p_amounts[i] < -v_overdraft[f] THEN
            v_code := 'HR001'; v_side := 'source'; v_message := 'insufficient funds';
        END IF;
        IF v_code IS NULL THEN
            v_balance[f] := v_balance[f] - p_amounts[i];
            v_balance[t] := v_balance[t] + p_amounts[i];
        ELSE
            v_failures := v_failures || jsonb_build_object(
                'index', i - 1, 'code', v_code, 'side', v_side, 'message', v_message);
        END IF;
    END LOOP;
    IF jsonb_array_length(v_failures) > 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'HR030', MESSAGE = 'the batch was refused',
            DETAIL = v_failures::text;
    END IF;
    FOR i IN 1 .. n LOOP
        f := array_position(v_ids, p_from[i]);
        t := array_position(v_ids, p_to[i]);
        -- Each leg its own, strictly later instant: an account's entries sort
        -- by (created_at, id) in the order their balances were written.
        v_at := clock_timestamp();
        IF v_prev IS NOT NULL AND v_at <= v_prev THEN
            v_at := v_prev + interval '1 microsecond';
        END IF;
        v_prev := v_at;
        IF p_p2p[i] THEN
            INSERT INTO p2p_transactions (id, sender_id, recipient_id, sender_account_id,
                                          recipient_account_id, amount, currency, note,
                                          reference, status, created_at, completed_at)
            VALUES (p_ids[i], p_user, v_users[t], p_from[i], p_to[i], p_amounts[i],
                    v_currency[f], p_texts[i], p_references[i], 'completed', v_at, v_at);
            RETURN NEXT hoardrun_apply_pair_at(
                p_ids[i], p_from[i], p_to[i], p_amounts[i], v_currency[f], 'p2p_out', 'p2p_in',
                p_texts[i], NULL, p_ids[i], NULL, NULL, NULL, NULL, NULL, NULL, v_at, NULL, NULL);
        ELSE
            INSERT INTO transfers (id, user_id, from_account_id, to_account_id, amount,
                                   currency, reference, description, status, created_at,
                                   completed_at)
            VALUES (p_ids[i], p_user, p_from[i], p_to[i], p_amounts[i], v_currency[f],
                    p_references[i], p_texts[i], 'completed', v_at, v_at);
            RETURN NEXT hoardrun_apply_pair_at(
                p_ids[i], p_from[i], p_to[i], p_amounts[i], v_currency[f], 'transfer_out',
                'transfer_in', p_texts[i], p_ids[i], NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                v_at, NULL, NULL);
        END IF;
    END LOOP;
END
$$""".replace("MAX_MINOR_UNITS", MAX_MINOR_UNITS),
}

# Functions this migration replaces (same signatures).
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
    -- Card holds reserve money: what they hold is not there to spend. No app
    -- time reaches this function, so expiry is judged by the database clock.
    IF d.type <> 'settlement'
       AND NOT hoardrun_funds_ok(d.id, d.balance, d.overdraft_limit, p_amount,
                                 clock_timestamp()) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR001', MESSAGE = 'insufficient funds';
    END IF;
    pair_currency := d.currency;
    debit_user := d.user_id;
    credit_user := c.user_id;
END
$$""".replace("MAX_MINOR_UNITS", MAX_MINOR_UNITS),
    "hoardrun_card_payment(uuid, uuid, uuid, bigint, text, text, text, text, boolean, text)": r"""
CREATE OR REPLACE FUNCTION hoardrun_card_payment(
    p_movement uuid, p_user uuid, p_card uuid, p_amount bigint, p_currency text,
    p_merchant_name text, p_merchant_category text, p_channel text, p_international boolean,
    p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    c cards%%ROWTYPE;
    v_currency text;
    v_settlement uuid;
    k record;
BEGIN
    -- Card rules (lock, status, expiry, channel, limits counting active
    -- holds) in one place, shared with authorizations.
    c := hoardrun_card_checks(p_user, p_card, p_amount, p_channel, p_international, now());
    SELECT a.currency INTO v_currency FROM accounts a WHERE a.id = c.account_id;
    v_settlement := hoardrun_settlement_account(v_currency);
    k := hoardrun_lock_pair(c.account_id, v_settlement, p_amount, p_currency, false);
    RETURN hoardrun_apply_pair(
        p_movement, c.account_id, v_settlement, p_amount, k.pair_currency, 'payment', 'settlement',
        p_description, NULL, NULL, p_card, p_merchant_name, p_merchant_category, NULL, NULL, NULL);
END
$$""",
}

# What FUNCTIONS replace, verbatim (hoardrun_lock_pair from 004, hoardrun_card_payment
# from 003): the rollback puts them back.
PREVIOUS = {
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
    "hoardrun_card_payment(uuid, uuid, uuid, bigint, text, text, text, text, boolean, text)": r"""
CREATE OR REPLACE FUNCTION hoardrun_card_payment(
    p_movement uuid, p_user uuid, p_card uuid, p_amount bigint, p_currency text,
    p_merchant_name text, p_merchant_category text, p_channel text, p_international boolean,
    p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    c cards%%ROWTYPE;
    v_currency text;
    v_settlement uuid;
    v_day bigint;
    v_month bigint;
    v_day_start timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_month_start timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    k record;
BEGIN
    -- The card row lock serialises every payment on this card: the limits
    -- below are checked against spending nobody else can change meanwhile.
    SELECT * INTO c FROM cards WHERE id = p_card FOR UPDATE;
    IF NOT FOUND OR c.user_id IS DISTINCT FROM p_user THEN
        RAISE EXCEPTION USING ERRCODE = 'HR404', MESSAGE = 'card not found';
    END IF;
    IF c.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR010', MESSAGE = 'card is ' || c.status;
    END IF;
    -- Valid through the last day of the expiry month, UTC.
    IF now() >= make_timestamptz(c.expiry_year, c.expiry_month, 1, 0, 0, 0, 'UTC')
                + interval '1 month' THEN
        RAISE EXCEPTION USING ERRCODE = 'HR011', MESSAGE = 'card expired';
    END IF;
    IF (p_channel = 'online' AND NOT c.online_enabled)
       OR (p_channel = 'contactless' AND NOT c.contactless_enabled)
       OR (p_international AND NOT c.international_enabled) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR012',
            MESSAGE = CASE WHEN p_international AND NOT c.international_enabled
                           THEN 'international payments are disabled on this card'
                           ELSE p_channel || ' payments are disabled on this card' END;
    END IF;
    -- Spent: what left the account on this card, less what came back.
    SELECT coalesce(sum(CASE WHEN t.created_at >= v_day_start THEN
                             CASE t.direction WHEN 'outbound' THEN t.amount ELSE -t.amount END
                        END), 0),
           coalesce(sum(CASE t.direction WHEN 'outbound' THEN t.amount ELSE -t.amount END), 0)
      INTO v_day, v_month
      FROM transactions t
     WHERE t.card_id = p_card AND t.account_id = c.account_id AND t.created_at >= v_month_start;
    IF v_day + p_amount > c.daily_limit THEN
        RAISE EXCEPTION USING ERRCODE = 'HR013', MESSAGE = 'daily limit exceeded';
    END IF;
    IF v_month + p_amount > c.monthly_limit THEN
        RAISE EXCEPTION USING ERRCODE = 'HR014', MESSAGE = 'monthly limit exceeded';
    END IF;
    SELECT a.currency INTO v_currency FROM accounts a WHERE a.id = c.account_id;
    v_settlement := hoardrun_settlement_account(v_currency);
    k := hoardrun_lock_pair(c.account_id, v_settlement, p_amount, p_currency, false);
    RETURN hoardrun_apply_pair(
        p_movement, c.account_id, v_settlement, p_amount, k.pair_currency, 'payment', 'settlement',
        p_description, NULL, NULL, p_card, p_merchant_name, p_merchant_category, NULL, NULL, NULL);
END
$$""",
}

def migrate(migrator, database, *, fake=False):
    """Create card_holds with its guard trigger, then the new and replaced functions."""
    migrator.create_model(CardHold)
    migrator.sql(GUARD_FUNCTION)
    migrator.sql(GUARD_TRIGGER)
    migrator.sql(CAPTURE_TYPE)
    for ddl in NEW_FUNCTIONS.values():
        migrator.sql(ddl)
    for ddl in FUNCTIONS.values():
        migrator.sql(ddl)


def rollback(migrator, database, *, fake=False):
    """Put the replaced functions back, drop the new ones, the type, the trigger, the table."""
    for ddl in PREVIOUS.values():
        migrator.sql(ddl)
    for signature in reversed(list(NEW_FUNCTIONS)):
        migrator.sql(f"DROP FUNCTION IF EXISTS {signature}")
    migrator.sql("DROP TYPE IF EXISTS hoardrun_capture")
    migrator.sql("DROP TRIGGER IF EXISTS card_holds_resolve_once ON card_holds")
    migrator.sql("DROP FUNCTION IF EXISTS hoardrun_card_hold_guard()")
    migrator.remove_model(CardHold)
