"""The operator tasks, run the way an operator runs them: ``invoke`` in a new process.

Each run gets a fresh environment pointing at this test's database. The
URL carries a password (trust auth ignores it), and every run
asserts that the password never appears in the output and that no traceback
does either. Tasks that rebuild the schema (reset, rollback, makemigration)
leave the shared PostgreSQL test database rebuilt by the real migrations.
"""

import io
import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from hoardrun import db as dbm
from hoardrun import schema
from hoardrun.config import load_settings, new_card_key
from hoardrun.security import verify_password

ROOT = Path(__file__).resolve().parents[2]
URL_PASSWORD = "s3cretpw"
UNREACHABLE_PG = f"postgresql://postgres:{URL_PASSWORD}@127.0.0.1:1/x"
# Variables of the developer's shell that must not leak into a task run.
FOREIGN_PREFIXES = ("DATABASE_", "HOARDRUN_", "TEST_DATABASE_", "PYTEST_ADDOPTS")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self):
        return self.stdout + self.stderr

    @property
    def error_lines(self):
        return self.stderr.strip().splitlines()


def plain_env(url, **extra):
    """An environment for ``url`` with its secrets set (so no secrets file is made)."""
    return {"HOARDRUN_ENV": "test", "DATABASE_URL": url,
            "HOARDRUN_SECRET_KEY": "tasks-test-secret-" + "k" * 32,
            "HOARDRUN_CARD_ENCRYPTION_KEYS": new_card_key(), **extra}


def run_task(env, *args, cwd, root=ROOT):
    """Run ``invoke ARGS`` in a new process with ``env``; stdin is not a terminal."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(FOREIGN_PREFIXES) and k != "PYTHONPATH"}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(root), *args],
                          cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    run = Run(proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in run.output, run.output
    password = _password(env.get("DATABASE_URL", ""))
    if password:
        assert password not in run.output, run.output
    return run


def _password(url):
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def with_password(url):
    """``url`` with a password in it (kept if it already has one)."""
    parts = urlsplit(url)
    if parts.password:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or "postgres"
    return urlunsplit((parts.scheme, f"{user}:{URL_PASSWORD}@{host}", parts.path,
                       parts.query, parts.fragment))


def sql(url, statement, params=()):
    """Run one statement through the raw driver; return all rows (or [])."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def count(url, table):
    return sql(url, f"SELECT COUNT(*) FROM {table}")[0][0]


def add_user(url, email):
    ident = uuid.uuid4()
    sql(url, "INSERT INTO users (id, email, first_name, last_name, password_hash) "
             "VALUES (?, ?, 'Keep', 'Me', 'x')",
        (str(ident), email))


def drop_pg_schema(url):
    """Empty the PostgreSQL test database completely (tables, functions, types)."""
    sql(url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")


def restore_schema(environ):
    """Rebuild the shared PostgreSQL test database with the real migrations."""
    drop_pg_schema(environ["DATABASE_URL"])
    database = dbm.build_database(load_settings(environ))
    try:
        schema.migrate(database)
    finally:
        database.close_all()


@pytest.fixture
def task_env(environ, database_url):
    """Environment for task runs on this test's clean, migrated database."""
    env = dict(environ)
    env["DATABASE_URL"] = with_password(database_url)
    yield env
    restore_schema(environ)


@pytest.fixture
def empty_env(task_env, database_url):
    """Environment for a database with no tables at all."""
    drop_pg_schema(database_url)
    return dict(task_env)


# --------------------------------------------------------------------------- init / check

def test_check_fails_until_init_migrates_an_empty_database(empty_env, tmp_path):
    migrations = schema.all_migrations()

    before = run_task(empty_env, "db.check", cwd=tmp_path)
    assert before.code == 1
    assert f"0 applied, {len(migrations)} pending" in before.stdout
    assert before.error_lines == [before.error_lines[0]]
    assert "pending" in before.error_lines[0] and "db.migrate" in before.error_lines[0]

    after = run_task(empty_env, "db.init", "db.check", "--verbose", cwd=tmp_path)
    assert after.code == 0, after.output
    for name in migrations:
        assert f"applied {name}" in after.stdout
        assert f"[x] {name}" in after.stdout
    assert f"migrations: {len(migrations)} applied, 0 pending" in after.stdout
    assert "status:     healthy" in after.stdout
    assert "pool:       size 20, max overflow 30" in after.stdout
    assert "pool now:" in after.stdout
    assert "server:     PostgreSQL" in after.stdout
    assert "postgresql://***@" in after.stdout
    assert "sslmode=prefer" in after.stdout


@pytest.mark.parametrize("url", [UNREACHABLE_PG,
                                 "postgresql://postgres@/x?host={tmp}/no-such-dir"],
                         ids=["postgres-port-1", "socket-missing-dir"])
def test_check_on_an_unreachable_database_is_one_line(url, tmp_path):
    env = plain_env(url.format(tmp=tmp_path))
    result = run_task(env, "db.check", cwd=tmp_path)
    assert result.code == 1
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith("cannot connect to the database at ")
    assert result.stdout == ""


@pytest.mark.parametrize("variable, value", [
    ("DATABASE_POOL_SIZE", "abc"),
    ("DATABASE_SSL_MODE", "sometimes"),
    ("DATABASE_URL", f"mysql://root:{URL_PASSWORD}@db.example:3306/hoardrun"),
])
def test_bad_setting_stops_a_task_with_one_line_naming_it(variable, value, tmp_path):
    env = plain_env(UNREACHABLE_PG, **{variable: value})
    result = run_task(env, "db.check", cwd=tmp_path)
    assert result.code != 0
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith(f"{variable}=")
    assert "not valid" in result.error_lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


@pytest.mark.parametrize("args, message", [
    (("db.makemigration", "Add Nickname"), "migration name 'Add Nickname' is not valid"),
    (("db.rollback", "--steps", "0"), "--steps must be 1 or more"),
    (("test", "--database-only", "--specific", "tests/unit"), "either --database-only or"),
], ids=["makemigration-name", "rollback-steps", "test-flags"])
def test_bad_arguments_are_one_line(args, message, tmp_path):
    env = plain_env(UNREACHABLE_PG)
    result = run_task(env, *args, cwd=tmp_path)
    assert result.code == 1
    assert len(result.error_lines) == 1 and message in result.error_lines[0], result.stderr


# --------------------------------------------------------------------------- migrations

def test_rollback_steps_then_history_current_and_migrate(task_env, tmp_path):
    migrations = schema.all_migrations()
    assert len(migrations) >= 2, "needs two migrations to roll one back and keep one"
    latest, kept = migrations[-1], migrations[-2]

    back = run_task(task_env, "db.rollback", "--steps", "1", "db.history", "db.current",
                    cwd=tmp_path)
    assert back.code == 0, back.output
    lines = back.stdout.splitlines()
    assert lines[0] == f"rolled back {latest}"
    assert f"[x] {kept}" in lines and f"[ ] {latest}" in lines
    assert f"{len(migrations) - 1} applied, 1 pending" in lines
    assert lines[-1] == kept

    too_far = run_task(task_env, "db.rollback", "--steps", str(len(migrations) + 5), cwd=tmp_path)
    assert too_far.code == 1
    assert too_far.error_lines == [f"cannot roll back {len(migrations) + 5} migration(s): "
                                   f"only {len(migrations) - 1} applied"]

    forward = run_task(task_env, "db.migrate", "db.current", cwd=tmp_path)
    assert forward.code == 0, forward.output
    assert forward.stdout.splitlines() == [f"applied {latest}", latest]


def _copy_project(target):
    """A copy of the code and migrations, so generated files never land in the repo."""
    target.mkdir()
    shutil.copy2(ROOT / "tasks.py", target / "tasks.py")
    for folder in ("hoardrun", "migrations"):
        shutil.copytree(ROOT / folder, target / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _add_nickname(project):
    models = project / "hoardrun" / "models.py"
    source = models.read_text(encoding="utf-8")
    anchor = "    phone = pw.CharField(max_length=16, null=True)\n"
    assert source.count(anchor) == 1, "User.phone moved: update this test's anchor"
    models.write_text(source.replace(
        anchor, anchor + "    nickname = pw.CharField(max_length=40, null=True)\n"),
        encoding="utf-8")


def _migration_files(project):
    return sorted(p.name for p in (project / "migrations").glob("*.py"))


def test_makemigration_says_no_changes_when_the_models_match(task_env, tmp_path):
    project = _copy_project(tmp_path / "project")
    on_disk = _migration_files(project)

    unchanged = run_task(task_env, "db.makemigration", "nothing_new", cwd=tmp_path, root=project)
    assert unchanged.code == 0, unchanged.output
    assert _migration_files(project) == on_disk
    assert "no changes" in unchanged.stdout


def test_makemigration_writes_a_model_change_outside_the_repo(task_env, tmp_path):
    project = _copy_project(tmp_path / "project")
    on_disk = _migration_files(project)
    _add_nickname(project)

    created = run_task(task_env, "db.makemigration", "add_user_nickname", cwd=tmp_path,
                       root=project)
    assert created.code == 0, created.output
    name = f"{len(on_disk) + 1:03d}_add_user_nickname"
    path = project / "migrations" / f"{name}.py"
    assert created.stdout.splitlines()[0] == f"created {path}"
    assert "review it before applying" in created.stdout
    migration = path.read_text(encoding="utf-8")
    assert "migrator.add_fields(" in migration and "nickname=" in migration
    assert not (ROOT / "migrations" / f"{name}.py").exists()


def test_a_generated_migration_applies_and_check_is_healthy(task_env, tmp_path):
    project = _copy_project(tmp_path / "project")
    _add_nickname(project)

    run = run_task(task_env, "db.makemigration", "add_user_nickname", "db.migrate", "db.check",
                   cwd=tmp_path, root=project)
    assert run.code == 0, run.output
    assert f"applied {len(schema.all_migrations()) + 1:03d}_add_user_nickname" in run.stdout
    assert "status:     healthy" in run.stdout


# --------------------------------------------------------------------------- sample / verify

def test_sample_is_idempotent_and_verify_catches_drift(task_env, database_url, tmp_path):
    tables = ("users", "accounts", "transactions", "transfers")

    first = run_task(task_env, "db.sample", cwd=tmp_path)
    assert first.code == 0, first.output
    assert "demo password: " in first.stdout and "admin password: " in first.stdout
    counts = {t: count(database_url, t) for t in tables}
    assert counts["users"] == 2 and counts["transfers"] == 1
    # Two customer accounts plus the USD settlement account the deposits posted against.
    assert counts["accounts"] == 3
    roles = dict(sql(database_url, "SELECT email, role FROM users"))
    assert roles == {"admin@hoardrun.com": "admin", "demo@hoardrun.com": "user"}
    demo_password = first.stdout.split("demo password: ", 1)[1].splitlines()[0]
    (demo_hash,) = sql(database_url, "SELECT password_hash FROM users WHERE email = ?",
                       ("demo@hoardrun.com",))[0]
    assert verify_password(demo_hash, demo_password)
    balances = dict(sql(database_url, "SELECT type, balance FROM accounts "
                                      "WHERE user_id IS NOT NULL"))
    assert balances == {"checking": 250_000 - 50_000 - 12_000, "savings": 100_000 + 50_000}

    again = run_task(task_env, "db.sample", "db.verify", cwd=tmp_path)
    assert again.code == 0, again.output
    assert "password: " not in again.stdout
    assert {t: count(database_url, t) for t in tables} == counts
    assert "ledger verified" in again.stdout

    sql(database_url, "UPDATE accounts SET balance = balance + 1 WHERE type = 'savings'")
    (savings_id,) = sql(database_url, "SELECT id FROM accounts WHERE type = 'savings'")[0]
    drift = run_task(task_env, "db.verify", cwd=tmp_path)
    assert drift.code == 1
    assert uuid.UUID(str(savings_id)).hex in drift.stdout.replace("-", "")
    assert drift.error_lines == ["ledger drift: 2 problem(s) found"]


# --------------------------------------------------------------------------- reset

def test_reset_without_yes_and_without_a_terminal_keeps_the_data(task_env, database_url,
                                                                  tmp_path):
    add_user(database_url, "keep@example.com")

    refused = run_task(task_env, "db.reset", cwd=tmp_path)
    assert refused.code == 1
    assert len(refused.error_lines) == 1 and "--yes" in refused.error_lines[0]
    assert count(database_url, "users") == 1

    done = run_task(task_env, "db.reset", "--yes", "db.current", cwd=tmp_path)
    assert done.code == 0, done.output
    assert count(database_url, "users") == 0
    assert done.stdout.splitlines()[-1] == schema.all_migrations()[-1]


class _Terminal(io.StringIO):
    """Stdin that claims to be a terminal, with the operator's answer typed in."""

    def isatty(self):
        return True


@pytest.fixture
def in_process(environ, monkeypatch):
    """Run tasks.py inside this process with ``environ`` as the real environment."""
    for key in list(os.environ):
        if key.startswith(FOREIGN_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    spec = spec_from_file_location("hoardrun_tasks_under_test", ROOT / "tasks.py")
    tasks = module_from_spec(spec)
    spec.loader.exec_module(tasks)
    handlers = list(logging.getLogger().handlers)
    from invoke import Program

    def run(*argv):
        try:
            Program(namespace=tasks.ns).run(["invoke", *argv])
        except SystemExit as stop:
            return stop.code
        return 0

    yield run
    # The tasks add a log handler bound to this test's captured stderr.
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)


def test_reset_asks_on_a_terminal_and_only_yes_proceeds(in_process, task_env, database_url,
                                                        monkeypatch, capsys):
    add_user(database_url, "keep@example.com")

    monkeypatch.setattr(sys, "stdin", _Terminal("no\n"))
    assert in_process("db.reset") == 1
    out = capsys.readouterr()
    assert "drops ALL tables and data" in out.out and "cancelled" in out.err
    assert count(database_url, "users") == 1

    monkeypatch.setattr(sys, "stdin", _Terminal("yes\n"))
    assert in_process("db.reset") == 0
    assert count(database_url, "users") == 0
    assert f"applied {schema.all_migrations()[-1]}" in capsys.readouterr().out


def test_production_refuses_reset_and_sample(task_env, database_url, tmp_path):
    env = dict(task_env, HOARDRUN_ENV="production", HOARDRUN_SMTP_URL="smtp://127.0.0.1:2525",
               HOARDRUN_MAIL_FROM="no-reply@example.com")
    add_user(database_url, "keep@example.com")

    reset = run_task(env, "db.reset", "--yes", cwd=tmp_path)
    assert reset.code == 1
    assert reset.error_lines == ["db.reset is refused when HOARDRUN_ENV=production"]
    sample = run_task(env, "db.sample", cwd=tmp_path)
    assert sample.code == 1
    assert sample.error_lines == ["db.sample is refused when HOARDRUN_ENV=production"]
    assert [e for (e,) in sql(database_url, "SELECT email FROM users")] == ["keep@example.com"]


# --------------------------------------------------------------------------- test

def test_test_task_passes_on_green_and_fails_when_nothing_ran(tmp_path):
    (tmp_path / "test_green.py").write_text("def test_green():\n    assert 1 + 1 == 2\n")
    (tmp_path / "test_empty.py").write_text("# no tests here\n")
    env = plain_env(UNREACHABLE_PG)

    green = run_task(env, "test", "--specific", str(tmp_path / "test_green.py"), cwd=tmp_path)
    assert green.code == 0, green.output
    assert "1 passed" in green.stdout

    empty = run_task(env, "test", "--specific", str(tmp_path / "test_empty.py"), cwd=tmp_path)
    assert empty.code == 5
    assert empty.error_lines[-1] == "tests failed: pytest exit code 5"
