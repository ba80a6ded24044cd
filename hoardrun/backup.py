"""Backups that are proven to restore: ``pg_dump`` custom-format snapshots and their restore.

* **Backup.** ``pg_dump --format=custom`` reads the whole database in one
  REPEATABLE READ transaction, so the file is one consistent moment of the
  ledger even while money moves. It is written beside its destination under
  a temporary name and renamed only when complete (a crash never leaves a
  half file that looks like a backup), mode 0600, and a ``<file>.sha256``
  line in ``sha256sum`` format is written next to it.
* **Restore.** Only into an empty database, unless ``force`` (never in
  production, where a non-empty target is always refused: restoring over
  live books is a decision for a human with psql, not a flag). The archive
  is checked first (its ``.sha256`` when present, then ``pg_restore --list``),
  restored in ONE transaction (``--single-transaction --exit-on-error``: it
  lands whole or not at all), owned by the restoring user; then pending
  migrations run and the ledger is verified.

The client programs come from ``embedded.client_programs``: the one whose
major version equals the server's when there is one (the wheel's PostgreSQL
18 ``pg_restore`` sends ``SET transaction_timeout``, which a PostgreSQL 15
server rejects), else the closest newer one (a client older than the server
cannot read it at all). The database password never appears on a command line: it travels in the
child's ``PGPASSWORD``, the rest of the connection as a libpq conninfo.
"""

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import embedded, ledger, schema
from .clock import utcnow
from .db import _postgres_params, db  # the one place that turns settings into libpq keywords
from .errors import BackupError

CHECKSUM_SUFFIX = ".sha256"
TIMEOUT_S = 6 * 3600
LOCK_WAIT = "60s"
# Schemas every PostgreSQL database has; anything else counts as content.
_SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema', 'pg_toast')"


@dataclass(frozen=True)
class Backup:
    """A written backup: where, how many bytes, its SHA-256 (hex)."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Restore:
    """What a restore did: the archive's checksum, migrations applied, ledger problems."""

    path: Path
    sha256: str
    migrations: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def _quote(value):
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def client_connection(settings):
    """``(conninfo, env)`` for a client program: no password in the conninfo.

    ``env`` is the child's environment: ours without any inherited ``PG*``
    variable (a developer's PGHOST must not redirect a restore), plus
    ``PGPASSWORD`` when the URL carries one.
    """
    name, params = _postgres_params(settings)
    password = params.pop("password", None)
    if any("pass" in key for key in params):
        raise BackupError("a password-like parameter in DATABASE_URL's query string "
                          "would reach the command line: use a key file without a passphrase")
    params.pop("options", None)  # pg_dump and pg_restore set their own timeouts
    params["application_name"] = "hoardrun-backup"
    params["dbname"] = name
    conninfo = " ".join(f"{key}={_quote(value)}" for key, value in sorted(params.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password
    return conninfo, env


def _major(path):
    """The major version of a client program (``pg_dump (PostgreSQL) 15.20`` -> 15)."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL).stdout
        return int(out.split(")", 1)[1].split()[0].split(".")[0])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def client_program(name, server_major):
    """The ``name`` program for a server of ``server_major``: the same major, else the
    closest newer one."""
    found = sorted((major, str(path)) for path in embedded.client_programs(name)
                   for major in [_major(path)] if major is not None and major >= server_major)
    exact = [path for major, path in found if major == server_major]
    if exact or found:
        return Path((exact or [found[0][1]])[0])
    raise BackupError(f"no {name} of PostgreSQL {server_major} or newer found: install the "
                      f"PostgreSQL {server_major} client programs or set HOARDRUN_PG_BIN")


def server_major():
    """The major version of the server ``db`` is bound to (e.g. 15)."""
    return int(db.execute_sql("SHOW server_version_num").fetchone()[0]) // 10000


def _run(program, args, env, what):
    try:
        proc = subprocess.run([str(client_program(program, server_major())), *args], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        raise BackupError(f"{what}: {program} could not run: {error}") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        detail = " ".join(" ".join(lines[:3]).split())[:500] or f"exit {proc.returncode}"
        raise BackupError(f"{what}: {detail}")
    return proc


def sha256_of(path):
    """The SHA-256 of the file at ``path`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_path(settings, now=None):
    """``hoardrun-<database>-<UTC time>.dump`` in the working directory."""
    name, _ = _postgres_params(settings)
    moment = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"hoardrun-{name}-{moment}.dump")


def backup(settings, output=None):
    """Write a consistent custom-format snapshot of the database; return a ``Backup``.

    Refuses to overwrite an existing file (yesterday's backup is not scratch space).
    """
    path = Path(output) if output else default_path(settings)
    if path.exists():
        raise BackupError(f"{path} already exists: choose another --output")
    if not path.parent.is_dir():
        raise BackupError(f"{path.parent} is not a directory")
    partial = path.with_name(path.name + ".partial")
    conninfo, env = client_connection(settings)
    try:
        _run("pg_dump", ["--format=custom", "--no-password", f"--lock-wait-timeout={LOCK_WAIT}",
                         f"--file={partial}", f"--dbname={conninfo}"], env,
             f"backup of {settings.masked_database_url} failed")
        # It holds password hashes, personal data and encrypted card numbers.
        os.chmod(partial, 0o600)
        digest, size = sha256_of(partial), partial.stat().st_size
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
    checksum.write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    return Backup(path, size, digest)


def _check_archive(path, env):
    path = Path(path)
    if not path.is_file():
        raise BackupError(f"{path} is not a file")
    digest = sha256_of(path)
    checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
    if checksum.exists():
        expected = checksum.read_text(encoding="utf-8").split()[:1]
        if expected != [digest]:
            raise BackupError(f"{path} does not match {checksum.name} (sha256 {digest}): "
                              "the file is damaged or not the one that was backed up")
    _run("pg_restore", ["--list", str(path)], env, f"{path} is not a usable backup")
    # NOTE: --list ran the target's pg_restore, so an archive newer than it can read
    # is refused here, before anything is dropped.
    return digest


def content_count():
    """How many tables, views, sequences, routines and types the database holds."""
    return db.execute_sql(
        "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        f"        WHERE n.nspname NOT IN {_SYSTEM_SCHEMAS} AND n.nspname NOT LIKE 'pg_temp%%'"
        "        AND n.nspname NOT LIKE 'pg_toast%%'"
        "        AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f'))"
        " + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        f"        WHERE n.nspname NOT IN {_SYSTEM_SCHEMAS})").fetchone()[0]


def restore(settings, path, *, force=False):
    """Restore the backup at ``path`` into the database ``db`` is bound to (``settings``').

    Refuses a non-empty target unless ``force`` (which replaces its
    ``public`` schema), and always in production. Applies pending migrations
    and verifies the ledger; returns a ``Restore`` (``problems`` empty when
    the books balance).
    """
    where = settings.masked_database_url
    conninfo, env = client_connection(settings)
    digest = _check_archive(path, env)
    if content_count():
        if settings.is_production:
            raise BackupError(f"{where} is not empty: production never restores over data "
                              "(restore into a new database and switch DATABASE_URL)")
        if not force:
            raise BackupError(f"{where} is not empty: restore into an empty database, "
                              "or pass --force to replace its public schema")
        db.execute_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    # The pooled session must not hold the schema while pg_restore builds it.
    db.close()
    _run("pg_restore", ["--no-password", "--no-owner", "--no-privileges",
                        "--single-transaction", "--exit-on-error",
                        f"--dbname={conninfo}", str(path)], env,
         f"restore into {where} failed and was rolled back")
    applied = schema.migrate(db.obj)
    return Restore(Path(path), digest, applied, ledger.verify())
