"""Schema versions: the peewee-migrate router over ``migrations/``.

Every schema change goes through here, for the tasks, the server's start-up
and the tests alike, so the schema under test is the one migrations build.
"""

import logging
from pathlib import Path

from peewee_migrate import Router

from .db import db

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
MIGRATE_TABLE = "migratehistory"

log = logging.getLogger(__name__)


def router(database=None):
    """A router over the absolute migrations directory (cwd-independent)."""
    return Router(database or db.obj, migrate_dir=MIGRATIONS_DIR, migrate_table=MIGRATE_TABLE,
                  logger=logging.getLogger("hoardrun.migrations"))


def applied_migrations(database=None):
    """Names of the migrations recorded as applied, oldest first."""
    return router(database).done


def pending_migrations(database=None):
    """Names of the migrations on disk that are not applied yet."""
    return router(database).diff


def all_migrations():
    """Every migration on disk, in order."""
    return sorted(p.stem for p in MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.py"))


def migrate(database=None, target=None):
    """Apply pending migrations (up to ``target`` if given); return their names."""
    return router(database).run(target)


def rollback(database=None, steps=1):
    """Roll back the last ``steps`` applied migrations; return their names, newest first."""
    r = router(database)
    done = list(r.done)
    if steps > len(done):
        raise ValueError(f"cannot roll back {steps} migration(s): only {len(done)} applied")
    undone = []
    for _ in range(steps):
        name = r.done[-1]
        r.rollback()
        undone.append(name)
        # The router caches its replayed migrator; a fresh one for each step
        # makes the next rollback see the schema as it now is.
        r = router(database)
    return undone
