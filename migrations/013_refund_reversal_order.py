"""013 a refund cannot be reversed once its payment was reversed.

Found by attacking the API: pay 30.00, refund 10.00, reverse the payment (the
reversal gives back the 20.00 the refund had not, migration 004), then reverse
the refund: the customer lost the 10.00 again, and a fully reversed payment
cost 10.00. In the other order (refund, reverse the refund, reverse the
payment) the books ended right, so the result depended on the order.
Now reversing a refund whose payment was reversed is refused (HR005,
reversal-not-allowed): the refund stays, the payment stays reversed, and the
customer is whole either way. Both run under the card row lock (004), so a
refund reversal and a payment reversal racing each other see each other.

Only hoardrun_reverse changes; the rollback restores 004's text verbatim.

NOTE: '%%' stands for a literal percent sign (peewee passes this SQL to
psycopg2 with an empty parameter tuple).
"""

NEW = r"""
CREATE OR REPLACE FUNCTION hoardrun_reverse(p_entry uuid, p_movement uuid, p_description text)
RETURNS hoardrun_posting LANGUAGE plpgsql AS $$
DECLARE
    e transactions%%ROWTYPE;
    o transactions%%ROWTYPE;
    v_payment uuid;
    v_refund uuid;
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
    -- A refund of a payment that was reversed stays: the reversal gave back
    -- only what the refunds had not, so taking a refund back now would leave
    -- the customer short (30.00 paid, 10.00 refunded, 20.00 reversed: taking
    -- the 10.00 back made a fully reversed payment cost 10.00).
    v_refund := CASE WHEN e.type = 'refund' THEN e.id WHEN o.type = 'refund' THEN o.id END;
    IF v_refund IS NOT NULL AND EXISTS (
            SELECT 1 FROM transactions r JOIN transactions x ON x.reverses_id = r.refund_of_id
             WHERE r.id = v_refund) THEN
        RAISE EXCEPTION USING ERRCODE = 'HR005',
            MESSAGE = 'the payment this refund belongs to was reversed; the refund stays';
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
$$"""

# 004's definition, verbatim: the rollback restores it.
PREVIOUS = r"""
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
$$"""


def migrate(migrator, database, *, fake=False):
    """Refuse reversing a refund whose payment was reversed."""
    migrator.sql(NEW)


def rollback(migrator, database, *, fake=False):
    """Put 004's hoardrun_reverse back."""
    migrator.sql(PREVIOUS)
