"""Model-based fuzzing: random sequences of money movements against a plain Python model.

A Hypothesis state machine drives the real ledger (``hoardrun.ledger`` on
PostgreSQL, and ``hoardrun.idempotency`` for keyed requests) with deposits,
withdrawals, transfers, P2P payments, card payments, refunds, reversals,
trades and idempotent replays, predicting every outcome (which refusal, or
which balances) from a model that is only dictionaries and integers. After
every step it checks: balances equal the model, every currency sums to zero,
no balance is under its overdraft, each lifecycle operation happened at most
once, replays changed nothing, ``ledger.verify()`` and the hash chain are clean.

CI runs ``FUZZ_EXAMPLES`` derandomized sequences (the same ones on every
machine); ``invoke test --long SECONDS`` (``HOARDRUN_FUZZ_SECONDS``) keeps
drawing fresh random sequences for that long. A failure prints the shrunk
sequence of steps. Holds, captures, voids and expiries are new ``@rule``s
over the same model when they exist (``Model`` keeps a movement list they
can extend).
"""

import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, rule,
                                 run_state_machine_as_test)

from hoardrun import chain, errors, idempotency, ledger
from hoardrun import db as dbm
from hoardrun import schema
from hoardrun.db import db
from hoardrun.models import Account, Card, InstrumentPrice, User
from tests.conftest import admin_url

FUZZ_EXAMPLES = 300
FUZZ_STEPS = 10
EMPTY_AFTER = 1_000  # entries
PRICE = Decimal("12.345")  # USD per unit of FUZZ: every trade needs rounding
CUSTOMERS = ("a1", "a2", "inv", "e1", "b1", "b2")
ALICE_ACCOUNTS = ("a1", "a2", "inv", "e1")
AMOUNTS = st.one_of(st.integers(1, 100), st.integers(1, 20_000), st.integers(1, 200_000))
QUANTITIES = st.integers(1, 4_000).map(lambda n: Decimal(n) / 1000)


@dataclass
class Movement:
    """One movement the model knows, for the lifecycle rules (reverse, refund, ...)."""

    kind: str  # deposit, withdrawal, transfer, p2p, payment, refund, trade, reversal
    debit: str
    credit: str
    amount: int
    entries: tuple
    reversed: bool = False
    refunded: int = 0  # payments: what unreversed refunds gave back
    payment: "Movement" = None  # refunds: the payment they refund


class LedgerMachine(RuleBasedStateMachine):
    """The real ledger next to its model; every rule predicts its outcome first."""

    def __init__(self):
        super().__init__()
        # Fresh users and accounts per sequence; the whole database is emptied only
        # now and then (a TRUNCATE costs more than a short sequence), which keeps
        # the global checks (sums, verify) fast and still about everything.
        if db.execute_sql("SELECT count(*) > %s FROM transactions", (EMPTY_AFTER,)).fetchone()[0]:
            tables = [t for t in db.get_tables() if t != schema.MIGRATE_TABLE]
            db.execute_sql("TRUNCATE {} CASCADE".format(", ".join(f'"{t}"' for t in tables)))
        self.alice = self._user("alice")
        self.bob = self._user("bob")
        self.owner = {}
        self.ids = {}
        self.currency = {}
        self.overdraft = {}
        for name, user, currency, type_, overdraft in (
                ("a1", self.alice, "USD", "checking", 0), ("a2", self.alice, "USD", "savings", 5_000),
                ("inv", self.alice, "USD", "investment", 0), ("e1", self.alice, "EUR", "savings", 0),
                ("b1", self.bob, "USD", "checking", 0), ("b2", self.bob, "EUR", "savings", 1_000)):
            self.ids[name] = Account.create(
                user=user, account_number=str(uuid.uuid4().int)[:12], name=name, type=type_,
                currency=currency, overdraft_limit=overdraft, is_primary=name in ("a1", "b1")).id
            self.owner[name], self.currency[name], self.overdraft[name] = user, currency, overdraft
        self.card = Card.create(user=self.alice, account=self.ids["a1"], type="debit",
                                cardholder_name="ALICE", number_encrypted="x",
                                number_fingerprint=uuid.uuid4().hex * 2, last_four="4242",
                                masked_number="**** **** **** 4242", expiry_month=12,
                                expiry_year=2099, daily_limit=10 ** 12,
                                monthly_limit=10 ** 12).id
        InstrumentPrice.get_or_create(symbol="FUZZ", defaults=dict(
            name="Fuzz Fund", type="etf", currency="USD", price=PRICE))
        self.balance = dict.fromkeys(CUSTOMERS, 0)
        self.held = Decimal(0)
        self.movements = []
        self.keys = {}  # idempotency key -> (fingerprint, body of the first response)

    @staticmethod
    def _user(name):
        return User.create(email=f"{name}-{uuid.uuid4().hex[:8]}@example.com",
                           first_name=name.title(), last_name="Fuzz", password_hash="x").id

    # ------------------------------------------------------------------ helpers

    def _refusal(self, debit, amount):
        """InsufficientFunds when a customer ``debit`` cannot pay ``amount``, else None."""
        if debit in self.balance and self.balance[debit] - amount < -self.overdraft[debit]:
            return errors.InsufficientFunds
        return None

    def _expect(self, refusal, call):
        """Run ``call``; it must raise exactly ``refusal`` (a class) or succeed when None."""
        if refusal is None:
            return call()
        try:
            call()
        except refusal:
            return None
        raise AssertionError(f"expected {refusal.__name__}, but the ledger accepted it")

    def _move(self, kind, debit, credit, amount, posting, **extra):
        for name, change in ((debit, -amount), (credit, amount)):
            if name in self.balance:
                self.balance[name] += change
        movement = Movement(kind, debit, credit, amount,
                            (posting.debit.entry_id, posting.credit.entry_id), **extra)
        self.movements.append(movement)
        return movement

    # ------------------------------------------------------------------ rules

    @rule(account=st.sampled_from(CUSTOMERS), amount=AMOUNTS)
    def deposit(self, account, amount):
        posting = ledger.deposit(self.ids[account], amount)
        self._move("deposit", "settlement", account, amount, posting)

    @rule(account=st.sampled_from(CUSTOMERS), amount=AMOUNTS)
    def withdraw(self, account, amount):
        posting = self._expect(self._refusal(account, amount),
                               lambda: ledger.withdraw(self.ids[account], amount))
        if posting:
            self._move("withdrawal", account, "settlement", amount, posting)

    @rule(source=st.sampled_from(ALICE_ACCOUNTS), to=st.sampled_from(ALICE_ACCOUNTS),
          amount=AMOUNTS)
    def transfer(self, source, to, amount):
        target = to
        refusal = (errors.SameAccount if source == target else
                   errors.CurrencyMismatch if self.currency[source] != self.currency[target] else
                   self._refusal(source, amount))
        posting = self._expect(refusal, lambda: ledger.transfer(
            self.alice, self.ids[source], self.ids[target], amount))
        if posting:
            self._move("transfer", source, target, amount, posting)

    @rule(pair=st.sampled_from([("a1", "b1"), ("a2", "b1"), ("e1", "b2"), ("b1", "a1"),
                                ("b2", "e1"), ("a1", "b2")]), amount=AMOUNTS)
    def p2p(self, pair, amount):
        source, target = pair
        refusal = (errors.CurrencyMismatch if self.currency[source] != self.currency[target]
                   else self._refusal(source, amount))
        posting = self._expect(refusal, lambda: ledger.p2p_payment(
            self.owner[source], self.ids[source], self.ids[target], amount))
        if posting:
            self._move("p2p", source, target, amount, posting)

    @rule(amount=AMOUNTS)
    def card_payment(self, amount):
        posting = self._expect(self._refusal("a1", amount), lambda: ledger.card_payment(
            self.alice, self.card, amount, merchant_name="Shop", merchant_category="5411",
            channel="online"))
        if posting:
            self._move("payment", "a1", "settlement", amount, posting)

    @rule(data=st.data())
    def card_refund(self, data):
        payments = [m for m in self.movements if m.kind == "payment"]
        if not payments:
            return
        payment = data.draw(st.sampled_from(payments), label="payment")
        amount = data.draw(st.integers(1, payment.amount + 10), label="amount")
        refusal = (errors.PaymentReversed if payment.reversed else
                   errors.RefundExceedsPayment if amount > payment.amount - payment.refunded
                   else None)
        posting = self._expect(refusal, lambda: ledger.card_refund(
            self.alice, payment.entries[0], amount))
        if posting:
            payment.refunded += amount
            self._move("refund", "settlement", "a1", amount, posting, payment=payment)

    @rule(data=st.data(), leg=st.sampled_from([0, 1]))
    def reverse(self, data, leg):
        if not self.movements:
            return
        movement = data.draw(st.sampled_from(self.movements), label="movement")
        back = movement.amount - (movement.refunded if movement.kind == "payment" else 0)
        refusal = (errors.ReversalNotAllowed
                   if movement.kind in ("trade", "reversal") or movement.reversed or back <= 0
                   else self._refusal(movement.credit, back))
        posting = self._expect(refusal, lambda: ledger.reverse(movement.entries[leg]))
        if posting:
            movement.reversed = True
            if movement.kind == "refund":
                movement.payment.refunded -= movement.amount
            self._move("reversal", movement.credit, movement.debit, back, posting)

    @rule(quantity=QUANTITIES)
    def buy(self, quantity):
        cash = math.ceil(quantity * PRICE * 100)
        trade = self._expect(self._refusal("inv", cash),
                             lambda: ledger.buy(self.alice, self.ids["inv"], "FUZZ", quantity))
        if trade:
            assert trade.cash == cash
            self.held += quantity
            self._move("trade", "inv", "settlement", cash, trade.posting)

    @rule(quantity=QUANTITIES)
    def sell(self, quantity):
        cash = math.floor(quantity * PRICE * 100)
        refusal = errors.InsufficientHolding if quantity > self.held else None
        trade = self._expect(refusal,
                             lambda: ledger.sell(self.alice, self.ids["inv"], "FUZZ", quantity))
        if trade:
            assert trade.cash == cash and trade.held_quantity == self.held - quantity
            self.held -= quantity
            self._move("trade", "settlement", "inv", cash, trade.posting)

    @rule(key=st.sampled_from(["k1", "k2", "k3"]), amount=AMOUNTS,
          to=st.sampled_from(["a2", "inv"]))
    def keyed_transfer(self, key, amount, to):
        """A transfer sent with an Idempotency-Key: a replay answers the first response, once."""
        target = to
        body = {"from_account_id": str(self.ids["a1"]), "to_account_id": str(self.ids[target]),
                "amount": amount}
        fingerprint = idempotency.request_hash("POST", "/api/v1/transfers", body)
        moved = []

        def action():
            posting = ledger.transfer(self.alice, self.ids["a1"], self.ids[target], amount)
            moved.append(posting)
            return 201, json.dumps({"movement": str(posting.movement_id), "amount": amount})

        def on_error(exc):
            return exc.status, json.dumps({"refused": type(exc).__name__})

        first = self.keys.get(key)
        if first is not None and first[0] != fingerprint:
            # NOTE: the action may run before the key's row refuses it; its
            # transaction rolls back, which balances_equal_the_model proves.
            self._expect(errors.IdempotencyKeyReused, lambda: idempotency.run(
                self.alice, key, fingerprint, action, on_error=on_error))
            return
        refusal = None if first else self._refusal("a1", amount)
        outcome = idempotency.run(self.alice, key, fingerprint, action, on_error=on_error)
        if first is not None:
            assert outcome.replayed and outcome.body == first[1]
            return
        self.keys[key] = (fingerprint, outcome.body)
        assert not outcome.replayed
        if refusal:
            assert outcome.status == 422 and not moved, outcome
        else:
            assert outcome.status == 201 and len(moved) == 1, outcome
            self._move("transfer", "a1", target, amount, moved[0])

    # ------------------------------------------------------------------ invariants

    @invariant()
    def balances_equal_the_model(self):
        stored = dict(Account.select(Account.id, Account.balance).tuples())
        assert {name: stored[self.ids[name]] for name in CUSTOMERS} == self.balance

    @invariant()
    def books_balance(self):
        assert db.execute_sql(
            "SELECT currency, sum(balance) FROM accounts GROUP BY currency "
            "HAVING sum(balance) <> 0").fetchall() == []
        assert db.execute_sql(
            "SELECT id FROM accounts WHERE type <> 'settlement' "
            "AND balance < -overdraft_limit").fetchall() == []
        # Each lifecycle operation at most once: one reversal per movement, and
        # what came back for a payment never more than it.
        assert db.execute_sql(
            "SELECT o.movement_id FROM transactions o JOIN transactions r ON r.reverses_id = o.id "
            "GROUP BY o.movement_id HAVING count(DISTINCT r.movement_id) > 1").fetchall() == []
        assert db.execute_sql(
            "SELECT p.id FROM transactions p JOIN transactions f ON f.refund_of_id = p.id "
            "WHERE NOT EXISTS (SELECT 1 FROM transactions x WHERE x.reverses_id = f.id) "
            "GROUP BY p.id, p.amount HAVING sum(f.amount) > p.amount").fetchall() == []
        assert ledger.verify() == []
        assert chain.verify_chain() == []


RULES = {name for name in dir(LedgerMachine)
         if getattr(getattr(LedgerMachine, name), "hypothesis_stateful_rule", None)}


def fuzz_settings(examples, *, derandomize=True):
    return settings(max_examples=examples, stateful_step_count=FUZZ_STEPS,
                    derandomize=derandomize, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def test_random_sequences_keep_the_ledger_equal_to_its_model(database):
    """300 derandomized sequences in CI; ``HOARDRUN_FUZZ_SECONDS`` keeps going with fresh ones."""
    run_state_machine_as_test(LedgerMachine, settings=fuzz_settings(FUZZ_EXAMPLES))
    seconds = float(os.environ.get("HOARDRUN_FUZZ_SECONDS") or 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run_state_machine_as_test(LedgerMachine,
                                  settings=fuzz_settings(FUZZ_EXAMPLES, derandomize=False))


# --------------------------------------------------------------------------- the fuzzer bites

# A transfer that moves one minor unit more than asked: balanced, chained and
# consistent, so no database rule can see it; only a model of what was asked can.
BROKEN_TRANSFER = """
ALTER FUNCTION hoardrun_transfer(uuid, uuid, uuid, uuid, bigint, text, text, text)
    RENAME TO hoardrun_transfer_honest;
CREATE FUNCTION hoardrun_transfer(
    p_id uuid, p_user uuid, p_from uuid, p_to uuid, p_amount bigint, p_currency text,
    p_reference text, p_description text)
RETURNS hoardrun_posting LANGUAGE sql AS $$
    SELECT hoardrun_transfer_honest(p_id, p_user, p_from, p_to, p_amount + 1, p_currency,
                                    p_reference, p_description)
$$"""


@pytest.fixture
def broken_ledger(settings):
    """A scratch database, migrated, whose hoardrun_transfer is deliberately wrong."""
    parts = urlsplit(settings.database_url)
    name = parts.path.lstrip("/") + "_broken"
    url = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))

    def admin(statement):
        conn = psycopg2.connect(admin_url(url))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    database = dbm.init_db(settings.replace(database_url=url))
    try:
        schema.migrate(database)
        database.execute_sql(BROKEN_TRANSFER)
        yield database
    finally:
        database.close_all()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_fuzzer_catches_a_broken_transfer_with_a_short_counterexample(broken_ledger):
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(LedgerMachine, settings=fuzz_settings(200))
    notes = getattr(caught.value, "__notes__", ())
    steps = [line for line in notes if line.startswith("state.")
             and line.split("(")[0][len("state."):] in RULES]
    # Shrunk to the essence (a2 may go overdrawn: one transfer from it is enough).
    assert steps and all("transfer(" in step for step in steps), notes
    assert len(steps) <= 2, steps
