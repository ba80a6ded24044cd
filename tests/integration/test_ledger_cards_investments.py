"""Ledger-level card payments, refunds and trades."""

import threading
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import peewee as pw
import pytest

from hoardrun import accounts, errors, ledger
from hoardrun.db import db, release_connection
from hoardrun.models import Account, Card, Investment, Transaction, User


@pytest.fixture
def owner(database, uid):
    return User.create(email=f"{uid()}@example.com", first_name="Ada", last_name="Lovelace",
                       password_hash="not-a-real-hash")


@pytest.fixture
def funded(owner):
    acc = accounts.open_account(owner.id, "checking", "USD", "Main")
    ledger.deposit(acc.id, 100_000)
    return acc


def make_card(owner, account, **overrides):
    fields = dict(user=owner.id, account=account.id, type="debit", cardholder_name="Ada L",
                  number_encrypted="opaque", number_fingerprint=uuid.uuid4().hex,
                  last_four="1234", masked_number="**** **** **** 1234", expiry_month=12,
                  expiry_year=2099, daily_limit=5_000, monthly_limit=20_000)
    fields.update(overrides)
    return Card.create(**fields)


def pay(owner, card, amount, **kw):
    kw.setdefault("channel", "chip")
    return ledger.card_payment(owner.id, card.id, amount, merchant_name="Corner Shop",
                               merchant_category="5411", **kw)


def test_payment_debits_the_card_account_with_merchant_data(owner, funded):
    card = make_card(owner, funded)
    posting = pay(owner, card, 1_250)
    entry = Transaction.get_by_id(posting.debit.entry_id)
    assert (entry.type, entry.direction, entry.amount) == ("payment", "outbound", 1_250)
    assert entry.card_id == card.id and entry.merchant_name == "Corner Shop"
    assert Account.get_by_id(funded.id).balance == 100_000 - 1_250
    assert ledger.verify() == []


@pytest.mark.parametrize("changes, error", [
    ({"status": "blocked"}, errors.CardNotActive),
    ({"status": "cancelled"}, errors.CardNotActive),
    ({"expiry_year": 2020, "expiry_month": 1}, errors.CardExpired),
    ({"online_enabled": False}, errors.ChannelDisabled),
])
def test_refused_payments_write_nothing(owner, funded, changes, error):
    card = make_card(owner, funded, **changes)
    before = Transaction.select().count()
    with pytest.raises(error):
        pay(owner, card, 100, channel="online")
    assert Transaction.select().count() == before
    assert Account.get_by_id(funded.id).balance == 100_000


def test_international_needs_its_toggle(owner, funded):
    card = make_card(owner, funded)
    with pytest.raises(errors.ChannelDisabled):
        pay(owner, card, 100, international=True)
    Card.update(international_enabled=True).where(Card.id == card.id).execute()
    pay(owner, card, 100, international=True)


def test_daily_limit_counts_refunds_back(owner, funded):
    card = make_card(owner, funded, daily_limit=5_000, monthly_limit=6_000)
    first = pay(owner, card, 3_000)
    with pytest.raises(errors.DailyLimitExceeded):
        pay(owner, card, 2_001)
    ledger.card_refund(owner.id, first.debit.entry_id, 1_000)
    pay(owner, card, 3_000)  # 3000 - 1000 + 3000 = 5000: exactly the daily limit
    with pytest.raises(errors.DailyLimitExceeded):
        pay(owner, card, 1)


def test_monthly_limit_counts_earlier_days_of_the_month(owner, funded):
    card = make_card(owner, funded, daily_limit=5_000, monthly_limit=6_000)
    # "Now" is the 15th, whatever the date of the run: the 1st is an earlier day.
    now = datetime.now(timezone.utc).replace(day=15, hour=12, minute=0, second=0, microsecond=0)
    month_start = now.replace(day=1, hour=0)
    # An earlier payment this month, written by the ledger's own writer with
    # that date (entries are insert-only and must keep the books whole).
    db.execute_sql(
        "SELECT hoardrun_apply_pair_at(%s, %s, %s, 4000, 'USD', 'payment', 'settlement', "
        "'Earlier', NULL, NULL, %s, NULL, NULL, NULL, NULL, NULL, %s, NULL, NULL)",
        (uuid.uuid4().hex, funded.id.hex, ledger.settlement_account_ids("USD")[0].hex,
         card.id.hex, month_start))
    with pytest.raises(errors.MonthlyLimitExceeded):
        pay(owner, card, 2_500, now=now)
    pay(owner, card, 2_000, now=now)


def test_refunds_cannot_exceed_the_payment(owner, funded):
    card = make_card(owner, funded)
    payment = pay(owner, card, 2_000)
    ledger.card_refund(owner.id, payment.debit.entry_id, 1_500)
    with pytest.raises(errors.RefundExceedsPayment):
        ledger.card_refund(owner.id, payment.debit.entry_id, 501)
    ledger.card_refund(owner.id, payment.debit.entry_id, 500)
    assert Account.get_by_id(funded.id).balance == 100_000
    refunds = Transaction.select().where(Transaction.refund_of == payment.debit.entry_id)
    assert sorted(r.amount for r in refunds) == [500, 1_500]
    assert ledger.verify() == []


def test_someone_elses_card_is_not_found(owner, funded, uid):
    card = make_card(owner, funded)
    stranger = User.create(email=f"{uid()}@example.com", first_name="Eve", last_name="X",
                           password_hash="x")
    with pytest.raises(errors.NotFound):
        pay(stranger, card, 100)
    payment = pay(owner, card, 100)
    with pytest.raises(errors.NotFound):
        ledger.card_refund(stranger.id, payment.debit.entry_id, 100)


def test_concurrent_payments_never_exceed_the_daily_limit(owner, funded):
    card = make_card(owner, funded, daily_limit=5_000, monthly_limit=5_000)
    outcomes = []
    lock = threading.Lock()

    def worker():
        try:
            for _ in range(4):
                try:
                    pay(owner, card, 1_000)
                    result = "ok"
                except errors.DailyLimitExceeded:
                    result = "limit"
                with lock:
                    outcomes.append(result)
        finally:
            release_connection()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 5 and outcomes.count("limit") == 27
    assert Account.get_by_id(funded.id).balance == 100_000 - 5_000
    assert ledger.verify() == []


@pytest.fixture
def brokerage(owner):
    acc = accounts.open_account(owner.id, "investment", "USD", "Brokerage")
    ledger.deposit(acc.id, 50_000)
    ledger.set_price("ACME", Decimal("1.25"), name="Acme Corp", type="stock", currency="USD")
    return acc


def test_buy_rounds_cash_up_and_builds_the_holding(owner, brokerage):
    trade = ledger.buy(owner.id, brokerage.id, "acme", Decimal("0.1"))  # 0.125 USD
    assert trade.cash == 13
    trade = ledger.buy(owner.id, brokerage.id, "ACME", Decimal("0.3"))  # 0.375 USD
    assert trade.cash == 38
    holding = Investment.get_by_id(trade.holding_id)
    assert holding.quantity == Decimal("0.4") and holding.cost_basis == 51
    assert Account.get_by_id(brokerage.id).balance == 50_000 - 51
    assert ledger.verify() == []


def test_sell_moves_cash_in_and_cost_basis_out_proportionally(owner, brokerage):
    ledger.buy(owner.id, brokerage.id, "ACME", Decimal("100"))  # 125.00
    ledger.set_price("ACME", Decimal("2"))
    trade = ledger.sell(owner.id, brokerage.id, "ACME", Decimal("25"))
    assert trade.cash == 5_000 and trade.held_quantity == Decimal("75")
    assert trade.cost_basis == 9_375
    assert Investment.get_by_id(trade.holding_id).current_price == Decimal("2")
    with pytest.raises(errors.InsufficientHolding):
        ledger.sell(owner.id, brokerage.id, "ACME", Decimal("75.00000001"))
    final = ledger.sell(owner.id, brokerage.id, "ACME", Decimal("75"))
    assert final.held_quantity == 0 and final.cost_basis == 0
    assert Account.get_by_id(brokerage.id).balance == 50_000 - 12_500 + 20_000
    assert ledger.verify() == []


@pytest.mark.parametrize("symbol, quantity, error", [
    ("NOPE", Decimal("1"), errors.NotFound),
    ("ACME", Decimal("1000000"), errors.InsufficientFunds),
    ("ACME", Decimal("0.000000001"), errors.ValidationError),
    ("ACME", Decimal("-1"), errors.ValidationError),
])
def test_refused_orders_write_nothing(owner, brokerage, symbol, quantity, error):
    before = Transaction.select().count()
    with pytest.raises(error):
        ledger.buy(owner.id, brokerage.id, symbol, quantity)
    assert Transaction.select().count() == before
    assert Investment.select().count() == 0


def test_trading_needs_an_investment_account_of_the_price_currency(owner, brokerage, funded):
    with pytest.raises(errors.NotInvestmentAccount):
        ledger.buy(owner.id, funded.id, "ACME", Decimal("1"))
    euro = accounts.open_account(owner.id, "investment", "EUR", "Euro brokerage")
    ledger.deposit(euro.id, 10_000)
    with pytest.raises(errors.CurrencyMismatch):
        ledger.buy(owner.id, euro.id, "ACME", Decimal("1"))


def test_the_writer_refuses_one_account_on_both_sides(owner, funded):
    # Migration 015 moves both balances with one UPDATE, which would move a
    # single account once: the writer itself must refuse the pair.
    before = Account.get_by_id(funded.id).balance
    with pytest.raises(pw.DatabaseError, match="same account"):
        with db.atomic():
            db.execute_sql(
                "SELECT hoardrun_apply_pair_at(%s, %s, %s, 100, 'USD', 'transfer_out', "
                "'transfer_in', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
                "clock_timestamp(), NULL, NULL)",
                (uuid.uuid4().hex, funded.id.hex, funded.id.hex))
    assert Account.get_by_id(funded.id).balance == before
    assert ledger.verify() == []
