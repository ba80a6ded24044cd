"""Operator tasks: ``invoke --list`` shows them, ``invoke --help TASK`` explains one.

Every task reads its settings from the real environment when it runs (never
at import), fails with one line and exit code 1 instead of a traceback, and
uses only Python APIs (no shell pipes, pty or chdir) so it works on Windows.

NOTE: ``hoardrun`` is imported inside the tasks, not at the top: ``invoke
test --coverage`` starts coverage inside ``pytest.main``, and modules this
process had already imported would show their top-level lines as missed.
"""

import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from invoke import Collection, Exit, task

ROOT = Path(__file__).resolve().parent
MIGRATION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,59}$")
MAINTENANCE_DB = "postgres"


# --------------------------------------------------------------------------- helpers

class _ConciseFormatter(logging.Formatter):
    """INFO lines as the bare message, warnings with their level, never a traceback."""

    def format(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        return message


def _setup_logging():
    """Send our INFO lines to stderr, one line each (idempotent)."""
    root = logging.getLogger()
    if not any(getattr(h, "_hoardrun_tasks", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_ConciseFormatter())
        handler._hoardrun_tasks = True
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("hoardrun").setLevel(logging.INFO)
    # The tasks print their own line per migration and turn a failure into one
    # line; the router would log the same failure again with a traceback.
    logging.getLogger("hoardrun.migrations").setLevel(logging.CRITICAL)
    logging.getLogger("peewee_migrate").setLevel(logging.WARNING)


def _url_secrets(url):
    """The password in ``url`` (raw and decoded), to scrub from any message."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ()
    return tuple(s for s in {password, unquote(password)} if s) if password else ()


def _one_line(error, secrets=()):
    """``error`` as one line of text with any known secret replaced by ``***``."""
    text = " ".join(str(error).split()) or type(error).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _settings(*, start_server=True):
    """Settings from the environment, or exit with the one-line reason.

    With no DATABASE_URL, the embedded PostgreSQL server is started (if it
    is not running already) and the settings point at it; ``start_server=False``
    leaves the URL empty (for ``db.server`` itself).
    """
    from hoardrun import embedded
    from hoardrun.config import load_settings
    from hoardrun.errors import ConfigError

    _setup_logging()
    try:
        settings = load_settings()
        return embedded.with_server(settings) if start_server else settings
    except ConfigError as error:
        raise Exit(str(error), code=1) from None


def _database_errors():
    import peewee
    import psycopg2

    from hoardrun.db import UNAVAILABLE_ERRORS

    return UNAVAILABLE_ERRORS + (peewee.DatabaseError, psycopg2.Error)


@contextmanager
def _database(settings=None):
    """Bind and connect the database; turn every expected failure into one line."""
    from hoardrun import db as dbm
    from hoardrun.errors import HoardRunError

    settings = settings or _settings()
    secrets = _url_secrets(settings.database_url)
    where = settings.masked_database_url
    errors = _database_errors()
    try:
        database = dbm.init_db(settings)
        try:
            try:
                database.connect(reuse_if_open=True)
            except errors as error:
                raise Exit(f"cannot connect to the database at {where}: "
                           f"{_one_line(error, secrets)}", code=1) from None
            yield settings, database
        finally:
            dbm.release_connection()
            dbm.close_db()
    except HoardRunError as error:
        raise Exit(_one_line(error, secrets), code=1) from None
    except errors as error:
        raise Exit(f"database error at {where}: {_one_line(error, secrets)}", code=1) from None


@contextmanager
def _guard_settings(settings):
    """One-line failures for work done before ``_database`` is entered."""
    try:
        yield
    except _database_errors() as error:
        raise Exit(f"database error at {settings.masked_database_url}: "
                   f"{_one_line(error, _url_secrets(settings.database_url))}", code=1) from None


def _migration_state(database):
    """``(applied, pending, unknown)`` migration names, without writing anything.

    ``unknown`` are applied migrations whose file is not in this checkout.
    """
    from hoardrun import schema

    on_disk = schema.all_migrations()
    if not database.table_exists(schema.MIGRATE_TABLE):
        return [], on_disk, []
    applied = schema.applied_migrations(database)
    done = set(applied)
    pending = [name for name in on_disk if name not in done]
    unknown = [name for name in applied if name not in set(on_disk)]
    return applied, pending, unknown


def _require_migrated(database):
    _, pending, _ = _migration_state(database)
    if pending:
        raise Exit(f"{len(pending)} migration(s) pending ({', '.join(pending)}): "
                   "run `invoke db.migrate` first", code=1)


def _apply_migrations(settings, database):
    """Apply pending migrations one by one, printing each; return their names."""
    from hoardrun import schema

    _, pending, _ = _migration_state(database)
    for name in pending:
        try:
            schema.migrate(database, target=name)
        except Exception as error:  # noqa: BLE001  a migration is code we did not write here
            detail = _one_line(error, _url_secrets(settings.database_url))
            if not isinstance(error, _database_errors()):
                detail = f"{type(error).__name__}: {detail}"
            raise Exit(f"migration {name} failed and was rolled back: {detail}",
                       code=1) from None
        print(f"applied {name}")
    if not pending:
        print("database is up to date: no migration pending")
    return pending


def _create_postgres_database_if_missing(settings):
    """Create the PostgreSQL database named in the URL when the server lacks it.

    Checked through the maintenance database rather than by parsing the
    (localised) connection error; any other failure is left to the caller.
    """
    from hoardrun import db as dbm

    parts = urlsplit(settings.database_url)
    name = unquote(parts.path.lstrip("/"))
    if not name or name == MAINTENANCE_DB:
        return False
    target = dbm.build_database(settings)
    try:
        target.connect()
        return False
    except _database_errors():
        pass  # the connection error is reported by the caller if it persists
    finally:
        target.close_all()
    admin_url = urlunsplit((parts.scheme, parts.netloc, "/" + MAINTENANCE_DB, parts.query, ""))
    admin = dbm.build_database(settings.replace(database_url=admin_url))
    try:
        exists = admin.execute_sql("SELECT 1 FROM pg_database WHERE datname = %s",
                                   (name,)).fetchone()
        if exists:
            return False
        # Identifiers cannot be parameters; double quotes inside are doubled.
        admin.execute_alone('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    except _database_errors():
        return False
    finally:
        admin.close_all()
    logging.getLogger("hoardrun.tasks").info("created database %s", name)
    return True


def _drop_everything(database):
    """Drop every table, view, routine, sequence and type of the current schema."""
    with database.atomic():
        statements = [f'DROP VIEW IF EXISTS "{v}" CASCADE' for (v,) in database.execute_sql(
            "SELECT viewname FROM pg_views WHERE schemaname = current_schema()")]
        statements += [f'DROP TABLE IF EXISTS "{t}" CASCADE' for (t,) in database.execute_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
        # Routines and types the migrations created (not those of extensions).
        statements += [f"DROP ROUTINE IF EXISTS {r} CASCADE" for (r,) in database.execute_sql(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = current_schema() AND p.prokind IN ('f', 'p')"
            " AND NOT EXISTS (SELECT 1 FROM pg_depend d"
            "                 WHERE d.objid = p.oid AND d.deptype = 'e')")]
        statements += [f"DROP SEQUENCE IF EXISTS \"{s}\" CASCADE" for (s,) in database.execute_sql(
            "SELECT sequence_name FROM information_schema.sequences"
            " WHERE sequence_schema = current_schema()")]
        statements += [f"DROP TYPE IF EXISTS {t} CASCADE" for (t,) in database.execute_sql(
            "SELECT t.oid::regtype::text FROM pg_type t"
            " JOIN pg_namespace n ON n.oid = t.typnamespace"
            " LEFT JOIN pg_class r ON r.oid = t.typrelid"
            " WHERE n.nspname = current_schema()"
            # enums, domains, ranges and free-standing composites (not row types of tables)
            " AND (t.typtype IN ('e', 'd', 'r') OR (t.typtype = 'c' AND r.relkind = 'c'))"
            " AND NOT EXISTS (SELECT 1 FROM pg_depend d"
            "                 WHERE d.objid = t.oid AND d.deptype = 'e')")]
        for statement in statements:
            database.execute_sql(statement)


def _confirm(question):
    """Ask ``question`` on the terminal; exit unless the answer is ``yes``."""
    if sys.stdin is None or not sys.stdin.isatty():
        raise Exit("refusing to continue without confirmation: no terminal to ask on, "
                   "pass --yes", code=1)
    try:
        answer = input(f"{question} Type 'yes' to continue: ")
    except EOFError:
        answer = ""
    if answer.strip().lower() != "yes":
        raise Exit("cancelled: nothing was changed", code=1)


# --------------------------------------------------------------------------- db.*

def _serve_plan(settings):
    """What ``invoke serve`` with its defaults would open, in one line."""
    from hoardrun import db as dbm
    from hoardrun.api import serve as serving
    from hoardrun.errors import ConfigError

    allowance = dbm.connection_allowance(settings)
    try:
        plan = dbm.plan_pools(settings, allowance, workers=serving.DEFAULT_WORKERS,
                              threads=serving.DEFAULT_THREADS)
    except ConfigError as error:
        return f"invoke serve with its defaults would not start: {error}"
    return f"invoke serve (granian, defaults): {plan.describe()}"


@task(help={"verbose": "also show environment, live pool numbers, timeouts, each read replica "
                         "with its lag, and each migration"})
def check(c, verbose=False):
    """Report connection, server, pool, SSL and migrations; exit 1 when not healthy."""
    from hoardrun import db as dbm
    from hoardrun import embedded, replicas

    with _database() as (settings, database):
        version = dbm.server_version()
        ssl = dbm.ssl_in_use()
        applied, pending, unknown = _migration_state(database)
        live = dbm.pool_info()
        serve_plan = _serve_plan(settings) if verbose else None
        replica_set = replicas.configure(settings)
        try:
            replica_reports = replica_set.report() if verbose else []
        finally:
            replica_set.close()
    print(f"database:   {settings.masked_database_url}")
    print(f"server:     {version}" + (f" (embedded, data in {embedded.data_directory(settings.data_dir)})"
                                      if settings.embedded else ""))
    if verbose:
        print(f"env:        {settings.env}")
    print(f"pool:       size {settings.pool_size}, max overflow {settings.max_overflow}"
          f" (at most {settings.max_connections} connections), timeout {settings.pool_timeout:g}s,"
          f" recycle {settings.pool_recycle}s, pre-ping {'on' if settings.pool_pre_ping else 'off'}")
    if verbose:
        print(f"pool now:   {live['checked_out']} checked out, {live['checked_in']} idle,"
              f" {live['overflow']} overflow")
        print(f"timeouts:   connect {settings.connect_timeout}s, statement {settings.command_timeout}s")
        print(f"serving:    {serve_plan}")
        print(f"replicas:   {len(settings.replica_urls) or 'none'}"
              + (f" (max lag {settings.replica_max_lag:g}s)" if settings.replica_urls else ""))
        for report in replica_reports:
            lag = "unknown" if report["lag_seconds"] is None else f"{report['lag_seconds']:g}s"
            state = "ok" if report["healthy"] else "not used"
            print(f"  {report['url']}: {state}, lag {lag}"
                  + (f", replayed to {report['replay_lsn']}" if report["replay_lsn"] else "")
                  + (f" ({report['error']})" if report["error"] else ""))
    if settings.embedded:
        print("ssl:        not needed (embedded server on a local Unix socket or loopback)")
    else:
        print(f"ssl:        {'in use' if ssl else 'not in use'} (sslmode={settings.ssl_mode})")
    print(f"migrations: {len(applied)} applied, {len(pending)} pending")
    if verbose:
        for name in applied:
            print(f"  [x] {name}" + ("  (file missing from migrations/)" if name in unknown else ""))
        for name in pending:
            print(f"  [ ] {name}")
    if pending:
        raise Exit(f"not healthy: {len(pending)} migration(s) pending ({', '.join(pending)}): "
                   "run `invoke db.migrate`", code=1)
    if unknown:
        raise Exit(f"not healthy: applied migration(s) missing from migrations/ "
                   f"({', '.join(unknown)}): is this checkout older than the database?", code=1)
    print("status:     healthy")


@task(help={"stop": "stop the embedded server (fast shutdown: sessions are ended)",
            "status": "only report whether it runs, where, and which version"})
def server(c, stop=False, status=False):
    """Start the embedded PostgreSQL server (used when DATABASE_URL is unset), or stop it."""
    from hoardrun import embedded

    settings = _settings(start_server=False)
    if settings.database_url:
        raise Exit("DATABASE_URL is set: HoardRun manages no server of its own", code=1)
    if stop and status:
        raise Exit("use either --stop or --status, not both", code=1)
    try:
        server = embedded.EmbeddedServer(settings.data_dir)
        if stop:
            print("stopped the embedded server" if server.stop()
                  else "the embedded server was not running")
            return
        if not status:
            server.ensure_running()
        state = server.status()
    except embedded.EmbeddedServerError as error:
        raise Exit(str(error), code=1) from None
    version = f"PostgreSQL {state['version']}" if state["version"] else "no cluster yet"
    print(f"embedded:   {'running (pid ' + str(state['pid']) + ')' if state['running'] else 'stopped'}")
    print(f"version:    {version}, binaries in {state['bindir']}")
    print(f"data:       {state['data_dir']}")
    print(f"url:        {state['url']}")
    if status and not state["running"]:
        raise Exit("the embedded server is not running (start it: invoke db.server)", code=1)


@task(auto_shortflags=False, help={
    "app_role": "also create (if missing) the login role NAME the app should connect as, with "
                "exactly its grants: no UPDATE, DELETE or TRUNCATE of ledger entries and audit "
                "rows; its password is HOARDRUN_APP_ROLE_PASSWORD when set"})
def init(c, app_role=None):
    """Create the database if it is missing, apply every migration, optionally grant the app role."""
    import os

    from hoardrun import roles

    if app_role is not None:
        try:
            roles.check_role_name(app_role)
        except ValueError as error:
            raise Exit(str(error), code=1) from None
    settings = _settings()
    with _guard_settings(settings):
        _create_postgres_database_if_missing(settings)
    with _database(settings) as (settings, database):
        _apply_migrations(settings, database)
        if app_role is None:
            return
        try:
            created, guarded, others = roles.grant_app_role(
                database, app_role, password=os.environ.get("HOARDRUN_APP_ROLE_PASSWORD"))
        except ValueError as error:
            raise Exit(str(error), code=1) from None
    print(f"{'created' if created else 'updated'} role {app_role}: SELECT, INSERT on "
          f"{', '.join(guarded)}; SELECT, INSERT, UPDATE, DELETE on {len(others)} other tables")


@task
def migrate(c):
    """Apply the pending migrations."""
    with _database() as (settings, database):
        _apply_migrations(settings, database)


@task(help={"steps": "how many of the latest applied migrations to undo (default 1)"})
def rollback(c, steps=1):
    """Undo the latest applied migration(s) with their rollback code."""
    from hoardrun import schema

    if steps < 1:
        raise Exit(f"--steps must be 1 or more, got {steps}", code=1)
    with _database() as (settings, database):
        try:
            undone = schema.rollback(database, steps=steps)
        except ValueError as error:
            raise Exit(str(error), code=1) from None
    for name in undone:
        print(f"rolled back {name}")


@task
def history(c):
    """List every migration, applied [x] or pending [ ]."""
    with _database() as (settings, database):
        applied, pending, unknown = _migration_state(database)
    for name in applied:
        print(f"[x] {name}" + ("  (file missing from migrations/)" if name in unknown else ""))
    for name in pending:
        print(f"[ ] {name}")
    print(f"{len(applied)} applied, {len(pending)} pending")


@task
def current(c):
    """Print the latest applied migration."""
    with _database() as (settings, database):
        applied, _, _ = _migration_state(database)
    print(applied[-1] if applied else "no migration applied")


@task(help={"name": "what the migration does, in snake_case (e.g. add_user_nickname)"})
def makemigration(c, name):
    """Write migrations/NNN_NAME.py from the models' difference to the migrations."""
    from hoardrun import models, schema

    if not MIGRATION_NAME.match(name):
        raise Exit(f"migration name {name!r} is not valid: expected lowercase letters, "
                   "digits and underscores, starting with a letter", code=1)
    with _database() as (settings, database):
        created = schema.router(database).create(name, auto=list(models.MODELS))
    if not created:
        print("no changes: the models match the migrations")
        return
    print(f"created {schema.MIGRATIONS_DIR / (created + '.py')}")
    # NOTE: autogeneration cannot see CHECK constraints, partial indexes or
    # triggers, and reads a rename as drop + add: a human must review it.
    print("review it before applying: add CHECKs, partial indexes and triggers by hand, "
          "and make rollback real")


@task
def sample(c):
    """Load the demo users, accounts and history (idempotent; refused in production)."""
    settings = _settings()
    if settings.is_production:
        raise Exit("db.sample is refused when HOARDRUN_ENV=production", code=1)
    with _database(settings) as (settings, database):
        from hoardrun.sample import load_sample_data

        _require_migrated(database)
        report = load_sample_data()
    for line in report:
        print(line)


@task(help={"yes": "do not ask for confirmation (required when there is no terminal)"})
def reset(c, yes=False):
    """Drop all tables and data, then re-apply every migration (refused in production)."""
    settings = _settings()
    if settings.is_production:
        raise Exit("db.reset is refused when HOARDRUN_ENV=production", code=1)
    if not yes:
        _confirm(f"This drops ALL tables and data in {settings.masked_database_url}.")
    with _database(settings) as (settings, database):
        _drop_everything(database)
        print(f"dropped every table in {settings.masked_database_url}")
        _apply_migrations(settings, database)


@task(help={"chain": "also recompute every account's hash chain and name the first entry "
                     "whose content or order was changed"})
def verify(c, chain=False):
    """Check the ledger invariants; print each problem and exit 1 on any drift."""
    with _database() as (settings, database):
        from hoardrun import chain as history_chain
        from hoardrun import ledger

        _require_migrated(database)
        problems = ledger.verify()
        if chain:
            problems += history_chain.verify_chain()
    for problem in problems:
        print(problem)
    if problems:
        raise Exit(f"ledger drift: {len(problems)} problem(s) found", code=1)
    print("ledger verified: balances match their entries and every currency sums to zero"
          + ("; every account's hash chain is intact" if chain else ""))


@task(help={"batch": "keys deleted per transaction (default 1000)"})
def prune(c, batch=1000):
    """Delete idempotency keys older than HOARDRUN_IDEMPOTENCY_TTL, in batches."""
    from hoardrun import idempotency

    if batch < 1:
        raise Exit(f"--batch={batch} is not valid: expected an integer >= 1", code=1)
    with _database() as (settings, database):
        _require_migrated(database)
        deleted = idempotency.prune(settings.idempotency_ttl, batch_size=batch)
    print(f"pruned {deleted} idempotency key(s) first used more than "
          f"{settings.idempotency_ttl}s ago")


@task(name="backup", help={"output": "file to write (default hoardrun-<database>-<UTC time>.dump "
                                    "here); refused if it exists"})
def backup_db(c, output=None):
    """Write a consistent pg_dump snapshot (custom format); print its size and sha256."""
    from hoardrun import backup

    settings = _settings()
    with _database(settings) as (settings, database):
        made = backup.backup(settings, output)
    print(f"backup:  {made.path}")
    print(f"size:    {made.size} bytes")
    print(f"sha256:  {made.sha256}  (also in {made.path.name}{backup.CHECKSUM_SUFFIX})")


@task(name="restore", positional=["file"], help={
    "file": "a backup written by db.backup (checked against its .sha256 when present)",
    "target_url": "restore into this postgresql:// URL instead of DATABASE_URL "
                  "(created if missing)",
    "force": "replace the public schema of a non-empty target (never in production)",
})
def restore_db(c, file, target_url=None, force=False):
    """Restore a backup into an empty database, migrate it, then verify the ledger."""
    import os

    from hoardrun import backup
    from hoardrun.config import load_settings
    from hoardrun.errors import ConfigError

    settings = _settings()
    if target_url:
        try:
            settings = load_settings({**os.environ, "DATABASE_URL": target_url})
        except ConfigError as error:
            raise Exit(str(error).replace("DATABASE_URL", "--target-url", 1), code=1) from None
    with _guard_settings(settings):
        _create_postgres_database_if_missing(settings)
    with _database(settings) as (settings, database):
        done = backup.restore(settings, file, force=force)
    print(f"restored {done.path} (sha256 {done.sha256}) into {settings.masked_database_url}")
    for name in done.migrations:
        print(f"applied {name}")
    for problem in done.problems:
        print(problem)
    if done.problems:
        raise Exit(f"restored, but the ledger does not verify: {len(done.problems)} "
                   "problem(s) found", code=1)
    print("ledger verified: balances match their entries and every currency sums to zero")


# --------------------------------------------------------------------------- ledger.*

@task(name="expire-holds")
def expire_holds(c):
    """Record card authorizations past their expiry as expired (they already stopped counting)."""
    with _database() as (settings, database):
        from hoardrun import holds

        _require_migrated(database)
        count = holds.expire()
    print(f"recorded {count} expired card authorization(s)")


# --------------------------------------------------------------------------- cards.*, prices.*

@task
def rotate_keys(c):
    """Re-encrypt every card number under the first HOARDRUN_CARD_ENCRYPTION_KEYS key."""
    with _database() as (settings, database):
        from hoardrun import cards as card_domain

        _require_migrated(database)
        count = card_domain.rotate_keys(settings)
    print(f"re-encrypted {count} card number(s) under the first key; the keys after it "
          "can now be removed from HOARDRUN_CARD_ENCRYPTION_KEYS")


@task(help={"limit": "how many of the latest messages to show (default 10)"})
def outbox(c, limit=10):
    """Show the latest outbox messages: status, attempts, recipient, subject and body."""
    with _database() as (settings, database):
        from hoardrun import mail

        _require_migrated(database)
        mailer = mail.Mailer.from_settings(settings)
        rows = mail.outbox(max(1, int(limit)))
    if not rows:
        print("the outbox is empty")
    for row in rows:
        print(f"--- {row['created_at']:%Y-%m-%d %H:%M:%S}Z  {row['status']}  "
              f"attempts {row['attempts']}  id {row['id']}")
        print(f"To: {row['recipient']}\nSubject: {row['subject']}")
        if row["last_error"]:
            print(f"Last error: {row['last_error']}")
        if settings.is_production:
            # Bodies hold codes and reset tokens: not for an operator's terminal.
            print("(body not shown in production)")
        elif row["body"] is None:
            print("(body erased after delivery)")
        else:
            print("\n" + (mailer.open(row["body"]) or "(body cannot be decrypted with the "
                                                     "configured keys)"))


@task(name="set", positional=["symbol", "price"], help={
    "symbol": "the ticker, e.g. AAPL (upper-cased)",
    "price": "the price of one unit, a decimal with at most 8 places, e.g. 190.25",
    "name": "instrument name (required for a new symbol)",
    "type": "stock, etf, bond, mutual_fund or crypto (required for a new symbol)",
    "currency": "ISO 4217 code, e.g. USD (required for a new symbol)",
})
def set_price(c, symbol, price, name=None, type=None, currency=None):
    """Set one instrument's sandbox price; holdings of it are revalued."""
    with _database() as (settings, database):
        from hoardrun import investments

        _require_migrated(database)
        row, created = investments.set_price(symbol, price, name=name, type=type,
                                             currency=currency)
        shown = investments.price_state(row)["price"]
    print(f"{'added' if created else 'updated'} {row.symbol}: {shown} {row.currency}")


# --------------------------------------------------------------------------- test

FUZZ_TEST = ROOT / "tests" / "integration" / "test_ledger_fuzz.py"


@task(help={
    "database_only": "run only the database tests (tests/integration)",
    "coverage": "measure coverage of hoardrun/ and list the lines never run",
    "specific": "run only this test file, directory or node id",
    "long": "run the ledger fuzzer (tests/integration/test_ledger_fuzz.py) for SECONDS more "
            "with fresh random sequences, after its usual derandomized ones",
})
def test(c, database_only=False, coverage=False, specific=None, long=0):
    """Run the tests with pytest (on TEST_DATABASE_URL, else on an embedded server of their own)."""
    import os

    import pytest

    if database_only and specific:
        raise Exit("use either --database-only or --specific, not both", code=1)
    if long < 0:
        raise Exit(f"--long={long} is not valid: expected seconds >= 0", code=1)
    if long:
        # Read by the fuzz test; only that test runs unless --specific names more.
        os.environ["HOARDRUN_FUZZ_SECONDS"] = str(long)
        specific = specific or f"{FUZZ_TEST}::test_random_sequences_keep_the_ledger_equal_to_its_model"
    args = [specific] if specific else [
        str(ROOT / "tests" / "integration") if database_only else str(ROOT / "tests")]
    if coverage:
        args += [f"--cov={ROOT / 'hoardrun'}", "--cov-report=term-missing"]
    code = int(pytest.main(args))
    if code != 0:
        raise Exit(f"tests failed: pytest exit code {code}", code=code)


# --------------------------------------------------------------------------- serve

@task(auto_shortflags=False, help={
    "server": "granian (default: native, several worker processes) or waitress (pure Python, "
              "one process)",
    "host": "interface to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    "port": "TCP port (default 8000)",
    "workers": "worker processes (granian; default 2 on a machine with 2+ cores; waitress: 1)",
    "threads": "threads per worker (default 16); each worker's pool is sized from this",
})
def serve(c, server="granian", host="127.0.0.1", port=8000, workers=None, threads=16):
    """Serve the API until Ctrl-C or SIGTERM (migrates once first outside production)."""
    from hoardrun.api import serve as serving
    from hoardrun.errors import ConfigError

    if server not in serving.SERVERS:
        raise Exit(f"--server={server} is not valid: expected one of "
                   f"{', '.join(serving.SERVERS)}", code=1)
    if threads < 1:
        raise Exit(f"--threads={threads} is not valid: expected an integer >= 1", code=1)
    if workers is not None:
        try:
            workers = int(workers)
        except ValueError:
            workers = 0
        if workers < 1 or (server == "waitress" and workers != 1):
            raise Exit(f"--workers={workers} is not valid: expected an integer >= 1"
                       + (" (waitress runs one process: use --server granian)"
                          if server == "waitress" else ""), code=1)
    settings = _settings()
    # waitress says where it listens at INFO; the access lines are hoardrun.access
    logging.getLogger("waitress").setLevel(logging.INFO)
    with _guard_settings(settings):
        try:
            serving.serve(server=server, host=host, port=port, workers=workers,
                          threads=threads, settings=settings)
        except ConfigError as error:  # the workers' pools do not fit the database
            raise Exit(str(error), code=1) from None
        except OSError as error:  # the port is taken, or the host is not ours
            raise Exit(f"cannot listen on {host}:{port}: {error.strerror or error}",
                       code=1) from None


@task(auto_shortflags=False, help={
    "clients": "concurrent keep-alive clients per scenario (default 8; the @32 scenarios use 32)",
    "seconds": "seconds each scenario runs (default 10)",
    "scenario": "comma-separated subset of: bare, health, health_database, account, transfer, "
                "batch, p2p, deposit, withdrawal, card_payment, investment_buy, history_first, "
                "history_deep, statement, transfer@32, deposit@32 (default all)",
    "server": "granian (default), waitress, or both (every scenario under each, one run)",
    "workers": "worker processes of the server under test (default: granian 2, waitress 1)",
    "threads": "threads per worker of the server under test (default 16)",
    "loadgen": "auto (default: wrk when on the PATH, else Python), wrk or python",
    "users": "seeded users (default 1000)",
    "accounts": "seeded checking + savings accounts, split between the users (default 2000)",
    "entries": "seeded ledger entries (default 200000)",
    "scaling": "also time history pages and balances as of T at 10k, 100k and 1M entries in "
               "one account (default on; --no-scaling skips it)",
    "quick": "a smoke run: 1 s scenarios, 40 users, few entries, scaling at 1k and 4k only",
    "drop": "drop the bench database afterwards (default: keep it for `invoke db.verify`)",
})
def bench(c, clients=8, seconds=10, scenario=None, server="granian", workers=None, threads=16,
          loadgen="auto", users=1000, accounts=2000, entries=200_000, scaling=True,
          quick=False, drop=False):
    """Measure the API under granian and/or waitress against pgbench ceilings on PostgreSQL."""
    from bench import runner

    _setup_logging()
    if clients < 1 or seconds < 1 or users < 2 or accounts < users or entries < 0 or threads < 1:
        raise Exit("--clients, --seconds and --threads must be >= 1, --users >= 2, --accounts "
                   ">= --users and --entries >= 0", code=1)
    if loadgen not in ("auto", "wrk", "python"):
        raise Exit(f"--loadgen={loadgen} is not valid: expected auto, wrk or python", code=1)
    try:
        workers = int(workers) if workers is not None else None
    except ValueError:
        raise Exit(f"--workers={workers} is not valid: expected an integer >= 1", code=1) from None
    try:
        report = runner.run(clients=clients, seconds=seconds, scenario=scenario, users=users,
                            accounts=accounts, entries=entries, threads=threads,
                            workers=workers, server=server, loadgen=loadgen,
                            scaling_sizes=runner.SCALING_SIZES if scaling else (),
                            keep=not drop, quick=quick)
    except runner.BenchError as error:
        raise Exit(f"bench: {error}", code=1) from None
    except _database_errors() as error:
        raise Exit(_one_line(error), code=1) from None
    print(runner.format_report(report))
    if not all(passed for _, _, _, passed, _ in report["checks"]):
        raise Exit("bench: at least one target was missed (see FAIL above)", code=1)


db = Collection("db", check, server, init, migrate, rollback, history, current, makemigration,
                sample, reset, verify, prune, backup_db, restore_db)
ns = Collection(test, serve, bench)
ns.add_collection(db)
ns.add_collection(Collection("ledger", expire_holds))
ns.add_collection(Collection("cards", rotate_keys))
ns.add_collection(Collection("prices", set_price))
ns.add_collection(Collection("mail", outbox))
