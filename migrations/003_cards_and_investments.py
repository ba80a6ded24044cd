"""003 cards and investments: the sandbox price list and their ledger functions.

Card payments lock the card row FOR UPDATE before anything else, so
concurrent payments on one card are serialised and the daily and monthly
limits hold under any concurrency; the account and settlement rows are then
locked in id order by hoardrun_lock_pair, as for every movement.

Trades lock the accounts first and the holding second (the same order for
buy and sell), move cash through hoardrun_apply_pair and change the holding
in the same transaction. Cash legs are quantity x price rounded to the minor
unit half-to-even, the one rule money.round_to_minor also applies.

New SQLSTATEs: HR010 card not active, HR011 card expired, HR012 channel
disabled, HR013 daily limit, HR014 monthly limit, HR015 refund exceeds
payment, HR016 insufficient holding, HR017 not an investment account,
HR018 order too small.

NOTE: '%%' stands for a literal percent sign (peewee passes this SQL to
psycopg2 with an empty parameter tuple).
"""

import peewee as pw
from peewee import SQL

INVESTMENT_TYPES = ('stock', 'etf', 'bond', 'mutual_fund', 'crypto')
CURRENCY_CODES = ('AED', 'AUD', 'BHD', 'BRL', 'CAD', 'CHF', 'CLP', 'CNY', 'CZK', 'DKK', 'EUR',
                  'GBP', 'GHS', 'HKD', 'INR', 'ISK', 'JOD', 'JPY', 'KES', 'KRW', 'KWD', 'MXN',
                  'NGN', 'NOK', 'NZD', 'OMR', 'PLN', 'SEK', 'SGD', 'TND', 'USD', 'ZAR')
ZERO_DECIMAL_CURRENCIES = ('CLP', 'ISK', 'JPY', 'KRW')
THREE_DECIMAL_CURRENCIES = ('BHD', 'JOD', 'KWD', 'OMR', 'TND')


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


class InstrumentPrice(FrozenModel):
    symbol = pw.CharField(max_length=12, primary_key=True)
    name = pw.CharField(max_length=200)
    type = pw.CharField(max_length=16)
    currency = pw.CharField(max_length=3)
    price = pw.DecimalField(max_digits=24, decimal_places=8, auto_round=False)
    updated_at = TimestampTZ(constraints=[SQL("DEFAULT CURRENT_TIMESTAMP")])

    class Meta:
        table_name = "instrument_prices"
        constraints = [
            _check("instrument_prices_symbol",
                   "length(symbol) BETWEEN 1 AND 12 AND symbol = upper(symbol)"),
            _check("instrument_prices_type", _in("type", INVESTMENT_TYPES)),
            _check("instrument_prices_currency_iso", _in("currency", CURRENCY_CODES)),
            _check("instrument_prices_price_positive", "price > 0"),
        ]


FUNCTIONS = {
    "hoardrun_currency_exponent(text)": f"""
CREATE FUNCTION hoardrun_currency_exponent(p_currency text) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN {_in('p_currency', ZERO_DECIMAL_CURRENCIES)} THEN 0
                WHEN {_in('p_currency', THREE_DECIMAL_CURRENCIES)} THEN 3
                ELSE 2 END
$$""",
    "hoardrun_minor_half_even(numeric, int)": r"""
CREATE FUNCTION hoardrun_minor_half_even(p_value numeric, p_exponent int) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    -- round() on numeric rounds halves away from zero; ties go to even here.
    SELECT CASE WHEN abs(s - trunc(s)) = 0.5 THEN (2 * round(s / 2))::bigint
                ELSE round(s)::bigint END
      FROM (SELECT p_value * (10::numeric ^ p_exponent) AS s) scaled
$$""",
    "hoardrun_card_payment(uuid, uuid, uuid, bigint, text, text, text, text, boolean, text)": r"""
CREATE FUNCTION hoardrun_card_payment(
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
    "hoardrun_card_refund(uuid, uuid, uuid, bigint, text)": r"""
CREATE FUNCTION hoardrun_card_refund(
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
    "hoardrun_trade(uuid, uuid, uuid, text, numeric, boolean)": r"""
CREATE FUNCTION hoardrun_trade(
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

TRADE_TYPE = """
CREATE TYPE hoardrun_trade AS (
    posting hoardrun_posting, holding_id uuid, price numeric, held_quantity numeric,
    cost_basis bigint)"""


def migrate(migrator, database, *, fake=False):
    """Create the price list and install the card and trade functions."""
    migrator.create_model(InstrumentPrice)
    migrator.sql(TRADE_TYPE)
    for ddl in FUNCTIONS.values():
        migrator.sql(ddl)


def rollback(migrator, database, *, fake=False):
    """Drop the functions and their type, then the price list."""
    for signature in reversed(list(FUNCTIONS)):
        migrator.sql(f"DROP FUNCTION IF EXISTS {signature}")
    migrator.sql("DROP TYPE IF EXISTS hoardrun_trade")
    migrator.remove_model(InstrumentPrice)
