"""Admin actions on accounts and the ledger, and reading the audit log.

(User suspension lives with the users, in ``users.py``.) Callers check the
admin role; every action here writes its audit row in the same transaction
as the change.
"""

import uuid

from . import audit, errors, ledger
from .auth import utcnow
from .cursors import page_query
from .db import db
from .ids import as_uuid, parse_id
from .models import SETTLEMENT, Account, AuditLog, Transaction
from .text import clean_text

# action -> (the status it applies to, the status it sets)
_ACCOUNT_TRANSITIONS = {
    "freeze": ("active", "suspended"),
    "unfreeze": ("suspended", "active"),
}


def _uuid_or_404(value, what):
    return parse_id(value, what)


def _set_account_status(action, account_id, *, actor_id, reason, request_id, now):
    required, target = _ACCOUNT_TRANSITIONS[action]
    # Written into the audit log for good and read by other admins: printable only.
    reason = clean_text(reason, "reason", max_length=500)
    account_id = _uuid_or_404(account_id, "account")
    with db.atomic():
        account = Account.get_or_none(Account.id == account_id)
        if account is None:
            raise errors.NotFound("account not found")
        if account.type == SETTLEMENT:
            raise errors.Conflict("settlement accounts cannot be frozen or unfrozen")
        if account.status != required:
            if action == "freeze" and account.status == "closed":
                raise errors.Conflict("a closed account cannot be frozen")
            wanted = "an active account can be frozen" if action == "freeze" else \
                "a frozen account can be unfrozen"
            raise errors.Conflict(f"only {wanted}; this one is {account.status}")
        # The WHERE on the old status makes a racing close or freeze lose cleanly.
        updated = (Account
                   .update({Account.status: target, Account.updated_at: now or utcnow()})
                   .where((Account.id == account.id) & (Account.status == required))
                   .execute())
        if not updated:
            raise errors.Conflict("the account changed meanwhile; try again")
        after = {"status": target}
        if reason:
            after["reason"] = reason
        audit.record(f"account.{action}", "account", account.id, actor_id=actor_id,
                     before={"status": required}, after=after, request_id=request_id)
    return Account.get_by_id(account.id)


def freeze_account(account_id, *, actor_id, reason=None, request_id=None, now=None):
    """Freeze an active account (status ``suspended``): no money moves in or out."""
    return _set_account_status("freeze", account_id, actor_id=actor_id, reason=reason,
                               request_id=request_id, now=now)


def unfreeze_account(account_id, *, actor_id, reason=None, request_id=None, now=None):
    """Unfreeze a frozen account (back to ``active``)."""
    return _set_account_status("unfreeze", account_id, actor_id=actor_id, reason=reason,
                               request_id=request_id, now=now)


def reverse_entry(entry_id, *, actor_id, description=None, request_id=None):
    """Reverse the movement of ledger entry ``entry_id``; return the two new entries.

    The original entries stay as they are (the ledger is append-only); the
    reversing pair points at them. Errors are the ledger's: NotFound,
    ReversalNotAllowed (already reversed, a reversal itself, closed account).
    """
    entry_id = _uuid_or_404(entry_id, "entry")
    # Shown in the customer's own history: printable text only.
    description = clean_text(description, "description", max_length=500)
    with db.atomic():
        posting = ledger.reverse(entry_id, description=description)
        new_ids = [posting.debit.entry_id, posting.credit.entry_id]
        audit.record("transaction.reverse", "transaction", entry_id, actor_id=actor_id,
                     after={"movement_id": posting.movement_id, "entries": new_ids,
                            "amount": posting.amount, "currency": posting.currency},
                     request_id=request_id)
    entries = {e.id: e for e in Transaction.select().where(Transaction.id.in_(new_ids))}
    return [entries[i] for i in new_ids]


def list_audit(*, secret, entity_type=None, entity_id=None, actor_id=None, action=None,
               limit=None, cursor=None):
    """Audit rows newest first, filtered by exact values; return a ``cursors.Page``."""
    query = AuditLog.select()
    if entity_type:
        query = query.where(AuditLog.entity_type == entity_type)
    if entity_id:
        # Stored in canonical text form (UUIDs with dashes), see audit.record.
        try:
            entity_id = str(uuid.UUID(entity_id))
        except ValueError:
            pass
        query = query.where(AuditLog.entity_id == entity_id)
    if actor_id:
        try:
            actor = as_uuid(actor_id)
        except ValueError:
            raise errors.ValidationError("actor_id must be a UUID", field="actor_id") from None
        query = query.where(AuditLog.actor == actor)
    if action:
        query = query.where(AuditLog.action == action)
    return page_query(query, AuditLog, secret=secret, scope="admin:audit",
                      filters={"entity_type": entity_type, "entity_id": entity_id,
                               "actor_id": actor_id, "action": action},
                      limit=limit, cursor=cursor)
