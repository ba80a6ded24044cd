"""What a user asks to do with money, turned into ledger calls.

Each function takes the calling user, checks what only the request can
tell (the amount as a decimal string in the account's currency, the P2P
recipient), calls ``hoardrun.ledger`` (which alone writes balances and
entries, and re-checks ownership, status, currency and funds under its
locks), writes the audit row in the same transaction and returns what the
client is shown. Nothing here writes money itself.

Every function runs inside the caller's transaction when there is one
(the idempotency claim), else in its own: the movement and its audit row
land together or not at all.
"""

import contextlib
import uuid
from dataclasses import dataclass

from . import audit, errors, history, ledger
from .auth import normalise_email
from .db import db
from .ids import as_uuid, parse_id
from .money import format_amount, parse_amount
from .text import clean_text

DESCRIPTION_MAX = 500


def _transaction():
    # Inside the idempotency transaction a second savepoint would only cost
    # round trips: the caller's transaction already makes this atomic.
    return contextlib.nullcontext() if db.in_transaction() else db.atomic()



def _id(value, field):
    return parse_id(value, "account", field=field)


def _text(value, field):
    """Optional free text another person reads: printable, at most 500 characters."""
    return clean_text(value, field, max_length=DESCRIPTION_MAX)


# (user id, account id) -> currency. An account's currency never changes, so
# a currency once read for its owner stays true; keyed by owner so nobody
# learns another user's currency from an amount error. Bounded: a reset just
# costs a lookup per account again.
_CURRENCIES = {}
_CURRENCIES_MAX = 100_000


def _account_currency(user_id, account_id, field):
    """The currency of the user's account (to read the amount in), or NotFound.

    A currency never changes, so reading it before the ledger locks the row
    is safe; the ledger re-checks ownership and everything else under lock.
    """
    known = _CURRENCIES.get((user_id, account_id))
    if known is not None:
        return known
    row = db.execute_sql(
        "SELECT currency FROM accounts WHERE id = %s AND user_id = %s "
            "AND type <> 'settlement'",
        (account_id.hex, user_id.hex)).fetchone()
    if row is None:
        raise errors.NotFound("account not found", field=field)
    if len(_CURRENCIES) >= _CURRENCIES_MAX:
        _CURRENCIES.clear()
    _CURRENCIES[(user_id, account_id)] = row[0]
    return row[0]


def _movement_audit(action, entity_type, entity_id, user_id, posting, request_id, **extra):
    audit.record(action, entity_type, entity_id, actor_id=user_id,
                 after={"movement_id": posting.movement_id, "amount": posting.amount,
                        "currency": posting.currency, "from_account_id": posting.debit.account_id,
                        "to_account_id": posting.credit.account_id, **extra},
                 request_id=request_id)


def deposit(user_id, account_id, amount, *, description=None, request_id=None):
    """Deposit into my account from outside (the sandbox's funding path); return the Entry."""
    return _cash(user_id, account_id, amount, description, request_id, inbound=True)


def withdraw(user_id, account_id, amount, *, description=None, request_id=None):
    """Withdraw from my account to outside (overdraft rule applies); return the Entry."""
    return _cash(user_id, account_id, amount, description, request_id, inbound=False)


def _cash(user_id, account_id, amount, description, request_id, *, inbound):
    user_id, account_id = _id(user_id, "user_id"), _id(account_id, "account_id")
    description = _text(description, "description")
    with _transaction():
        minor = parse_amount(amount, _account_currency(user_id, account_id, "account_id"))
        operation = ledger.deposit if inbound else ledger.withdraw
        posting = operation(account_id, minor, user_id=user_id, description=description)
        mine = posting.credit if inbound else posting.debit
        _movement_audit("deposit.create" if inbound else "withdrawal.create", "transaction",
                        mine.entry_id, user_id, posting, request_id)
    # Built from the posting, as transfers are (a read-back costs a query on
    # the hot path): these are the values the ledger wrote, so the body is
    # what GET /transactions/{id} shows (tests compare the two).
    return history.Entry(
        id=mine.entry_id, account_id=account_id, movement_id=posting.movement_id,
        type="deposit" if inbound else "withdrawal",
        direction="inbound" if inbound else "outbound", amount=posting.amount,
        currency=posting.currency, balance_after=mine.balance_after, description=description,
        merchant_name=None, merchant_category=None, reference=ledger.entry_reference(mine.entry_id),
        status="completed", created_at=posting.posted_at, transfer_id=None, p2p_id=None,
        reverses_id=None, counterparty=history.Counterparty("external"))


def transfer(user_id, from_account_id, to_account_id, amount, *, currency=None,
             description=None, request_id=None):
    """Move money between two of my accounts (same currency); return the TransferRecord."""
    user_id = _id(user_id, "user_id")
    from_id = _id(from_account_id, "from_account_id")
    to_id = _id(to_account_id, "to_account_id")
    description = _text(description, "description")
    with _transaction():
        source_currency = _account_currency(user_id, from_id, "from_account_id")
        minor = parse_amount(amount, source_currency)
        posting = ledger.transfer(user_id, from_id, to_id, minor, currency=currency,
                                  description=description)
        _movement_audit("transfer.create", "transfer", posting.movement_id, user_id, posting,
                        request_id)
    # Built from the posting: this is the hot path, and the ledger wrote the
    # transfer row from exactly these values in the same transaction.
    return history.TransferRecord(
        id=posting.movement_id, reference=ledger.new_reference("TRF", posting.movement_id),
        from_account_id=from_id, to_account_id=to_id, amount=posting.amount,
        currency=posting.currency, fee=0, description=description, status="completed",
        created_at=posting.posted_at, completed_at=posting.posted_at)


# Every recipient that cannot be paid gets exactly this answer (status, type
# and detail): unknown, inactive, without a usable primary account or one in
# another currency. Different answers would tell a stranger which emails
# are registered here.
RECIPIENT_NOT_FOUND = "recipient not found, or they cannot receive this payment"


def _no_recipient():
    return errors.NotFound(RECIPIENT_NOT_FOUND, field="recipient")


def find_recipient(sender_id, *, email=None, user_id=None, currency=None):
    """``(user_id, display name, primary account id)`` of an active user who can be paid.

    Exactly one of ``email`` / ``user_id``. Unknown, inactive, unverified,
    without an active primary account, or (``currency`` given) whose primary
    account holds another currency: all the same NotFound. Paying yourself
    is SameAccount; a sender whose email is not verified is EmailNotVerified.
    """
    if (email is None) == (user_id is None):
        raise errors.ValidationError("give the recipient's email or user_id (one of them)",
                                     field="recipient")
    if email is not None:
        if not isinstance(email, str):
            raise errors.ValidationError("email must be text", field="recipient_email")
        condition, value = "u.email = %s", normalise_email(email)
    else:
        try:
            value = _id(user_id, "recipient_user_id").hex
        except errors.NotFound:
            raise _no_recipient() from None
        condition = "u.id = %s"
    # One statement from the sender's row: whether they may pay at all is
    # decided before anything about the recipient, so an unverified sender
    # learns nothing about who exists. Only a verified address receives:
    # an unverified one (a squatter's) is the same 404 as an unknown one.
    sender = db.execute_sql(
        "SELECT s.email_verified, u.id, u.first_name, u.last_name, a.id, a.status, a.currency "
        "FROM users s "
        "LEFT JOIN users u ON " + condition + " AND " + _PAYABLE_USER + " "
        "LEFT JOIN accounts a ON a.user_id = u.id AND a.is_primary = %s "
        "WHERE s.id = %s",
        (value, True, as_uuid(sender_id).hex)).fetchone()
    if sender is None or not sender[0]:
        raise _sender_not_verified()
    return _judge_recipient(sender_id, sender[1:], currency)


# Who can be paid at all (the join condition of every recipient look-up).
_PAYABLE_USER = "u.status = 'active' AND u.email_verified"


def _sender_not_verified():
    return errors.EmailNotVerified("verify your email address before sending payments "
                                   "(POST /api/v1/auth/verify-email)")


def _judge_recipient(sender_id, row, currency):
    """``(user_id, name, primary account id)`` from a look-up row, or the one refusal.

    ``row`` is ``(user id, first name, last name, account id, status, currency)``.
    """
    if row[0] is None:
        raise _no_recipient()
    recipient = as_uuid(row[0])
    if recipient == as_uuid(sender_id):
        raise errors.SameAccount("you cannot pay yourself; use a transfer between your accounts",
                                 field="recipient")
    # Read without a lock: the ledger re-checks status and currency under its
    # locks, so a change in between is refused there (as account-not-active
    # or currency-mismatch), never paid.
    if row[3] is None or row[4] != "active" or (currency is not None and row[5] != currency):
        raise _no_recipient()
    return recipient, history.display_name(row[1], row[2]), as_uuid(row[3])


def find_recipients(sender_id, targets):
    """``find_recipient`` for many at once, in one statement: the same rules and answers.

    ``targets`` are ``(email, user_id, currency)`` with exactly one of email
    and user_id. Returns, in order, the ``(user_id, name, account id)`` of each
    or the error ``find_recipient`` would raise for it. A sender whose email is
    not verified is EmailNotVerified for all of them (raised).
    """
    emails, ids, known = [], [], []
    for email, user_id, _ in targets:
        try:
            ids.append(None if user_id is None else _id(user_id, "recipient_user_id").hex)
            known.append(True)
        except errors.NotFound:
            ids.append(None)
            known.append(False)
        emails.append(None if email is None else normalise_email(email))
    rows = db.execute_sql(
        "SELECT s.email_verified, u.id, u.first_name, u.last_name, a.id, a.status, a.currency "
        "FROM users s "
        "CROSS JOIN unnest(%s::text[], %s::uuid[]) WITH ORDINALITY AS q(email, uid, n) "
        "LEFT JOIN users u ON (u.email = q.email OR u.id = q.uid) AND " + _PAYABLE_USER + " "
        "LEFT JOIN accounts a ON a.user_id = u.id AND a.is_primary = %s "
        "WHERE s.id = %s ORDER BY q.n",
        (emails, ids, True, as_uuid(sender_id).hex)).fetchall()
    if not rows or not rows[0][0]:
        raise _sender_not_verified()
    found = []
    for (_, _, currency), row, ok in zip(targets, rows, known):
        try:
            found.append(_judge_recipient(sender_id, row[1:] if ok else (None,) * 6, currency))
        except errors.HoardRunError as exc:
            found.append(exc)
    return found


def _sender_can_pay(account_id, amount, account_currency, currency):
    """Refuse, before the recipient is looked up, what the sender's side alone refuses.

    Otherwise "insufficient funds" or "currency mismatch" for a registered
    recipient against "not found" for an unknown one would tell a stranger who
    is registered, without moving a cent. Read without a lock: the ledger
    checks again under its locks (a payment racing another can still fail
    there, which reveals nothing the race did not).
    """
    if currency is not None and currency != account_currency:
        raise errors.CurrencyMismatch(
            f"currency mismatch: the source account holds {account_currency}, not {currency}",
            field="currency")
    status, enough = db.execute_sql(
        "SELECT status, hoardrun_funds_ok(id, balance, overdraft_limit, %s, now()) "
        "FROM accounts WHERE id = %s", (amount, account_id.hex)).fetchone()
    if status != "active":
        raise errors.AccountNotActive(f"the source account is {status}", field="from_account_id")
    if not enough:
        raise errors.InsufficientFunds("insufficient funds", field="amount")


def _primary_account(user_id):
    row = db.execute_sql(
        "SELECT id FROM accounts WHERE user_id = %s AND is_primary = %s",
        (user_id.hex, True)).fetchone()
    if row is None:
        raise errors.NotFound("you have no primary account; give from_account_id",
                              field="from_account_id")
    return as_uuid(row[0])


def p2p(user_id, amount, *, recipient_email=None, recipient_user_id=None,
        from_account_id=None, currency=None, note=None, request_id=None):
    """Pay another user, into their PRIMARY account, from my account; return the Payment.

    ``from_account_id`` defaults to my primary account. Same currency only.
    """
    user_id = _id(user_id, "user_id")
    note = _text(note, "note")
    with _transaction():
        # The sender's side first: what it answers does not depend on who the
        # recipient is, so it tells nothing about them.
        source = (_primary_account(user_id) if from_account_id is None
                  else _id(from_account_id, "from_account_id"))
        source_currency = _account_currency(user_id, source, "from_account_id")
        minor = parse_amount(amount, source_currency)
        _sender_can_pay(source, minor, source_currency, currency)
        recipient, name, recipient_account = find_recipient(
            user_id, email=recipient_email, user_id=recipient_user_id,
            currency=source_currency)
        try:
            posting = ledger.p2p_payment(user_id, source, recipient_account, minor,
                                         currency=currency, note=note)
        except errors.AccountNotActive as exc:
            # Frozen or closed since find_recipient read it: a sender must
            # not learn the state of the recipient's account (the credited,
            # "destination" side of the ledger's pair), only that it failed.
            if exc.detail.startswith("the destination account"):
                raise _no_recipient() from None
            raise
        _movement_audit("p2p.create", "p2p", posting.movement_id, user_id, posting, request_id,
                        recipient_id=recipient)
    return history.Payment(
        id=posting.movement_id, reference=ledger.new_reference("P2P", posting.movement_id),
        direction="sent", account_id=source,
        counterparty=history.Counterparty("user", user_id=recipient, name=name),
        amount=posting.amount, currency=posting.currency, note=note, status="completed",
        created_at=posting.posted_at, completed_at=posting.posted_at)


# --------------------------------------------------------------------------
# Batches

#: At most this many legs in one batch.
BATCH_MAX_LEGS = ledger.BATCH_MAX_LEGS


@dataclass(frozen=True)
class LegRequest:
    """One leg as asked: from my account to my other account or to another user."""

    from_account_id: object
    amount: object
    to_account_id: object = None
    recipient_email: object = None
    recipient_user_id: object = None
    description: object = None


@dataclass(frozen=True)
class BatchLegRecord:
    """One made leg: a transfer or a P2P payment (``counterparty`` for the latter)."""

    index: int
    kind: str
    id: uuid.UUID
    reference: str
    from_account_id: uuid.UUID
    to_account_id: uuid.UUID | None
    counterparty: object
    amount: int
    currency: str
    description: str | None
    created_at: object


@dataclass(frozen=True)
class BatchRecord:
    id: uuid.UUID
    legs: list


def _leg_failure(index, exc):
    return {"index": index, "type": exc.code, "detail": exc.detail}


def batch(user_id, legs, *, request_id=None):
    """Make every leg, or none: transfers to my accounts and P2P payments to other users.

    Up to BATCH_MAX_LEGS legs; recipients follow the P2P rules
    (``find_recipient``: verified, active, with a primary account in the
    leg's currency, all else one identical not-found). Refused as a whole
    with BatchRefused, whose ``legs`` are ``{index, type, detail}`` for each
    failing leg (``type`` the problem code that leg alone would have got).
    All accounts are locked, checked and posted in one ledger call.
    """
    user_id = _id(user_id, "user_id")
    if not 1 <= len(legs) <= BATCH_MAX_LEGS:
        raise errors.ValidationError(f"a batch has 1 to {BATCH_MAX_LEGS} legs", field="legs")
    failures, planned, targets = [], [None] * len(legs), []
    with _transaction():
        for index, leg in enumerate(legs):
            try:
                planned[index] = _plan_leg(user_id, leg, targets, index)
            except errors.HoardRunError as exc:
                if exc.status >= 500:
                    raise
                failures.append(_leg_failure(index, exc))
        # The sender's side of every leg first (as for one P2P payment): a leg
        # the sender cannot fund is refused alike whoever its recipient is,
        # and its recipient is not looked up, so a refusal never tells a
        # registered address from an unknown one.
        for index in _unfunded_legs(planned):
            failures.append(_leg_failure(index, errors.InsufficientFunds("insufficient funds",
                                                                         field="amount")))
            planned[index] = None
        targets = [t for t in targets if planned[t[0]] is not None]
        if targets:
            found = find_recipients(user_id, [t[1:] for t in targets])
            for (index, *_), result in zip(targets, found):
                if isinstance(result, errors.HoardRunError):
                    failures.append(_leg_failure(index, result))
                    planned[index] = None
                elif planned[index] is not None:
                    planned[index] = dict(planned[index], to=result[2], counterparty=result)
        if failures:
            # Name the ledger's reasons for the other legs too: a dry run of
            # them, rolled back whatever it finds.
            rest = [(i, p) for i, p in enumerate(planned) if p is not None]
            if rest:
                failures.extend(_dry_run(user_id, rest))
            raise _refused(failures)
        made = [_ledger_leg(p) for p in planned]
        try:
            postings = ledger.batch(user_id, made)
        except errors.BatchRefused as exc:
            raise _refused([{"index": f["index"], **_ledger_failure(planned[f["index"]], f)}
                            for f in exc.extra["failures"]]) from None
        batch_id = uuid.uuid4()
        audit.record("batch.create", "batch", batch_id, actor_id=user_id, after={
            # Decimal strings in each leg's currency: a batch has no one currency
            # for audit.shown to render minor units in.
            "legs": [{"kind": "p2p" if leg.p2p else "transfer", "movement_id": leg.id,
                      "amount": format_amount(posting.amount, posting.currency),
                      "currency": posting.currency, "from_account_id": leg.from_account_id}
                     for leg, posting in zip(made, postings)],
            "currency_totals": {currency: format_amount(total, currency)
                                for currency, total in _totals(postings).items()}},
            request_id=request_id)
    records = []
    for index, (p, leg, posting) in enumerate(zip(planned, made, postings)):
        counterparty = None
        if p["p2p"]:
            recipient, name, _ = p["counterparty"]
            counterparty = history.Counterparty("user", user_id=recipient, name=name)
        records.append(BatchLegRecord(
            index=index, kind="p2p" if p["p2p"] else "transfer", id=leg.id,
            reference=leg.reference, from_account_id=leg.from_account_id,
            to_account_id=None if p["p2p"] else leg.to_account_id, counterparty=counterparty,
            amount=posting.amount, currency=posting.currency, description=leg.text,
            created_at=posting.posted_at))
    return BatchRecord(id=batch_id, legs=records)


def _unfunded_legs(planned):
    """Indexes of the legs their source cannot fund, legs taken in order (read unlocked).

    Earlier legs count: what one moves out of an account, later legs cannot
    spend, and what one moves into a source account, they can.

    The ledger checks again under its locks; this only decides what the
    answer may say before any recipient is looked up.
    """
    sources = {p["from"] for p in planned if p is not None}
    if not sources:
        return []
    available = dict(db.execute_sql(
        "SELECT id, balance + overdraft_limit - hoardrun_held(id, now()) FROM accounts "
        "WHERE id = ANY(%s::uuid[])", ([s.hex for s in sources],)).fetchall())
    available = {as_uuid(k): v for k, v in available.items()}
    unfunded = []
    for index, plan in enumerate(planned):
        if plan is None:
            continue
        if plan["amount"] > available.get(plan["from"], 0):
            unfunded.append(index)
            continue
        available[plan["from"]] -= plan["amount"]
        if not plan["p2p"] and plan["to"] in available:  # an earlier leg may fund a later one
            available[plan["to"]] += plan["amount"]
    return unfunded


def _ledger_leg(plan):
    prefix = "P2P" if plan["p2p"] else "TRF"
    return ledger.BatchLeg(id=plan["id"], p2p=plan["p2p"], from_account_id=plan["from"],
                           to_account_id=plan["to"], amount=plan["amount"],
                           reference=ledger.new_reference(prefix, plan["id"]),
                           text=plan["text"])


class _DryRun(Exception):
    """Undoes a batch run only to learn which of its legs the ledger refuses."""


def _dry_run(user_id, rest):
    """The ledger's failures of the legs ``rest`` (``(index, plan)``), nothing kept."""
    try:
        with db.atomic():  # a savepoint inside the batch's transaction
            ledger.batch(user_id, [_ledger_leg(plan) for _, plan in rest])
            raise _DryRun
    except _DryRun:
        return []
    except errors.BatchRefused as exc:
        return [{"index": rest[f["index"]][0], **_ledger_failure(rest[f["index"]][1], f)}
                for f in exc.extra["failures"]]


def _plan_leg(user_id, leg, targets, index):
    source = _id(leg.from_account_id, "from_account_id")
    currency = _account_currency(user_id, source, "from_account_id")
    minor = parse_amount(leg.amount, currency)
    text = _text(leg.description, "description")
    given = [v for v in (leg.to_account_id, leg.recipient_email, leg.recipient_user_id)
             if v is not None]
    if len(given) != 1:
        raise errors.ValidationError("give exactly one of to_account_id, recipient_email or "
                                     "recipient_user_id", field="to_account_id")
    plan = {"id": uuid.uuid4(), "from": source, "amount": minor, "text": text}
    if leg.to_account_id is not None:
        to = _id(leg.to_account_id, "to_account_id")
        if to == source:
            raise errors.SameAccount("cannot transfer to the same account",
                                     field="to_account_id")
        return dict(plan, p2p=False, to=to)
    targets.append((index, leg.recipient_email, leg.recipient_user_id, currency))
    return dict(plan, p2p=True, to=None)


def _ledger_failure(plan, failure):
    """A ledger refusal of one leg as that leg's ``{type, detail}``."""
    if plan["p2p"] and failure["side"] == "destination":
        # As for a single P2P payment: nothing about the recipient's account.
        return {"type": errors.NotFound.code, "detail": RECIPIENT_NOT_FOUND}
    return {"type": failure["code"], "detail": failure["message"]}


def _refused(failures):
    failures = sorted(failures, key=lambda f: f["index"])
    shown = ", ".join(str(f["index"]) for f in failures[:10])
    more = "" if len(failures) <= 10 else f" and {len(failures) - 10} more"
    return errors.BatchRefused(f"no leg was made: leg(s) {shown}{more} cannot be (see legs)",
                               field="legs", legs=failures)


def _totals(postings):
    totals = {}
    for posting in postings:
        totals[posting.currency] = totals.get(posting.currency, 0) + posting.amount
    return totals
