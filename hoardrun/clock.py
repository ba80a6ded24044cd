"""The one wall clock: every "now" the application reads in Python comes from here.

The API builds its app with a clock (``create_app(clock=...)``, this by
default) and passes ``now`` down to the domain; domain functions called
without one (tasks, sample data) fall back to ``utcnow``. Tests pin time by
giving the app, or the function, their own clock. Ledger entries are the
exception on purpose: the database stamps them (``clock_timestamp()`` after
the account locks), so their order is the order of the balances.
"""

from datetime import datetime, timezone


def utcnow():
    """The current time, UTC-aware."""
    return datetime.now(timezone.utc)
