"""Shared fixtures: settings → database → (app → client, in the HTTP tests).

Every database test runs on SQLite and on PostgreSQL. PostgreSQL comes from
``TEST_DATABASE_URL``; without it those tests are skipped with a visible
reason locally, and the whole run fails in CI (``CI=true``). The schema is
built once per session by the real migrations, then emptied before each test
(PostgreSQL: TRUNCATE; SQLite: a fresh copy of the migrated file), so every
test starts from a clean, migrated schema.
"""

import os
import shutil
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from hoardrun import db as dbm
from hoardrun import schema
from hoardrun.config import load_settings

BACKENDS = ("sqlite", "postgres")
# Fixed random values (tests never touch the developer's secrets file), strong
# enough for HOARDRUN_ENV=production, which refuses placeholders.
TEST_SECRET = "s82QnOZH_NzCgcBXce2qsfieL7IgoN3BSkTT-bh-d9UyqYXHocsip8Qy1viekXng"
TEST_CARD_KEY = "RS-1zJbziFT0y1hRmd9W_XSVjKVBLpvrG_7aScnA1cI="


def pg_url():
    """The PostgreSQL URL for tests, or None when not configured."""
    return os.environ.get("TEST_DATABASE_URL") or None


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
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    conn = psycopg2.connect(admin)
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
    url = pg_url()
    if url:
        from hoardrun.config import mask_url
        return f"PostgreSQL tests: {mask_url(url)}"
    return "PostgreSQL tests: SKIPPED (set TEST_DATABASE_URL to run them)"


def pytest_sessionstart(session):
    if os.environ.get("CI", "").lower() == "true" and not pg_url():
        pytest.exit("CI=true but TEST_DATABASE_URL is not set: PostgreSQL tests are required in CI",
                    returncode=3)


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


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory):
    """A SQLite file built by the real migrations, copied for each test."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    settings = load_settings(base_environ(f"sqlite:///{path}"))
    database = dbm.init_db(settings)
    schema.migrate(database)
    database.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    database.close_all()
    return path


@pytest.fixture(scope="session")
def migrated_postgres():
    """The TEST_DATABASE_URL database, emptied and migrated once per session."""
    url = pg_url()
    if not url:
        pytest.skip("PostgreSQL not configured: set TEST_DATABASE_URL")
    ensure_pg_database(url)
    reset_pg_schema(url)
    settings = load_settings(base_environ(url))
    database = dbm.init_db(settings)
    schema.migrate(database)
    tables = [t for t in database.get_tables() if t != schema.MIGRATE_TABLE]
    database.close_all()
    return url, tables


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The name of the backend this test runs on."""
    return request.param


@pytest.fixture
def database_url(backend, request, tmp_path):
    """A clean, migrated database for this test; its URL."""
    if backend == "sqlite":
        template = request.getfixturevalue("migrated_sqlite")
        path = tmp_path / "hoardrun.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url, tables = request.getfixturevalue("migrated_postgres")
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
