"""012 card payments take the application's clock for their limit periods.

``hoardrun_card_payment`` read ``now()`` to decide which UTC day and month a
payment's daily and monthly limits count, so only the database's clock could
say what "today" is, and a test of "an earlier day of this month" had to
branch on whether today was the 1st. The function now takes ``p_at``, the
application's "now" (``hoardrun.clock``, or the clock a test pins), and
hands it to ``hoardrun_card_checks`` (migration 008), which authorizations
already call with their own ``p_now``. The entries themselves are still
stamped by the database (``clock_timestamp()`` after the locks, as every
movement's), so balances stay in time order whatever the application's clock
says.

The old ten-argument function is dropped, so no caller can skip the clock;
the rollback puts 008's definition back verbatim.

NOTE: '%%' stands for a literal percent sign (peewee passes this SQL to
psycopg2 with an empty parameter tuple).
"""

OLD_SIGNATURE = ("hoardrun_card_payment(uuid, uuid, uuid, bigint, text, text, text, text, "
                 "boolean, text)")
NEW_SIGNATURE = ("hoardrun_card_payment(uuid, uuid, uuid, bigint, text, text, text, text, "
                 "boolean, text, timestamptz)")

NEW = r"""
CREATE FUNCTION hoardrun_card_payment(
    p_movement uuid, p_user uuid, p_card uuid, p_amount bigint, p_currency text,
    p_merchant_name text, p_merchant_category text, p_channel text, p_international boolean,
    p_description text, p_at timestamptz)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    c cards%%ROWTYPE;
    v_currency text;
    v_settlement uuid;
    k record;
BEGIN
    IF p_at IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'p_at: the time of the payment';
    END IF;
    -- Card rules (lock, status, expiry, channel, limits counting active
    -- holds) in one place, shared with authorizations; the periods are the
    -- UTC day and month of p_at, the application's clock.
    c := hoardrun_card_checks(p_user, p_card, p_amount, p_channel, p_international, p_at);
    SELECT a.currency INTO v_currency FROM accounts a WHERE a.id = c.account_id;
    v_settlement := hoardrun_settlement_account(v_currency);
    k := hoardrun_lock_pair(c.account_id, v_settlement, p_amount, p_currency, false);
    RETURN hoardrun_apply_pair(
        p_movement, c.account_id, v_settlement, p_amount, k.pair_currency, 'payment', 'settlement',
        p_description, NULL, NULL, p_card, p_merchant_name, p_merchant_category, NULL, NULL, NULL);
END
$$"""

# 008's definition, verbatim: the rollback restores it.
PREVIOUS = r"""
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
$$"""


def migrate(migrator, database, *, fake=False):
    """Replace the card payment function by one that takes the application's clock."""
    migrator.sql(f"DROP FUNCTION {OLD_SIGNATURE}")
    migrator.sql(NEW)


def rollback(migrator, database, *, fake=False):
    """Put 008's clockless card payment function back."""
    migrator.sql(f"DROP FUNCTION IF EXISTS {NEW_SIGNATURE}")
    migrator.sql(PREVIOUS)
