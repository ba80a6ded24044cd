"""014 a batch writes each table once: its legs' rows, their entries, each account once.

``hoardrun_batch`` (migration 008) posted its legs one by one through
``hoardrun_apply_pair_at``: per leg two UPDATEs of accounts, two seeks of the
accounts' latest entries and one INSERT of two entries. A batch of 100 legs
between two accounts made 100 versions of each account row in one
transaction (non-HOT once the page filled, so new entries in every accounts
index and longer version chains for every later look-up, and 200 queued
commit-time checks of the same two rows) and paid the executor's per-statement
cost 300 times: about 1 ms per leg, as much as a single transfer.

Now validation is untouched (the same one lock statement, ``SELECT ... ORDER
BY id FOR UPDATE`` over every account of every leg; the same running balances
starting at ``balance - held`` for debited accounts; the same codes and the
same HR030 DETAIL naming every failing leg), and then:

1. one statement seeks each distinct account's latest entry (its seq and
   chain_hash), not one seek per leg and side;
2. one pass over the legs, in order, keeps per account in arrays the stored
   balance (``balance``, not ``balance - held``: an entry's ``balance_after``
   is the account's balance), the last seq and the last chain_hash, and
   builds each leg's two entries from them, stamped with the leg's own
   strictly increasing instant, as before;
3. one INSERT ... SELECT FROM unnest(...) writes the transfer rows, one the
   P2P rows, one all the entries (leg order, debit then credit, so one
   account's seq order is its legs' order), and one UPDATE sets each distinct
   account's balance to its final running balance (``updated_at = now()``,
   as the writer sets it);
4. the postings come back in leg order, each with the balances its leg left,
   exactly as the writer returned them.

The entries are the ones the single-movement writer would have written: the
rule that turns an entry's fields into its stored row (the reference
``'E' || id without dashes``, status ``completed``, ``chain_hash`` =
``hoardrun_entry_hash`` of the previous hash and the canonical content) moves
into ``hoardrun_entry``, which both ``hoardrun_apply_pair_at`` (redefined to
call it; otherwise unchanged: same locks assumed, same UPDATEs and seeks,
same one INSERT of its two entries) and the batch call. ``hoardrun_entry``
builds the row positionally (``ROW(...)::transactions``, the table's column
order) but hashes the fields it was given, not the row it built: a value put
in the wrong column would leave a stored row that disagrees with its own
hash, which the commit-time rule recomputes from the stored row, so the
movement would be refused (ledger_chain_hash), never stored.

Nothing about the commit-time rules changes (migration 010): every entry is
still checked for balance continuity by seq, its chain link, its currency and
its movement's balance, and each account (now one UPDATE, so one check) for
its stored balance against its latest entry. The accounts' CHECK
``accounts_balance_floor`` now sees only the final balance; every
intermediate one was already checked against ``-overdraft_limit`` by the
validation (less the holds, so more strictly).

New: hoardrun_entry. Redefined (CREATE OR REPLACE, same signatures):
hoardrun_apply_pair_at (from 010) and hoardrun_batch (from 008); the rollback
puts both back verbatim and drops hoardrun_entry.

NOTE: '%%' stands for a literal percent sign (peewee passes this SQL to
psycopg2 with an empty parameter tuple).
"""

# hoardrun.money.MAX_MINOR_UNITS, frozen: the largest amount one movement moves.
MAX_MINOR_UNITS = "1000000000000000"

# One ledger entry as stored, from its fields: the one place that says what
# an entry's reference, status and chain_hash are. The columns are in the
# table's order; the hash is of the given fields (see the docstring).
ENTRY = r"""
CREATE FUNCTION hoardrun_entry(
    p_prev bytea, p_id uuid, p_account uuid, p_seq bigint, p_movement uuid, p_type text,
    p_direction text, p_amount bigint, p_currency text, p_balance_after bigint,
    p_description text, p_merchant_name text, p_merchant_category text, p_card uuid,
    p_transfer uuid, p_p2p uuid, p_reverses uuid, p_refund_of uuid,
    p_created_at timestamptz, p_symbol text, p_quantity numeric)
RETURNS transactions LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT ROW(
        p_id, p_account, p_movement, p_type, p_direction, p_amount, p_currency,
        p_balance_after, p_description, p_merchant_name, p_merchant_category, p_card,
        p_transfer, p_p2p, p_reverses, 'E' || replace(p_id::text, '-', ''), 'completed',
        p_created_at, p_refund_of, p_symbol, p_quantity, p_seq,
        hoardrun_entry_hash(
            p_prev, p_id, p_account, p_seq, p_movement, p_type, p_direction, p_amount,
            p_currency, p_balance_after, p_description, p_merchant_name, p_merchant_category,
            p_card, p_transfer, p_p2p, p_reverses, p_refund_of,
            'E' || replace(p_id::text, '-', ''), 'completed', p_created_at, p_symbol,
            p_quantity))::transactions
$$"""

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

BATCH = r"""
CREATE OR REPLACE FUNCTION hoardrun_batch(
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
    -- Per account (indexed like v_ids): the stored balance, last seq, last hash.
    v_stored bigint[] := '{}';
    v_seq bigint[];
    v_hash bytea[];
    -- Per leg: what its rows need; the entries in leg order, debit then credit.
    v_p2p boolean[] := '{}';
    v_leg_at timestamptz[] := '{}';
    v_leg_currency text[] := '{}';
    v_leg_recipient uuid[] := '{}';
    v_entries transactions[] := '{}';
    v_debit transactions;
    v_credit transactions;
    v_postings hoardrun_posting[] := '{}';
    p hoardrun_posting;
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
        v_stored := array_append(v_stored, r.balance);
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
              OR (NOT coalesce(p_p2p[i], false) AND v_users[t] <> p_user) THEN
            v_code := 'HR404'; v_side := 'destination'; v_message := 'account not found';
        ELSIF coalesce(p_p2p[i], false) AND v_users[t] = p_user THEN
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
    -- Each account's chain head, one seek each (the row locks above keep
    -- anyone else from appending); seq 0 and no hash for an account without
    -- entries, as the writer starts it.
    SELECT array_agg(coalesce(h.seq, 0) ORDER BY a.k), array_agg(h.chain_hash ORDER BY a.k)
      INTO v_seq, v_hash
      FROM unnest(v_ids) WITH ORDINALITY AS a(id, k)
      LEFT JOIN LATERAL (SELECT x.seq, x.chain_hash FROM transactions x
                          WHERE x.account_id = a.id ORDER BY x.seq DESC LIMIT 1) h ON true;
    -- Every leg's two entries, built as hoardrun_apply_pair_at would write
    -- them one leg at a time, each account's running state carried along.
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
        -- A leg that is not a P2P payment (false, or NULL) is a transfer, validated as one.
        v_p2p[i] := coalesce(p_p2p[i], false);
        v_leg_at[i] := v_at;
        v_leg_currency[i] := v_currency[f];
        v_leg_recipient[i] := v_users[t];
        v_stored[f] := v_stored[f] - p_amounts[i];
        v_stored[t] := v_stored[t] + p_amounts[i];
        v_seq[f] := v_seq[f] + 1;
        v_seq[t] := v_seq[t] + 1;
        p.debit_entry := gen_random_uuid();
        p.credit_entry := gen_random_uuid();
        v_debit := hoardrun_entry(
            v_hash[f], p.debit_entry, p_from[i], v_seq[f], p_ids[i],
            CASE WHEN v_p2p[i] THEN 'p2p_out' ELSE 'transfer_out' END, 'outbound',
            p_amounts[i], v_currency[f], v_stored[f], p_texts[i], NULL, NULL, NULL,
            CASE WHEN NOT v_p2p[i] THEN p_ids[i] END, CASE WHEN v_p2p[i] THEN p_ids[i] END,
            NULL, NULL, v_at, NULL, NULL);
        v_credit := hoardrun_entry(
            v_hash[t], p.credit_entry, p_to[i], v_seq[t], p_ids[i],
            CASE WHEN v_p2p[i] THEN 'p2p_in' ELSE 'transfer_in' END, 'inbound',
            p_amounts[i], v_currency[f], v_stored[t], p_texts[i], NULL, NULL, NULL,
            CASE WHEN NOT v_p2p[i] THEN p_ids[i] END, CASE WHEN v_p2p[i] THEN p_ids[i] END,
            NULL, NULL, v_at, NULL, NULL);
        v_hash[f] := v_debit.chain_hash;
        v_hash[t] := v_credit.chain_hash;
        v_entries[2 * i - 1] := v_debit;
        v_entries[2 * i] := v_credit;
        p.movement_id := p_ids[i];
        p.currency := v_currency[f];
        p.amount := p_amounts[i];
        p.debit_account := p_from[i];
        p.debit_balance := v_stored[f];
        p.credit_account := p_to[i];
        p.credit_balance := v_stored[t];
        p.posted_at := v_at;
        v_postings[i] := p;
    END LOOP;
    -- The legs' own rows first (the entries reference them), in leg order.
    INSERT INTO transfers (id, user_id, from_account_id, to_account_id, amount,
                           currency, reference, description, status, created_at,
                           completed_at)
    SELECT l.id, p_user, l.src, l.dst, l.amount, l.currency, l.reference, l.body,
           'completed', l.posted, l.posted
      FROM unnest(p_ids, v_p2p, p_from, p_to, p_amounts, v_leg_currency, p_references,
                  p_texts, v_leg_at) WITH ORDINALITY
           AS l(id, p2p, src, dst, amount, currency, reference, body, posted, k)
     WHERE NOT l.p2p ORDER BY l.k;
    INSERT INTO p2p_transactions (id, sender_id, recipient_id, sender_account_id,
                                  recipient_account_id, amount, currency, note,
                                  reference, status, created_at, completed_at)
    SELECT l.id, p_user, l.recipient, l.src, l.dst, l.amount, l.currency, l.body,
           l.reference, 'completed', l.posted, l.posted
      FROM unnest(p_ids, v_p2p, v_leg_recipient, p_from, p_to, p_amounts, v_leg_currency,
                  p_texts, p_references, v_leg_at) WITH ORDINALITY
           AS l(id, p2p, recipient, src, dst, amount, currency, body, reference, posted, k)
     WHERE l.p2p ORDER BY l.k;
    INSERT INTO transactions SELECT * FROM unnest(v_entries);
    -- Each account once, at the balance its last entry leaves.
    UPDATE accounts x SET balance = s.balance, updated_at = now()
      FROM unnest(v_ids, v_stored) AS s(id, balance)
     WHERE x.id = s.id;
    RETURN QUERY SELECT * FROM unnest(v_postings);
END
$$""".replace("MAX_MINOR_UNITS", MAX_MINOR_UNITS)

# 010's definition, verbatim: the rollback puts it back.
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
# 008's definition, verbatim: the rollback puts it back.
PREVIOUS_BATCH = r"""
CREATE OR REPLACE FUNCTION hoardrun_batch(
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
$$""".replace("MAX_MINOR_UNITS", MAX_MINOR_UNITS)

def migrate(migrator, database, *, fake=False):
    """Add the entry builder, then the writer and the batch that use it."""
    migrator.sql(ENTRY)
    migrator.sql(APPLY_PAIR_AT)
    migrator.sql(BATCH)


def rollback(migrator, database, *, fake=False):
    """Put 008's batch and 010's writer back, then drop the entry builder."""
    migrator.sql(PREVIOUS_BATCH)
    migrator.sql(PREVIOUS_APPLY_PAIR_AT)
    migrator.sql("DROP FUNCTION IF EXISTS hoardrun_entry(bytea, uuid, uuid, bigint, uuid, text, "
                 "text, bigint, text, bigint, text, text, text, uuid, uuid, uuid, uuid, uuid, "
                 "timestamptz, text, numeric)")
