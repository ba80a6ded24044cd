"""peewee models: what the database enforces, said in Python.

Every rule here is also a constraint in the database (CHECK, UNIQUE, FK with
an explicit ON DELETE, triggers from the migrations), so raw SQL cannot break
it either. Column order follows the migration; constraints and indexes live
in ``Meta`` so the DDL matches the Python. Money is BIGINT minor units.
"""

import uuid

import peewee as pw
from peewee import SQL

from .db import BaseModel, UTCDateTimeField
from .money import CURRENCY_CODES

USER_ROLES = ("user", "premium", "admin")
USER_STATUSES = ("pending", "active", "suspended", "deactivated")
ACCOUNT_TYPES = ("checking", "savings", "investment", "credit", "business")
# Settlement accounts stand for the world outside HoardRun; they are the only
# accounts without an owner. A currency has several, its settlement buckets
# (migration 009), so cash movements of one currency do not queue on one row.
SETTLEMENT = "settlement"
ACCOUNT_STATUSES = ("active", "inactive", "suspended", "closed", "pending")
ENTRY_TYPES = ("deposit", "withdrawal", "transfer_in", "transfer_out", "p2p_in", "p2p_out",
               "payment", "refund", "fee", "interest", "investment_buy", "investment_sell",
               "reversal", "settlement")
DIRECTIONS = ("inbound", "outbound")
ENTRY_STATUSES = ("pending", "completed", "failed")
CARD_TYPES = ("debit", "credit", "prepaid")
CARD_STATUSES = ("active", "inactive", "blocked", "expired", "cancelled")
INVESTMENT_TYPES = ("stock", "etf", "bond", "mutual_fund", "crypto")
CARD_CHANNELS = ("online", "contactless", "chip")
# A reversed transfer or P2P payment completed once and was undone by the
# reversing movement its reversal_id names.
MOVEMENT_STATUSES = ("pending", "completed", "failed", "cancelled", "reversed")
TRADE_ENTRY_TYPES = ("investment_buy", "investment_sell")
EMAIL_CODE_PURPOSES = ("verify_email", "reset_password")
MAIL_STATUSES = ("pending", "sent", "failed")
# A card authorization reserves money while active; it ends once, in one of the others.
HOLD_STATUSES = ("active", "captured", "voided", "expired")


def _in(column, values):
    # One array constant, not IN (...): PostgreSQL re-reads every CHECK's stored
    # text on each statement that writes the table, and an IN list of 32
    # currencies is stored as 32 casted constants (migration 015).
    return "{}::text = ANY ('{{{}}}'::text[])".format(column, ",".join(values))


def _check(name, expression):
    return SQL(f"CONSTRAINT {name} CHECK ({expression})")


def _currency_check(table, column="currency"):
    return _check(f"{table}_{column}_iso", _in(column, CURRENCY_CODES))


def _now():
    return [SQL("DEFAULT CURRENT_TIMESTAMP")]


class User(BaseModel):
    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    email = pw.CharField(max_length=254, unique=True)
    first_name = pw.CharField(max_length=100)
    last_name = pw.CharField(max_length=100)
    phone = pw.CharField(max_length=16, null=True)
    password_hash = pw.CharField(max_length=255)
    role = pw.CharField(max_length=16, default="user", constraints=[SQL("DEFAULT 'user'")])
    status = pw.CharField(max_length=16, default="active", constraints=[SQL("DEFAULT 'active'")])
    country = pw.CharField(max_length=2, null=True)
    email_verified = pw.BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])
    phone_verified = pw.BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])
    kyc_verified = pw.BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])
    failed_logins = pw.IntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    locked_until = UTCDateTimeField(null=True)
    last_login_at = UTCDateTimeField(null=True)
    created_at = UTCDateTimeField(constraints=_now())
    updated_at = UTCDateTimeField(constraints=_now())
    # A new address the user asked for; it replaces ``email`` only once verified.
    pending_email = pw.CharField(max_length=254, null=True)

    class Meta:
        table_name = "users"
        constraints = [
            # Emails are stored normalised, so UNIQUE(email) is case-insensitive.
            # NOTE: no LIKE patterns here: psycopg2 would read their '%' as a parameter.
            _check("users_email_lower",
                   "email = lower(email) AND length(email) >= 3 AND email <> replace(email, '@', '')"),
            _check("users_names_present",
                   "length(trim(first_name)) > 0 AND length(trim(last_name)) > 0"),
            # E.164: '+', a non-zero digit, then up to 14 more digits.
            _check("users_phone_e164",
                   "phone IS NULL OR (length(phone) BETWEEN 3 AND 16"
                   " AND substr(phone, 1, 1) = '+' AND substr(phone, 2, 1) BETWEEN '1' AND '9'"
                   " AND trim(substr(phone, 2), '0123456789') = '')"),
            _check("users_role", _in("role", USER_ROLES)),
            _check("users_status", _in("status", USER_STATUSES)),
            _check("users_country_iso",
                   "country IS NULL OR (length(country) = 2"
                   " AND substr(country, 1, 1) BETWEEN 'A' AND 'Z'"
                   " AND substr(country, 2, 1) BETWEEN 'A' AND 'Z')"),
            _check("users_failed_logins", "failed_logins >= 0"),
            _check("users_pending_email",
                   "pending_email IS NULL OR (pending_email <> email AND length(pending_email) >= 3"
                   " AND pending_email <> replace(pending_email, '@', ''))"),
        ]


class Account(BaseModel):
    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, null=True, backref="accounts", on_delete="RESTRICT")
    account_number = pw.CharField(max_length=20, unique=True)
    name = pw.CharField(max_length=100)
    type = pw.CharField(max_length=16)
    status = pw.CharField(max_length=16, default="active", constraints=[SQL("DEFAULT 'active'")])
    currency = pw.CharField(max_length=3)
    balance = pw.BigIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    overdraft_limit = pw.BigIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    minimum_balance = pw.BigIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    interest_rate = pw.DecimalField(max_digits=7, decimal_places=4, default=0,
                                    auto_round=False, constraints=[SQL("DEFAULT 0")])
    is_primary = pw.BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])
    created_at = UTCDateTimeField(constraints=_now())
    updated_at = UTCDateTimeField(constraints=_now())
    closed_at = UTCDateTimeField(null=True)
    # Which of its currency's settlement accounts this is; NULL on customer accounts.
    settlement_bucket = pw.SmallIntegerField(null=True)

    class Meta:
        table_name = "accounts"
        constraints = [
            _check("accounts_type", _in("type", ACCOUNT_TYPES + (SETTLEMENT,))),
            _check("accounts_owner", "(type = 'settlement') = (user_id IS NULL)"),
            _check("accounts_status", _in("status", ACCOUNT_STATUSES)),
            _currency_check("accounts"),
            _check("accounts_number_digits",
                   "length(account_number) BETWEEN 8 AND 20"
                   " AND trim(account_number, '0123456789') = ''"),
            _check("accounts_name_present", "length(trim(name)) > 0"),
            _check("accounts_overdraft_nonnegative", "overdraft_limit >= 0"),
            _check("accounts_minimum_nonnegative", "minimum_balance >= 0"),
            _check("accounts_interest_rate", "interest_rate >= 0 AND interest_rate <= 100"),
            # The overdraft rule, for every writer: settlement accounts mirror
            # the outside world and may go as negative as deposits take them.
            _check("accounts_balance_floor",
                   "type = 'settlement' OR balance >= -overdraft_limit"),
            _check("accounts_primary_owner", "NOT is_primary OR user_id IS NOT NULL"),
            _check("accounts_closed_at", "(status = 'closed') = (closed_at IS NOT NULL)"),
            _check("accounts_settlement_bucket",
                   "(type = 'settlement') = (settlement_bucket IS NOT NULL)"
                   " AND (settlement_bucket IS NULL OR settlement_bucket BETWEEN 0 AND 99)"),
        ]
        indexes = (
            (("user", "created_at"), False),
        )


# At most one primary account per user. A plain UNIQUE(user_id, is_primary)
# would also allow only one non-primary account, hence the partial index.
Account.add_index(Account.index(Account.user, unique=True, where=(Account.is_primary == True),  # noqa: E712
                                name="accounts_one_primary_per_user"))
Account.add_index(Account.index(Account.currency, Account.settlement_bucket, unique=True,
                                where=(Account.type == SETTLEMENT),
                                name="accounts_one_settlement_per_bucket"))


class Card(BaseModel):
    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="cards", on_delete="RESTRICT")
    account = pw.ForeignKeyField(Account, backref="cards", on_delete="RESTRICT")
    type = pw.CharField(max_length=16)
    status = pw.CharField(max_length=16, default="active", constraints=[SQL("DEFAULT 'active'")])
    cardholder_name = pw.CharField(max_length=100)
    number_encrypted = pw.TextField()
    # HMAC of the number under the secret key: finds duplicates without
    # storing anything that reveals the number.
    number_fingerprint = pw.CharField(max_length=64, unique=True)
    last_four = pw.CharField(max_length=4)
    masked_number = pw.CharField(max_length=19)
    expiry_month = pw.SmallIntegerField()
    expiry_year = pw.SmallIntegerField()
    daily_limit = pw.BigIntegerField()
    monthly_limit = pw.BigIntegerField()
    online_enabled = pw.BooleanField(default=True, constraints=[SQL("DEFAULT TRUE")])
    contactless_enabled = pw.BooleanField(default=True, constraints=[SQL("DEFAULT TRUE")])
    international_enabled = pw.BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])
    failed_pin_attempts = pw.SmallIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    created_at = UTCDateTimeField(constraints=_now())
    updated_at = UTCDateTimeField(constraints=_now())

    class Meta:
        table_name = "cards"
        constraints = [
            _check("cards_type", _in("type", CARD_TYPES)),
            _check("cards_status", _in("status", CARD_STATUSES)),
            _check("cards_last_four", "length(last_four) = 4 AND trim(last_four, '0123456789') = ''"),
            _check("cards_masked_hides_number",
                   "substr(masked_number, length(masked_number) - 3) = last_four"
                   " AND length(trim(masked_number, '*0123456789 ')) = 0"
                   " AND length(masked_number) - length(replace(masked_number, '*', '')) >= 8"),
            _check("cards_expiry_month", "expiry_month BETWEEN 1 AND 12"),
            _check("cards_expiry_year", "expiry_year BETWEEN 2000 AND 2100"),
            _check("cards_daily_limit_positive", "daily_limit > 0"),
            _check("cards_monthly_covers_daily", "monthly_limit >= daily_limit"),
            _check("cards_failed_pin_attempts", "failed_pin_attempts BETWEEN 0 AND 10"),
        ]


class Transfer(BaseModel):
    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="transfers", on_delete="RESTRICT")
    from_account = pw.ForeignKeyField(Account, backref="transfers_out", on_delete="RESTRICT")
    to_account = pw.ForeignKeyField(Account, backref="transfers_in", on_delete="RESTRICT")
    amount = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    fee = pw.BigIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    reference = pw.CharField(max_length=40, unique=True)
    description = pw.CharField(max_length=500, null=True)
    status = pw.CharField(max_length=16, default="completed",
                          constraints=[SQL("DEFAULT 'completed'")])
    created_at = UTCDateTimeField(constraints=_now())
    completed_at = UTCDateTimeField(null=True)
    # The movement id of the reversing pair, once reversed.
    reversal_id = pw.UUIDField(null=True)

    class Meta:
        table_name = "transfers"
        constraints = [
            _check("transfers_distinct_accounts", "from_account_id <> to_account_id"),
            _check("transfers_amount_positive", "amount > 0"),
            _check("transfers_fee_nonnegative", "fee >= 0"),
            _currency_check("transfers"),
            _check("transfers_status", _in("status", MOVEMENT_STATUSES)),
            _check("transfers_completed_at",
                   "(status IN ('completed', 'reversed')) = (completed_at IS NOT NULL)"),
            _check("transfers_reversal", "(status = 'reversed') = (reversal_id IS NOT NULL)"),
        ]
        indexes = (
            (("user", "created_at"), False),
        )


class P2PTransaction(BaseModel):
    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    sender = pw.ForeignKeyField(User, backref="p2p_sent", on_delete="RESTRICT")
    recipient = pw.ForeignKeyField(User, backref="p2p_received", on_delete="RESTRICT")
    sender_account = pw.ForeignKeyField(Account, backref="p2p_out", on_delete="RESTRICT")
    recipient_account = pw.ForeignKeyField(Account, backref="p2p_in", on_delete="RESTRICT")
    amount = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    note = pw.CharField(max_length=500, null=True)
    reference = pw.CharField(max_length=40, unique=True)
    status = pw.CharField(max_length=16, default="completed",
                          constraints=[SQL("DEFAULT 'completed'")])
    created_at = UTCDateTimeField(constraints=_now())
    completed_at = UTCDateTimeField(null=True)
    # The movement id of the reversing pair, once reversed.
    reversal_id = pw.UUIDField(null=True)

    class Meta:
        table_name = "p2p_transactions"
        constraints = [
            _check("p2p_distinct_users", "sender_id <> recipient_id"),
            _check("p2p_distinct_accounts", "sender_account_id <> recipient_account_id"),
            _check("p2p_amount_positive", "amount > 0"),
            _currency_check("p2p_transactions"),
            _check("p2p_status", _in("status", MOVEMENT_STATUSES)),
            _check("p2p_completed_at",
                   "(status IN ('completed', 'reversed')) = (completed_at IS NOT NULL)"),
            _check("p2p_reversal", "(status = 'reversed') = (reversal_id IS NOT NULL)"),
        ]
        indexes = (
            (("sender", "created_at"), False),
            (("recipient", "created_at"), False),
        )


class Transaction(BaseModel):
    """One immutable ledger entry on one account.

    Entries of one money movement share ``movement_id`` and sum to zero
    (inbound minus outbound) per currency. UPDATE and DELETE are refused by a
    trigger; a mistake is undone by a reversing entry pointing at the original.
    """

    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    account = pw.ForeignKeyField(Account, backref="entries", on_delete="RESTRICT")
    movement_id = pw.UUIDField(index=True)
    type = pw.CharField(max_length=20)
    direction = pw.CharField(max_length=8)
    amount = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    balance_after = pw.BigIntegerField()
    description = pw.CharField(max_length=500, null=True)
    merchant_name = pw.CharField(max_length=200, null=True)
    merchant_category = pw.CharField(max_length=64, null=True)
    card = pw.ForeignKeyField(Card, null=True, backref="entries", on_delete="RESTRICT")
    transfer = pw.ForeignKeyField(Transfer, null=True, backref="entries", on_delete="RESTRICT")
    p2p = pw.ForeignKeyField(P2PTransaction, null=True, backref="entries",
                             on_delete="RESTRICT", column_name="p2p_id")
    # UNIQUE: an entry is reversed at most once, whoever races to do it.
    reverses = pw.ForeignKeyField("self", null=True, unique=True, backref="reversals",
                                  on_delete="RESTRICT")
    reference = pw.CharField(max_length=48, unique=True)
    status = pw.CharField(max_length=16, default="completed",
                          constraints=[SQL("DEFAULT 'completed'")])
    created_at = UTCDateTimeField(constraints=_now())
    # A refund points at the card payment it gives money back for; several
    # partial refunds may point at one payment (never more than its amount).
    refund_of = pw.ForeignKeyField("self", null=True, backref="refunds", on_delete="RESTRICT")
    # A trade's customer-side entry: what it bought or sold, so the holdings
    # can be checked against the trades that made them (ledger.verify).
    symbol = pw.CharField(max_length=12, null=True)
    quantity = pw.DecimalField(max_digits=24, decimal_places=8, auto_round=False, null=True)
    # The entry's place in its account's history (1, 2, ...) and sha256 of the
    # previous entry's hash and this entry's content (migration 010): the
    # ledger function writes both; db.verify --chain recomputes the chain.
    seq = pw.BigIntegerField()
    chain_hash = pw.BlobField()

    class Meta:
        table_name = "transactions"
        constraints = [
            _check("transactions_type", _in("type", ENTRY_TYPES)),
            _check("transactions_direction", _in("direction", DIRECTIONS)),
            _check("transactions_amount_positive", "amount > 0"),
            _currency_check("transactions"),
            _check("transactions_status", _in("status", ENTRY_STATUSES)),
            _check("transactions_not_self_reversal", "reverses_id IS NULL OR reverses_id <> id"),
            _check("transactions_trade",
                   f"(quantity IS NOT NULL) = ({_in('type', TRADE_ENTRY_TYPES)}) "
                   "AND (symbol IS NOT NULL) = (quantity IS NOT NULL) "
                   "AND (quantity IS NULL OR quantity > 0)"),
            _check("transactions_seq_positive", "seq > 0"),
        ]
        indexes = (
            # History pages: newest first within one account, keyset on (created_at, id).
            (("account", "created_at", "id"), False),
            # One chain per account: the previous and the latest entry are index seeks.
            (("account", "seq"), True),
            (("card", "created_at"), False),
        )


class Investment(BaseModel):
    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="investments", on_delete="RESTRICT")
    account = pw.ForeignKeyField(Account, backref="investments", on_delete="RESTRICT")
    symbol = pw.CharField(max_length=12)
    name = pw.CharField(max_length=200)
    type = pw.CharField(max_length=16)
    quantity = pw.DecimalField(max_digits=24, decimal_places=8, auto_round=False)
    # Total cash paid for the quantity held, in the account's minor units.
    cost_basis = pw.BigIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    current_price = pw.DecimalField(max_digits=24, decimal_places=8, auto_round=False)
    currency = pw.CharField(max_length=3)
    purchase_date = UTCDateTimeField(constraints=_now())
    created_at = UTCDateTimeField(constraints=_now())
    updated_at = UTCDateTimeField(constraints=_now())

    class Meta:
        table_name = "investments"
        constraints = [
            _check("investments_symbol", "length(symbol) BETWEEN 1 AND 12 AND symbol = upper(symbol)"),
            _check("investments_type", _in("type", INVESTMENT_TYPES)),
            _check("investments_quantity_nonnegative", "quantity >= 0"),
            _check("investments_cost_basis_nonnegative", "cost_basis >= 0"),
            _check("investments_price_nonnegative", "current_price >= 0"),
            _currency_check("investments"),
        ]
        indexes = (
            (("account", "symbol"), True),
        )


class InstrumentPrice(BaseModel):
    """The sandbox price list: what one unit of an instrument costs now."""

    symbol = pw.CharField(max_length=12, primary_key=True)
    name = pw.CharField(max_length=200)
    type = pw.CharField(max_length=16)
    currency = pw.CharField(max_length=3)
    price = pw.DecimalField(max_digits=24, decimal_places=8, auto_round=False)
    updated_at = UTCDateTimeField(constraints=_now())

    class Meta:
        table_name = "instrument_prices"
        constraints = [
            _check("instrument_prices_symbol",
                   "length(symbol) BETWEEN 1 AND 12 AND symbol = upper(symbol)"),
            _check("instrument_prices_type", _in("type", INVESTMENT_TYPES)),
            _currency_check("instrument_prices"),
            _check("instrument_prices_price_positive", "price > 0"),
        ]


class AuthToken(BaseModel):
    """A bearer token, stored only as its SHA-256 hash."""

    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    token_hash = pw.CharField(max_length=64, unique=True)
    created_at = UTCDateTimeField(constraints=_now())
    expires_at = UTCDateTimeField()
    revoked_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "auth_tokens"
        constraints = [
            _check("auth_tokens_hash_hex", "length(token_hash) = 64"),
        ]


class IdempotencyKey(BaseModel):
    """The first response to a money-moving POST, replayed for the same key."""

    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="idempotency_keys", on_delete="CASCADE")
    key = pw.CharField(max_length=255)
    request_hash = pw.CharField(max_length=64)
    response_status = pw.IntegerField(null=True)
    response_body = pw.TextField(null=True)
    # indexed: db.prune deletes lapsed keys oldest first (migration 006)
    created_at = UTCDateTimeField(constraints=_now(), index=True)

    class Meta:
        table_name = "idempotency_keys"
        constraints = [
            _check("idempotency_keys_key_present", "length(key) BETWEEN 1 AND 255"),
        ]
        indexes = (
            (("user", "key"), True),
        )


class AuditLog(BaseModel):
    """Append-only record of every state change (a trigger refuses edits)."""

    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    actor = pw.ForeignKeyField(User, null=True, backref="audit_entries", on_delete="RESTRICT")
    action = pw.CharField(max_length=64)
    entity_type = pw.CharField(max_length=32)
    entity_id = pw.CharField(max_length=64, null=True)
    before = pw.TextField(null=True)
    after = pw.TextField(null=True)
    request_id = pw.CharField(max_length=64, null=True)
    created_at = UTCDateTimeField(constraints=_now())

    class Meta:
        table_name = "audit_log"
        constraints = [
            _check("audit_log_action_present", "length(action) > 0"),
        ]
        indexes = (
            (("entity_type", "entity_id"), False),
            (("created_at",), False),
        )


class EmailCode(BaseModel):
    """A verification code or reset token sent to ``email``, stored only as a keyed hash."""

    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="email_codes", on_delete="CASCADE")
    purpose = pw.CharField(max_length=16)
    email = pw.CharField(max_length=254)
    code_hash = pw.CharField(max_length=64, unique=True)
    attempts = pw.SmallIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    created_at = UTCDateTimeField(constraints=_now())
    expires_at = UTCDateTimeField()
    used_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "email_codes"
        constraints = [
            _check("email_codes_purpose", _in("purpose", EMAIL_CODE_PURPOSES)),
            _check("email_codes_hash_hex", "length(code_hash) = 64"),
            _check("email_codes_attempts", "attempts >= 0"),
            _check("email_codes_expiry", "expires_at > created_at"),
        ]
        indexes = (
            (("user", "purpose", "created_at"), False),
        )


class MailOutbox(BaseModel):
    """A message waiting for (or done with) delivery; the body is encrypted."""

    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    recipient = pw.CharField(max_length=254)
    subject = pw.CharField(max_length=200)
    body = pw.TextField(null=True)
    status = pw.CharField(max_length=8, default="pending",
                          constraints=[SQL("DEFAULT 'pending'")])
    attempts = pw.SmallIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    last_error = pw.CharField(max_length=500, null=True)
    created_at = UTCDateTimeField(constraints=_now())
    next_attempt_at = UTCDateTimeField(constraints=_now())
    sent_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "mail_outbox"
        constraints = [
            _check("mail_outbox_status", _in("status", MAIL_STATUSES)),
            _check("mail_outbox_attempts", "attempts >= 0"),
            _check("mail_outbox_sent_at", "(status = 'sent') = (sent_at IS NOT NULL)"),
        ]
        indexes = (
            (("created_at",), False),
        )


# What the sender polls: only undelivered mail, by when it is due.
MailOutbox.add_index(MailOutbox.index(MailOutbox.next_attempt_at,
                                      where=(MailOutbox.status == "pending"),
                                      name="mail_outbox_due"))


class CardHold(BaseModel):
    """A card authorization: money reserved on the card's account, not moved (migration 008).

    Active until captured (once, at most ``amount``), voided or expired; a
    trigger refuses any change to a resolved hold. ``created_at``,
    ``expires_at`` and ``resolved_at`` are the app's clock.
    """

    id = pw.UUIDField(primary_key=True, default=uuid.uuid4)
    user = pw.ForeignKeyField(User, backref="card_holds", on_delete="RESTRICT")
    card = pw.ForeignKeyField(Card, backref="holds", on_delete="RESTRICT")
    account = pw.ForeignKeyField(Account, backref="holds", on_delete="RESTRICT")
    amount = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    status = pw.CharField(max_length=16, default="active", constraints=[SQL("DEFAULT 'active'")])
    captured_amount = pw.BigIntegerField(null=True)
    # The capture's movement: its two entries (a card payment) share this id.
    capture_movement_id = pw.UUIDField(null=True, unique=True)
    merchant_name = pw.CharField(max_length=200)
    merchant_category = pw.CharField(max_length=64)
    channel = pw.CharField(max_length=16)
    international = pw.BooleanField(default=False, constraints=[SQL("DEFAULT FALSE")])
    description = pw.CharField(max_length=500, null=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()
    resolved_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "card_holds"
        constraints = [
            _check("card_holds_amount_positive", "amount > 0"),
            _currency_check("card_holds"),
            _check("card_holds_status", _in("status", HOLD_STATUSES)),
            _check("card_holds_channel", _in("channel", CARD_CHANNELS)),
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


# Only active holds: what every funds check sums, and what the expiry sweep looks for.
CardHold.add_index(CardHold.index(CardHold.account, CardHold.expires_at,
                                  where=(CardHold.status == "active"),
                                  name="card_holds_active_account"))
CardHold.add_index(CardHold.index(CardHold.expires_at, where=(CardHold.status == "active"),
                                  name="card_holds_active_expiry"))


#: Every model, in dependency order (create in this order, drop reversed).
MODELS = (User, Account, Card, Transfer, P2PTransaction, Transaction, Investment,
          InstrumentPrice, AuthToken, IdempotencyKey, AuditLog, EmailCode, MailOutbox,
          CardHold)
