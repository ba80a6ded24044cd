"""The append-only audit log: who changed what, before and after, under which request.

Call ``record`` inside the same database transaction as the change it
describes, so either both land or neither does. Rows can never be edited or
deleted (a trigger from migration 001 refuses it).
"""

import json
import uuid
from datetime import date, datetime
from decimal import Decimal

from .db import execute_deferred
from .ids import as_uuid
from .money import CURRENCIES, format_amount

#: Keys of an audit state that hold money as integer minor units. Rows store
#: minor units (exact, and the same as the ledger); ``shown`` renders them.
MONEY_KEYS = frozenset({"amount", "balance", "balance_after", "cost_basis", "daily_limit",
                        "monthly_limit", "refunded_total", "overdraft_limit", "minimum_balance",
                        "fee", "captured_amount", "released_amount"})


def _default(value):
    if isinstance(value, (uuid.UUID, Decimal)):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"cannot audit a {type(value).__name__}")


def _dump(state):
    return None if state is None else json.dumps(state, default=_default, sort_keys=True)


def record(action, entity_type, entity_id=None, *, actor_id=None, before=None, after=None,
           request_id=None):
    """Append one audit row; ``before``/``after`` are JSON-able dicts (never secrets).

    ``entity_id`` is stored as text in its canonical form (UUIDs with dashes).
    """
    row_id = uuid.uuid4()
    values = [row_id.hex, None if actor_id is None else as_uuid(actor_id).hex, action,
              entity_type, None if entity_id is None else str(entity_id), _dump(before),
              _dump(after), request_id]
    # Nobody reads this insert back in the request: it rides with the
    # transaction's next statement or its COMMIT. created_at is the column
    # DEFAULT (the transaction's time, microseconds).
    execute_deferred(
        "INSERT INTO audit_log (id, actor_id, action, entity_type, entity_id, before, after, "
        "request_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", values)
    return row_id


def shown(state):
    """A stored before/after state as a user or admin sees it: money as decimal strings.

    Every key in ``MONEY_KEYS`` whose value is a whole number becomes the
    decimal string of the state's own ``currency`` ("30.00", not 3000), old
    rows included. A state without a known currency is returned as it is.
    """
    if not isinstance(state, dict) or state.get("currency") not in CURRENCIES:
        return state
    currency = state["currency"]
    return {key: (format_amount(value, currency)
                  if key in MONEY_KEYS and isinstance(value, int) and not isinstance(value, bool)
                  else value)
            for key, value in state.items()}
