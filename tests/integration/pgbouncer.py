"""A throwaway PgBouncer in transaction mode in front of a test server.

    with PgBouncer(target_url, pool_size=2) as bouncer:
        url = bouncer.url()              # postgresql://postgres@127.0.0.1:<port>/<same db>
        bouncer.admin("SHOW POOLS")      # the admin console

``pool_mode = transaction`` hands every transaction to whichever of the
``pool_size`` server sessions is free, so an app that left anything in a
session (a prepared statement, a SET, a temporary table, a lock) finds it
gone, or finds another client's, on its next transaction. PgBouncer's
defaults are kept where they matter: no ``ignore_startup_parameters``, so a
client that sends ``options`` is refused; no ``max_prepared_statements``
(1.18 has none anyway).

``target_url`` is the run's test server (``tests/conftest.py`` ``pg_url()``):
a TCP host or a Unix socket directory (``?host=/dir``), which PgBouncer
reaches as ``host=/dir``. PgBouncer refuses to run as root, so as root it is
told (``-u``) to become the account the embedded server uses.
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg2

from tests.integration.pg_instance import server_account, free_port

BINARY_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
START_TIMEOUT_S = 15


class PgBouncerUnavailable(RuntimeError):
    """No pgbouncer binary on this machine."""


def find_binary():
    """The pgbouncer executable: Debian's /usr/sbin/pgbouncer, else one on the PATH."""
    for candidate in BINARY_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("pgbouncer")
    if found:
        return found
    raise PgBouncerUnavailable("pgbouncer is not installed (apt-get install -y pgbouncer)")


def _target(url):
    """libpq keywords of ``url`` (host, port, user, password, dbname), query string winning."""
    parts = urlsplit(url)
    params = {"host": parts.hostname, "port": parts.port,
              "user": unquote(parts.username) if parts.username else None,
              "password": unquote(parts.password) if parts.password else None,
              "dbname": unquote(parts.path.lstrip("/")) or None}
    params.update(parse_qsl(parts.query))
    params.setdefault("user", None)
    return {k: str(v) for k, v in params.items() if v not in (None, "")}


class PgBouncer:
    """One pgbouncer process; see the module docstring."""

    def __init__(self, target_url, *, pool_size=2, pool_mode="transaction"):
        self.binary = find_binary()
        self.target = _target(target_url)
        self.user = self.target.get("user", "postgres")
        self.dbname = self.target.get("dbname", "postgres")
        self.pool_size = pool_size
        self.pool_mode = pool_mode
        self.port = free_port()
        self.account = server_account()
        self.root = Path(tempfile.mkdtemp(prefix="hoardrun-pgbouncer-", dir="/tmp"))
        self.logfile = self.root / "pgbouncer.log"
        self.process = None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def url(self, database=None):
        """A URL for ``database`` (default: the target's) through this pooler."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database or self.dbname}"

    def start(self):
        """Write the configuration and start pgbouncer; wait until it accepts connections."""
        server = " ".join(f"{k}={_quoted(v)}" for k, v in self.target.items()
                          if k in ("host", "port", "user", "password"))
        ini = self.root / "pgbouncer.ini"
        ini.write_text("\n".join([
            "[databases]",
            # Any database name the client asks for, on the run's test server.
            f"* = {server}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.root / 'userlist.txt'}",
            f"admin_users = {self.user}",
            f"pool_mode = {self.pool_mode}",
            f"default_pool_size = {self.pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "max_client_conn = 200",
            f"logfile = {self.logfile}",
            f"pidfile = {self.root / 'pgbouncer.pid'}",
            "",
        ]))
        (self.root / "userlist.txt").write_text(f'"{self.user}" ""\n')
        os.chmod(self.root, 0o755)
        cmd = [self.binary, str(ini)]
        if self.account:
            for path in (self.root, ini, self.root / "userlist.txt"):
                shutil.chown(path, self.account, self.account)
            # pgbouncer drops root itself, and stays the process we signal.
            cmd = [self.binary, "-u", self.account, str(ini)]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self.admin("SHOW VERSION")
                return
            except psycopg2.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.process.stdout.read().decode(errors="replace")
                    raise RuntimeError(f"pgbouncer did not start: {output}\n{self.log_text()}")
                time.sleep(0.05)

    def admin(self, command):
        """Run ``command`` on the admin console; its rows as dicts."""
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                                dbname="pgbouncer", sslmode="disable", connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(command)
                if cur.description is None:
                    return []
                names = [column.name for column in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            conn.close()

    def log_text(self):
        """PgBouncer's log (for assertion messages)."""
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def close(self):
        """Stop pgbouncer (SIGTERM, then SIGKILL) and remove its directory."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            if self.process is not None and self.process.stdout:
                self.process.stdout.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _quoted(value):
    """A libpq connection-string value, quoted when it needs to be."""
    if value and all(c not in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
