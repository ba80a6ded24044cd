"""The database itself enforces every rule, so raw SQL cannot break the books.

Each rule is proved with raw SQL through ``db.execute_sql`` (no model code in
the way): a valid row is accepted, the same row with
one value broken is refused with ``peewee.IntegrityError`` naming the rule.
"""

import uuid
from datetime import datetime, timedelta, timezone

import peewee as pw
import pytest

from hoardrun import models
from hoardrun.db import UTCDateTimeField

# ---------------------------------------------------------------------------
# Raw SQL helpers
# ---------------------------------------------------------------------------


def run(database, statement, params=()):
    """Execute ``statement``, written with ``?`` placeholders (short to read in tables)."""
    return database.execute_sql(statement.replace("?", "%s"), list(params))


def insert(database, table, row):
    columns = ", ".join(f'"{c}"' for c in row)
    marks = ", ".join("?" for _ in row)
    run(database, f"INSERT INTO {table} ({columns}) VALUES ({marks})", row.values())


def count(database, table, where="1 = 1", params=()):
    return run(database, f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]


def refused(database, statement, params=()):
    """Run ``statement`` in a savepoint; return the IntegrityError it must raise."""
    with pytest.raises(pw.IntegrityError) as info:
        with database.atomic():  # rolls back, so PostgreSQL's transaction stays usable
            run(database, statement, params)
    return str(info.value)


def refused_insert(database, table, row):
    columns = ", ".join(f'"{c}"' for c in row)
    marks = ", ".join("?" for _ in row)
    return refused(database, f"INSERT INTO {table} ({columns}) VALUES ({marks})", row.values())


def new_id():
    # The form peewee's UUIDField writes.
    return uuid.uuid4().hex


def digits(n):
    return str(uuid.uuid4().int)[:n]


# ---------------------------------------------------------------------------
# A small world of valid rows
# ---------------------------------------------------------------------------

WHEN = "2024-05-06 07:08:09"


def _user(w):
    tag = uuid.uuid4().hex[:10]
    return {"id": new_id(), "email": f"ann.{tag}@example.com", "first_name": "Ann",
            "last_name": "Lee", "password_hash": "argon2-hash"}


def _account(w):
    return {"id": new_id(), "user_id": w.alice, "account_number": digits(12),
            "name": "Everyday", "type": "checking", "currency": "USD"}


def _card(w):
    return {"id": new_id(), "user_id": w.alice, "account_id": w.a1, "type": "debit",
            "cardholder_name": "ANN LEE", "number_encrypted": "gAAAA-opaque",
            "number_fingerprint": uuid.uuid4().hex * 2, "last_four": "4242",
            "masked_number": "**** **** **** 4242", "expiry_month": 12, "expiry_year": 2030,
            "daily_limit": 100_000, "monthly_limit": 500_000}


def _transfer(w):
    return {"id": new_id(), "user_id": w.alice, "from_account_id": w.a1,
            "to_account_id": w.a2, "amount": 1234, "currency": "USD",
            "reference": "TRF" + digits(12), "completed_at": WHEN}


def _p2p(w):
    return {"id": new_id(), "sender_id": w.alice, "recipient_id": w.bob,
            "sender_account_id": w.a1, "recipient_account_id": w.b1, "amount": 500,
            "currency": "USD", "reference": "P2P" + digits(12), "completed_at": WHEN}


def _entry(w):
    return {"id": new_id(), "account_id": w.a1, "movement_id": new_id(), "type": "deposit",
            "direction": "inbound", "amount": 1000, "currency": "USD", "balance_after": 1000,
            "reference": "ENT" + digits(16)}


def _investment(w):
    return {"id": new_id(), "user_id": w.alice, "account_id": w.a1, "symbol": "AAPL",
            "name": "Apple Inc.", "type": "stock", "quantity": "1.5",
            "current_price": "189.25", "currency": "USD"}


def _price(w):
    return {"symbol": "T" + uuid.uuid4().hex[:8].upper(), "name": "Test Fund", "type": "etf",
            "currency": "USD", "price": "101.5"}


def _token(w):
    return {"id": new_id(), "user_id": w.alice, "token_hash": uuid.uuid4().hex * 2,
            "expires_at": WHEN}


def _idempotency(w):
    return {"id": new_id(), "user_id": w.alice, "key": "key-" + uuid.uuid4().hex,
            "request_hash": "0" * 64}


def _audit(w):
    return {"id": new_id(), "action": "account.open", "entity_type": "account",
            "entity_id": w.a1}


def _email_code(w):
    return {"id": new_id(), "user_id": w.alice, "purpose": "verify_email",
            "email": "ann@example.com", "code_hash": uuid.uuid4().hex * 2,
            "expires_at": "2100-01-01 00:00:00"}


def _hold(w):
    return {"id": new_id(), "user_id": w.alice, "card_id": w.add("cards"), "account_id": w.a1,
            "amount": 2500, "currency": "USD", "merchant_name": "Hotel",
            "merchant_category": "7011", "channel": "chip", "created_at": WHEN,
            "expires_at": "2024-05-13 07:08:09"}


def _mail(w):
    return {"id": new_id(), "recipient": "ann@example.com", "subject": "Your code",
            "body": "opaque"}


VALID = {
    "users": _user, "accounts": _account, "cards": _card, "transfers": _transfer,
    "p2p_transactions": _p2p, "transactions": _entry, "investments": _investment,
    "instrument_prices": _price, "auth_tokens": _token, "idempotency_keys": _idempotency,
    "audit_log": _audit, "email_codes": _email_code, "mail_outbox": _mail,
    "card_holds": _hold,
}
#: The key column of each table (a natural key where a table has one).
KEYS = {m._meta.table_name: m._meta.primary_key.column_name for m in models.MODELS}


def stored(database, table, row):
    """How many rows with ``row``'s key are in ``table`` (0 or 1)."""
    key = KEYS[table]
    return count(database, table, f"{key} = ?", [row[key]])


class World:
    """Alice (primary a1, a2) and Bob (primary b1), all USD, inserted by raw SQL."""

    def __init__(self, database):
        self.database = database
        self.alice = self.add("users")
        self.bob = self.add("users")
        self.a1 = self.add("accounts", is_primary=True)
        self.a2 = self.add("accounts", name="Savings", type="savings")
        self.b1 = self.add("accounts", user_id=self.bob, is_primary=True)

    def row(self, table, **overrides):
        """A valid row for ``table`` with ``overrides``; callables get (world, row)."""
        row = VALID[table](self)
        for key, value in overrides.items():
            row[key] = value(self, row) if callable(value) else value
        return row

    def add(self, table, **overrides):
        row = self.row(table, **overrides)
        insert(self.database, table, row)
        return row[KEYS[table]]


@pytest.fixture
def world(database):
    return World(database)


# ---------------------------------------------------------------------------
# CHECK constraints: one broken value each
# ---------------------------------------------------------------------------


def bad(table, constraint, **overrides):
    shown = ",".join(f"{k}={v!r}" for k, v in overrides.items() if not callable(v))
    return pytest.param(table, overrides, constraint, id=f"{constraint}[{shown}]")


A1 = lambda w, r: w.a1  # noqa: E731
ALICE = lambda w, r: w.alice  # noqa: E731
SELF = lambda w, r: r["id"]  # noqa: E731

CHECK_CASES = [
    # card holds (migration 008)
    bad("card_holds", "card_holds_amount_positive", amount=0),
    bad("card_holds", "card_holds_captured", status="captured", resolved_at=WHEN),
    bad("card_holds", "card_holds_captured", captured_amount=100),
    bad("card_holds", "card_holds_captured", status="captured", resolved_at=WHEN,
        captured_amount=2501, capture_movement_id=lambda w, r: new_id()),
    bad("card_holds", "card_holds_channel", channel="atm"),
    bad("card_holds", "card_holds_currency_iso", currency="XXX"),
    bad("card_holds", "card_holds_expiry", expires_at="2024-06-30 00:00:00"),
    bad("card_holds", "card_holds_expiry", expires_at=WHEN),
    bad("card_holds", "card_holds_resolved", resolved_at=WHEN),
    bad("card_holds", "card_holds_resolved", status="voided"),
    bad("card_holds", "card_holds_status", status="pending", resolved_at=WHEN),
    # email ownership (migration 007)
    bad("users", "users_pending_email", pending_email="nobody"),
    bad("users", "users_pending_email", pending_email=lambda w, r: r["email"]),
    bad("email_codes", "email_codes_attempts", attempts=-1),
    bad("email_codes", "email_codes_expiry", expires_at="2000-01-01 00:00:00"),
    bad("email_codes", "email_codes_hash_hex", code_hash="abc123"),
    bad("email_codes", "email_codes_purpose", purpose="login"),
    bad("mail_outbox", "mail_outbox_attempts", attempts=-1),
    bad("mail_outbox", "mail_outbox_sent_at", status="sent"),
    bad("mail_outbox", "mail_outbox_sent_at", sent_at=WHEN),
    bad("mail_outbox", "mail_outbox_status", status="lost"),
    # reversed movements and trade entries (migration 004)
    bad("transfers", "transfers_reversal", status="reversed"),
    bad("p2p_transactions", "p2p_reversal", status="reversed"),
    bad("transactions", "transactions_trade", quantity="1"),
    bad("transactions", "transactions_trade", type="investment_buy", direction="outbound"),
    # users
    bad("users", "users_email_lower", email="Ann@Example.com"),
    bad("users", "users_email_lower", email="ann.example.com"),
    bad("users", "users_email_lower", email="a@"),
    bad("users", "users_names_present", first_name="  "),
    bad("users", "users_names_present", last_name=""),
    bad("users", "users_phone_e164", phone="14155552671"),
    bad("users", "users_phone_e164", phone="+04155552671"),
    bad("users", "users_phone_e164", phone="+1 415 555 2671"),
    bad("users", "users_phone_e164", phone="+1-415-5552671"),
    bad("users", "users_phone_e164", phone="+1415555267a"),
    bad("users", "users_phone_e164", phone="+1"),
    bad("users", "users_phone_e164", phone=""),
    bad("users", "users_role", role="superuser"),
    bad("users", "users_role", role="Admin"),
    bad("users", "users_status", status="banned"),
    bad("users", "users_status", status="ACTIVE"),
    bad("users", "users_country_iso", country="us"),
    bad("users", "users_country_iso", country="U1"),
    bad("users", "users_country_iso", country="U"),
    bad("users", "users_failed_logins", failed_logins=-1),
    # accounts
    bad("accounts", "accounts_type", type="premium"),
    bad("accounts", "accounts_type", type="Checking"),
    bad("accounts", "accounts_owner", user_id=None),
    bad("accounts", "accounts_owner", type="settlement", currency="EUR"),
    bad("accounts", "accounts_status", status="frozen"),
    bad("accounts", "accounts_currency_iso", currency="usd"),
    bad("accounts", "accounts_currency_iso", currency="XXX"),
    bad("accounts", "accounts_number_digits", account_number="1234567"),
    bad("accounts", "accounts_number_digits", account_number="12345678AB"),
    bad("accounts", "accounts_name_present", name="   "),
    bad("accounts", "accounts_overdraft_nonnegative", overdraft_limit=-1, balance=5),
    bad("accounts", "accounts_minimum_nonnegative", minimum_balance=-1),
    bad("accounts", "accounts_interest_rate", interest_rate="-0.0001"),
    bad("accounts", "accounts_interest_rate", interest_rate="100.0001"),
    bad("accounts", "accounts_balance_floor", balance=-1),
    bad("accounts", "accounts_balance_floor", balance=-10_001, overdraft_limit=10_000),
    bad("accounts", "accounts_primary_owner", type="settlement", user_id=None,
        currency="GBP", is_primary=True),
    bad("accounts", "accounts_closed_at", status="closed"),
    bad("accounts", "accounts_closed_at", closed_at=WHEN),
    # cards
    bad("cards", "cards_type", type="gold"),
    bad("cards", "cards_status", status="frozen"),
    bad("cards", "cards_last_four", last_four="*424", masked_number="**** **** **** *424"),
    bad("cards", "cards_masked_hides_number", masked_number="**** **** **** 1111"),
    bad("cards", "cards_masked_hides_number", masked_number="4242 4242 4242 4242"),
    bad("cards", "cards_masked_hides_number", masked_number="4242 42** **** 4242"),
    bad("cards", "cards_masked_hides_number", masked_number="XXXX XXXX XXXX 4242"),
    bad("cards", "cards_expiry_month", expiry_month=0),
    bad("cards", "cards_expiry_month", expiry_month=13),
    bad("cards", "cards_expiry_year", expiry_year=1999),
    bad("cards", "cards_expiry_year", expiry_year=2101),
    bad("cards", "cards_daily_limit_positive", daily_limit=0),
    bad("cards", "cards_monthly_covers_daily", daily_limit=500, monthly_limit=499),
    bad("cards", "cards_failed_pin_attempts", failed_pin_attempts=-1),
    bad("cards", "cards_failed_pin_attempts", failed_pin_attempts=11),
    # transfers
    bad("transfers", "transfers_distinct_accounts", to_account_id=A1),
    bad("transfers", "transfers_amount_positive", amount=0),
    bad("transfers", "transfers_amount_positive", amount=-100),
    bad("transfers", "transfers_fee_nonnegative", fee=-1),
    bad("transfers", "transfers_currency_iso", currency="usd"),
    bad("transfers", "transfers_status", status="done", completed_at=None),
    bad("transfers", "transfers_completed_at", completed_at=None),
    bad("transfers", "transfers_completed_at", status="pending"),
    # p2p payments
    bad("p2p_transactions", "p2p_distinct_users", recipient_id=ALICE),
    bad("p2p_transactions", "p2p_distinct_accounts", recipient_account_id=A1),
    bad("p2p_transactions", "p2p_amount_positive", amount=0),
    bad("p2p_transactions", "p2p_transactions_currency_iso", currency="usd"),
    bad("p2p_transactions", "p2p_status", status="sent", completed_at=None),
    bad("p2p_transactions", "p2p_completed_at", completed_at=None),
    # ledger entries
    bad("transactions", "transactions_type", type="gift"),
    bad("transactions", "transactions_direction", direction="in"),
    bad("transactions", "transactions_direction", direction="Inbound"),
    bad("transactions", "transactions_amount_positive", amount=0),
    bad("transactions", "transactions_amount_positive", amount=-1000),
    bad("transactions", "transactions_currency_iso", currency="usd"),
    bad("transactions", "transactions_status", status="reversed"),
    bad("transactions", "transactions_not_self_reversal", reverses_id=SELF),
    # investments
    bad("investments", "investments_symbol", symbol="aapl"),
    bad("investments", "investments_symbol", symbol=""),
    bad("investments", "investments_type", type="nft"),
    bad("investments", "investments_quantity_nonnegative", quantity="-0.00000001"),
    bad("investments", "investments_cost_basis_nonnegative", cost_basis=-1),
    bad("investments", "investments_price_nonnegative", current_price="-0.01"),
    bad("investments", "investments_currency_iso", currency="usd"),
    # the sandbox price list
    bad("instrument_prices", "instrument_prices_symbol", symbol="voo"),
    bad("instrument_prices", "instrument_prices_symbol", symbol=""),
    bad("instrument_prices", "instrument_prices_type", type="nft"),
    bad("instrument_prices", "instrument_prices_currency_iso", currency="usd"),
    bad("instrument_prices", "instrument_prices_price_positive", price="0"),
    bad("instrument_prices", "instrument_prices_price_positive", price="-1"),
    # supporting tables
    bad("auth_tokens", "auth_tokens_hash_hex", token_hash="abc123"),
    bad("idempotency_keys", "idempotency_keys_key_present", key=""),
    bad("audit_log", "audit_log_action_present", action=""),
]


@pytest.mark.parametrize("table, overrides, constraint", CHECK_CASES)
def test_check_constraint_refuses_raw_insert(database, world, table, overrides, constraint):
    """A row breaking one rule is refused by the named CHECK; the valid row is accepted."""
    row = world.row(table, **overrides)
    message = refused_insert(database, table, row)
    assert constraint in message
    assert stored(database, table, row) == 0

    # Control: the same row without the broken value is accepted, so the
    # refusal above came from the rule under test and not from the fixture.
    valid = world.row(table)
    insert(database, table, valid)
    assert stored(database, table, valid) == 1


def check_constraint_names(database):
    rows = run(database, "SELECT conname FROM pg_constraint "
                         "WHERE contype = 'c' AND connamespace = 'public'::regnamespace")
    return {name for (name,) in rows}


def test_every_check_constraint_is_proved_here(database):
    """Each CHECK in the schema has a refusal case above (a new rule needs one)."""
    covered = {p.values[2] for p in CHECK_CASES}
    assert check_constraint_names(database) == covered


GOOD_CASES = [
    ("users", {"phone": "+14155552671"}),
    ("users", {"phone": "+442071838750"}),
    ("users", {"phone": "+123456789012345"}),  # 15 digits, E.164's maximum
    ("users", {"phone": "+491"}),
    ("users", {"phone": None, "country": None}),
    ("users", {"country": "GB"}),
    ("users", {"role": "admin", "status": "pending"}),
    ("accounts", {"balance": -10_000, "overdraft_limit": 10_000}),  # exactly at the floor
    ("accounts", {"type": "settlement", "user_id": None, "currency": "JPY",
                  "balance": -10 ** 15}),  # settlement mirrors the world: no floor
    ("accounts", {"status": "closed", "closed_at": WHEN}),
    ("accounts", {"currency": "KWD", "interest_rate": "100"}),
    ("cards", {"masked_number": "4242 **** **** 4242"}),
    ("cards", {"masked_number": "************4242"}),
    ("cards", {"daily_limit": 1, "monthly_limit": 1}),
    ("transfers", {"status": "pending", "completed_at": None}),
    ("p2p_transactions", {"status": "failed", "completed_at": None}),
    ("transactions", {"type": "withdrawal", "direction": "outbound", "balance_after": -50}),
    ("investments", {"quantity": "0", "current_price": "0"}),
]


@pytest.mark.parametrize("table, overrides", GOOD_CASES,
                         ids=[f"{t}{o}" for t, o in GOOD_CASES])
def test_valid_edge_values_are_accepted(database, world, table, overrides):
    """Values at the edge of each rule are still accepted (the rules are not too strict)."""
    row = world.row(table, **overrides)
    insert(database, table, row)
    assert stored(database, table, row) == 1


def test_overlong_phone_is_refused(database, world):
    """E.164 allows at most 15 digits; PostgreSQL's varchar(16) refuses more."""
    row = world.row("users", phone="+1234567890123456")
    with pytest.raises((pw.IntegrityError, pw.DataError)):
        with database.atomic():
            insert(database, "users", row)
    assert count(database, "users", "id = ?", [row["id"]]) == 0


UPDATE_CASES = [
    pytest.param("accounts", "a2", "balance = -1", "accounts_balance_floor", id="overdraw"),
    pytest.param("accounts", "a2", "overdraft_limit = 100, balance = -101",
                 "accounts_balance_floor", id="past-overdraft"),
    pytest.param("accounts", "a2", "user_id = NULL", "accounts_owner", id="orphan-account"),
    pytest.param("accounts", "a2", "currency = 'usd'", "accounts_currency_iso", id="currency"),
    pytest.param("accounts", "a2", "status = 'closed'", "accounts_closed_at", id="close"),
    pytest.param("users", "alice", "email = 'ANN@EXAMPLE.COM'", "users_email_lower", id="email"),
    pytest.param("users", "alice", "role = 'root'", "users_role", id="role"),
]


@pytest.mark.parametrize("table, target, assignment, constraint", UPDATE_CASES)
def test_check_constraint_refuses_raw_update(database, world, table, target, assignment,
                                             constraint):
    """An UPDATE cannot break a rule an INSERT could not break either."""
    row_id = getattr(world, target)
    message = refused(database, f"UPDATE {table} SET {assignment} WHERE id = ?", [row_id])
    assert constraint in message


def test_settlement_account_may_go_negative_by_update(database, world):
    """The balance floor exempts settlement accounts, which mirror money that left."""
    settlement = world.add("accounts", type="settlement", user_id=None, currency="EUR")
    run(database, "UPDATE accounts SET balance = -500000 WHERE id = ?", [settlement])
    assert run(database, "SELECT balance FROM accounts WHERE id = ?",
               [settlement]).fetchone()[0] == -500000


NOT_NULL_CASES = [
    ("users", "email"), ("users", "password_hash"), ("accounts", "currency"),
    ("accounts", "type"), ("cards", "daily_limit"), ("transfers", "amount"),
    ("p2p_transactions", "recipient_id"), ("transactions", "amount"),
    ("transactions", "balance_after"), ("transactions", "movement_id"),
    ("investments", "quantity"), ("auth_tokens", "expires_at"),
]


@pytest.mark.parametrize("table, column", NOT_NULL_CASES,
                         ids=[f"{t}.{c}" for t, c in NOT_NULL_CASES])
def test_required_column_refuses_null(database, world, table, column):
    """A required value cannot be left out by raw SQL."""
    message = refused_insert(database, table, world.row(table, **{column: None}))
    assert column in message


# ---------------------------------------------------------------------------
# Uniqueness
# ---------------------------------------------------------------------------


def unique_violation(database, table, columns, name=None):
    """What PostgreSQL says: the index's name, or the key's columns."""
    return name or "({})".format(", ".join(columns))


def test_email_is_unique(database, world):
    """A second user with the same email is refused; upper-case variants cannot sneak in."""
    email = run(database, "SELECT email FROM users WHERE id = ?", [world.alice]).fetchone()[0]
    message = refused_insert(database, "users", world.row("users", email=email))
    assert unique_violation(database, "users", ["email"]) in message
    message = refused_insert(database, "users", world.row("users", email=email.upper()))
    assert "users_email_lower" in message
    assert count(database, "users", "lower(email) = ?", [email]) == 1


def test_one_primary_account_per_user(database, world):
    """Many accounts per user, but only one primary: the partial unique index."""
    # Two more non-primary accounts are fine (UNIQUE(user_id, is_primary) would refuse).
    world.add("accounts", name="Holiday", type="savings")
    world.add("accounts", name="Business", type="business")
    assert count(database, "accounts", "user_id = ?", [world.alice]) == 4

    message = refused_insert(database, "accounts", world.row("accounts", is_primary=True))
    assert unique_violation(database, "accounts", ["user_id"],
                            "accounts_one_primary_per_user") in message
    message = refused(database, "UPDATE accounts SET is_primary = ? WHERE id = ?",
                      [True, world.a2])
    assert unique_violation(database, "accounts", ["user_id"],
                            "accounts_one_primary_per_user") in message

    # Moving the flag is allowed once the old primary lets go of it.
    with database.atomic():
        run(database, "UPDATE accounts SET is_primary = ? WHERE id = ?", [False, world.a1])
        run(database, "UPDATE accounts SET is_primary = ? WHERE id = ?", [True, world.a2])
    assert count(database, "accounts", "user_id = ? AND is_primary = ?",
                 [world.alice, True]) == 1


def test_one_settlement_account_per_currency(database, world):
    """Each currency has exactly one settlement account; customer accounts are unaffected."""
    world.add("accounts", type="settlement", user_id=None, currency="USD")
    world.add("accounts", type="settlement", user_id=None, currency="JPY")
    message = refused_insert(database, "accounts", world.row(
        "accounts", type="settlement", user_id=None, currency="USD"))
    assert unique_violation(database, "accounts", ["currency"],
                            "accounts_one_settlement_per_currency") in message
    world.add("accounts", currency="USD", name="Another USD account")
    assert count(database, "accounts", "type = 'settlement'") == 2


UNIQUE_CASES = [
    ("accounts", ["account_number"]),
    ("cards", ["number_fingerprint"]),
    ("transfers", ["reference"]),
    ("p2p_transactions", ["reference"]),
    ("transactions", ["reference"]),
    ("auth_tokens", ["token_hash"]),
]


@pytest.mark.parametrize("table, columns", UNIQUE_CASES,
                         ids=[f"{t}.{'+'.join(c)}" for t, c in UNIQUE_CASES])
def test_unique_column(database, world, table, columns):
    """A duplicate of a unique value is refused."""
    first = world.row(table)
    if table == "accounts":
        first["is_primary"] = False
    insert(database, table, first)
    second = world.row(table, **{c: first[c] for c in columns})
    message = refused_insert(database, table, second)
    assert unique_violation(database, table, columns) in message


def test_investment_symbol_unique_per_account(database, world):
    """One holding per (account, symbol); the same symbol in another account is fine."""
    world.add("investments", symbol="VOO")
    message = refused_insert(database, "investments", world.row("investments", symbol="VOO"))
    assert unique_violation(database, "investments", ["account_id", "symbol"]) in message
    world.add("investments", symbol="VOO", account_id=world.a2)
    assert count(database, "investments", "symbol = 'VOO'") == 2


def test_idempotency_key_unique_per_user(database, world):
    """A user cannot store one key twice; another user may use the same key."""
    world.add("idempotency_keys", key="pay-rent-may")
    message = refused_insert(database, "idempotency_keys",
                             world.row("idempotency_keys", key="pay-rent-may"))
    assert unique_violation(database, "idempotency_keys", ["user_id", "key"]) in message
    world.add("idempotency_keys", key="pay-rent-may", user_id=world.bob)
    assert count(database, "idempotency_keys", '"key" = ?', ["pay-rent-may"]) == 2


# ---------------------------------------------------------------------------
# Foreign keys and their ON DELETE actions
# ---------------------------------------------------------------------------


def fk_refused(database, message, name):
    return "foreign key" in message and name in message


def test_reference_to_missing_row_is_refused(database, world):
    """An account cannot belong to a user who does not exist."""
    message = refused_insert(database, "accounts", world.row("accounts", user_id=new_id()))
    assert fk_refused(database, message, "accounts_user_id_fkey")


def test_deleting_user_with_accounts_is_refused(database, world):
    """ON DELETE RESTRICT: a user who holds an account cannot vanish from under it."""
    carol = world.add("users")
    world.add("accounts", user_id=carol)
    message = refused(database, "DELETE FROM users WHERE id = ?", [carol])
    assert fk_refused(database, message, "accounts_user_id_fkey")
    assert count(database, "users", "id = ?", [carol]) == 1


def test_deleting_user_deletes_tokens_and_idempotency_keys(database, world):
    """ON DELETE CASCADE: a deleted user's tokens and stored replies go with them."""
    carol = world.add("users")
    for _ in range(2):
        world.add("auth_tokens", user_id=carol)
        world.add("idempotency_keys", user_id=carol)
    world.add("auth_tokens")  # Alice's, which must survive
    world.add("idempotency_keys")

    run(database, "DELETE FROM users WHERE id = ?", [carol])

    assert count(database, "users", "id = ?", [carol]) == 0
    assert count(database, "auth_tokens", "user_id = ?", [carol]) == 0
    assert count(database, "idempotency_keys", "user_id = ?", [carol]) == 0
    assert count(database, "auth_tokens", "user_id = ?", [world.alice]) == 1
    assert count(database, "idempotency_keys", "user_id = ?", [world.alice]) == 1


def foreign_keys(database):
    """(table, column, target table, ON DELETE) for every foreign key in the schema."""
    rows = run(database, """
        SELECT c.conrelid::regclass::text, a.attname, c.confrelid::regclass::text,
               c.confdeltype
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace""")
    actions = {"r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT",
               "a": "NO ACTION"}
    return {(t, col, ref, actions[code]) for t, col, ref, code in rows}


def test_every_foreign_key_has_an_explicit_on_delete(database):
    """Each FK says RESTRICT or CASCADE on purpose, and matches the model's declaration."""
    expected = set()
    for model in models.MODELS:
        for field in model._meta.fields.values():
            if isinstance(field, pw.ForeignKeyField):
                expected.add((model._meta.table_name, field.column_name,
                              field.rel_model._meta.table_name, field.on_delete))
    assert foreign_keys(database) == expected
    assert {action for *_, action in expected} <= {"RESTRICT", "CASCADE"}


def test_relationships_read_through_the_models(database, world):
    """Rows written by raw SQL are reachable through the model relationships."""
    world.add("cards")
    alice = models.User.get_by_id(uuid.UUID(world.alice))
    assert {a.id.hex for a in alice.accounts} == {world.a1, world.a2}
    assert [c.account.id.hex for c in alice.cards] == [world.a1]
    primary = models.Account.get(models.Account.user == alice, models.Account.is_primary)
    assert primary.id.hex == world.a1


# ---------------------------------------------------------------------------
# UUID keys, database defaults, UTC timestamps
# ---------------------------------------------------------------------------


def column_types(database, table):
    rows = run(database, "SELECT column_name, data_type FROM information_schema.columns "
                         "WHERE table_schema = 'public' AND table_name = ?", [table])
    return dict(rows)


def uuid_columns(model):
    for field in model._meta.sorted_fields:
        target = field.rel_field if isinstance(field, pw.ForeignKeyField) else field
        if isinstance(target, pw.UUIDField):
            yield field.column_name


# The price list is keyed by its ticker: one row per symbol, looked up by symbol.
NATURAL_KEYS = {"instrument_prices": "symbol"}


@pytest.mark.parametrize("model", models.MODELS, ids=lambda m: m._meta.table_name)
def test_uuid_keys_are_native_uuid_on_postgres(database, model):
    """Primary keys and references to them are `uuid` columns on PostgreSQL."""
    table = model._meta.table_name
    types = column_types(database, table)
    expected = "uuid"
    columns = list(uuid_columns(model))
    assert KEYS[table] == NATURAL_KEYS.get(table, "id")
    assert (KEYS[table] in columns) == (table not in NATURAL_KEYS)
    assert {c: types[c] for c in columns} == {c: expected for c in columns}


def test_uuid_key_round_trips_through_the_model(database, world):
    """An id written as a UUID reads back as the same UUID object."""
    user = models.User.create(email=f"uuid.{uuid.uuid4().hex[:8]}@example.com",
                              first_name="U", last_name="Id", password_hash="h")
    again = models.User.get(models.User.email == user.email)
    assert isinstance(again.id, uuid.UUID) and again.id == user.id
    stored = run(database, "SELECT pg_typeof(id)::text FROM users WHERE id = ?",
                 [user.id.hex]).fetchone()[0]
    assert stored == "uuid"


@pytest.mark.parametrize("model", models.MODELS, ids=lambda m: m._meta.table_name)
def test_timestamps_are_timestamptz(database, model):
    """Every timestamp column stores a moment with its zone (timestamptz)."""
    types = column_types(database, model._meta.table_name)
    stamps = [f.column_name for f in model._meta.sorted_fields
              if isinstance(f, UTCDateTimeField)]
    assert stamps
    expected = "timestamp with time zone"
    assert {c: types[c] for c in stamps} == {c: expected for c in stamps}


def test_database_sets_defaults_and_utc_timestamps(database, world):
    """A raw INSERT naming no defaults gets them from the database, timestamps in UTC."""
    before = datetime.now(timezone.utc).replace(microsecond=0)
    account_id = new_id()
    insert(database, "accounts", {"id": account_id, "user_id": world.bob,
                                  "account_number": digits(10), "name": "Minimal",
                                  "type": "savings", "currency": "EUR"})
    after = datetime.now(timezone.utc)

    account = models.Account.get_by_id(uuid.UUID(account_id))
    assert (account.status, account.balance, account.overdraft_limit, account.is_primary) == (
        "active", 0, 0, False)
    for stamp in (account.created_at, account.updated_at):
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        # The database clock, in UTC, not local time shifted by the zone offset.
        assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)
    assert account.closed_at is None


def test_timestamps_read_as_utc_whatever_the_session_zone(database, world):
    """A session in another zone still reads the same instant, as UTC."""
    created = models.User.get_by_id(uuid.UUID(world.alice)).created_at
    with database.atomic():
        run(database, "SET LOCAL timezone = 'Asia/Tokyo'")
        again = models.User.get_by_id(uuid.UUID(world.alice)).created_at
    assert again == created and again.utcoffset() == timedelta(0)


# ---------------------------------------------------------------------------
# Append-only tables
# ---------------------------------------------------------------------------

APPEND_ONLY = [
    pytest.param("transactions", "UPDATE transactions SET amount = 1 WHERE id = ?",
                 id="entry-update"),
    pytest.param("transactions", "UPDATE transactions SET status = 'failed' WHERE id = ?",
                 id="entry-update-status"),
    pytest.param("transactions", "DELETE FROM transactions WHERE id = ?", id="entry-delete"),
    pytest.param("audit_log", "UPDATE audit_log SET action = 'nothing' WHERE id = ?",
                 id="audit-update"),
    pytest.param("audit_log", "DELETE FROM audit_log WHERE id = ?", id="audit-delete"),
]


@pytest.mark.parametrize("table, statement", APPEND_ONLY)
def test_append_only_rows_cannot_change(database, world, table, statement):
    """Ledger entries and audit rows are refused UPDATE and DELETE by a trigger."""
    row = world.row(table)
    insert(database, table, row)
    before = run(database, f"SELECT * FROM {table} WHERE id = ?", [row["id"]]).fetchall()

    message = refused(database, statement, [row["id"]])

    assert f"{table} is append-only" in message
    assert run(database, f"SELECT * FROM {table} WHERE id = ?", [row["id"]]).fetchall() == before


def test_append_only_holds_for_the_orm_too(database, world):
    """The model cannot edit or delete an entry either: corrections are new rows."""
    entry_id = world.add("transactions")
    with pytest.raises(pw.IntegrityError):
        with database.atomic():
            (models.Transaction
             .update(amount=1)
             .where(models.Transaction.id == uuid.UUID(entry_id))
             .execute())
    with pytest.raises(pw.IntegrityError):
        with database.atomic():
            models.Transaction.delete_by_id(uuid.UUID(entry_id))

    # A reversing entry pointing at the original is how a mistake is undone.
    reversal = world.add("transactions", type="reversal", direction="outbound",
                         balance_after=0, reverses_id=entry_id)
    assert models.Transaction.get_by_id(uuid.UUID(reversal)).reverses_id == uuid.UUID(entry_id)
    assert models.Transaction.get_by_id(uuid.UUID(entry_id)).amount == 1000
