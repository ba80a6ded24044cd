"""The migrations build exactly the schema the models describe, and undo cleanly.

Schemas are compared by introspecting the live database (information_schema
and pg_catalog), so what is checked is what a DBA would see in psql, not what Python believes.
Everything here is generic over ``migrations/``: new migrations are covered
without touching this file.
"""

import re
import shutil
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from peewee_migrate import Router

from hoardrun import models, schema
from hoardrun.db import build_database
from tests.conftest import admin_url

# ---------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------


def normalise(sql):
    """One spelling for an SQL fragment: no quotes, single spaces, lower case."""
    if sql is None:
        return None
    sql = re.sub(r"\s+", " ", sql.replace('"', "")).strip().lower()
    sql = re.sub(r"\( ", "(", re.sub(r" \)", ")", sql))
    return sql


def _rows(database, sql, params=()):
    return database.execute_sql(sql, params).fetchall()


def _pg_snapshot(database):
    tables = {t for (t,) in _rows(database, """
        SELECT table_name FROM information_schema.tables
        WHERE table_schema = 'public' AND table_type = 'BASE TABLE'""")}
    columns = {
        (t, c): (dtype, length, precision, scale, nullable, normalise(default))
        for t, c, dtype, length, precision, scale, nullable, default in _rows(database, """
            SELECT table_name, column_name, data_type, character_maximum_length,
                   numeric_precision, numeric_scale, is_nullable, column_default
            FROM information_schema.columns WHERE table_schema = 'public'""")}
    indexes = {
        (t, name): (tuple(cols), unique, normalise(predicate))
        for t, name, cols, unique, predicate in _rows(database, """
            SELECT t.relname, i.relname,
                   ARRAY(SELECT pg_get_indexdef(x.indexrelid, k, true)
                         FROM generate_series(1, x.indnkeyatts) AS k ORDER BY k),
                   x.indisunique, pg_get_expr(x.indpred, x.indrelid, true)
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_class t ON t.oid = x.indrelid
            WHERE t.relnamespace = 'public'::regnamespace""")}
    index_defs = {(t, name): normalise(d) for t, name, d in _rows(database, """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'""")}
    constraints = _rows(database, """
        SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid, true)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND conrelid <> 0""")
    checks = {(t, name): normalise(d) for t, name, kind, d in constraints if kind == "c"}
    # Compared by what they do, not by their generated names.
    foreign_keys = {(t, normalise(d)) for t, _, kind, d in constraints if kind == "f"}
    keys = {(t, kind, normalise(d)) for t, _, kind, d in constraints if kind in "pux"}
    triggers = {(t, name): normalise(d) for t, name, d in _rows(database, """
        SELECT c.relname, g.tgname, pg_get_triggerdef(g.oid)
        FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
        WHERE NOT g.tgisinternal AND c.relnamespace = 'public'::regnamespace""")}
    functions = {name: normalise(d) for name, d in _rows(database, """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')""")}
    types = {(name, kind) for name, kind in _rows(database, """
        SELECT t.typname, t.typtype FROM pg_type t LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE t.typnamespace = 'public'::regnamespace
          AND (t.typtype IN ('e', 'd') OR (t.typtype = 'c' AND c.relkind = 'c'))""")}
    views = {name: normalise(d) for name, d in _rows(database, """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'""")}
    return dict(tables=tables, columns=columns, indexes=indexes, index_defs=index_defs,
                checks=checks, foreign_keys=foreign_keys, keys=keys, triggers=triggers,
                functions=functions, types=types, views=views)


def _split_checks(table_sql):
    """``{name: expression}`` for each ``CONSTRAINT name CHECK (...)`` in a CREATE TABLE."""
    found = {}
    for match in re.finditer(r"CONSTRAINT\s+\"?(\w+)\"?\s+CHECK\s*\(", table_sql, re.I):
        depth, start = 1, match.end()
        pos = start
        while depth:
            depth += {"(": 1, ")": -1}.get(table_sql[pos], 0)
            pos += 1
        found[match.group(1)] = table_sql[start:pos - 1]
    return found


IGNORED_TABLES = {schema.MIGRATE_TABLE}


def snapshot(database):
    """Everything that makes up the schema, minus peewee-migrate's own history table."""
    snap = _pg_snapshot(database)
    for aspect, value in snap.items():
        if isinstance(value, dict):
            snap[aspect] = {k: v for k, v in value.items()
                            if not (isinstance(k, tuple) and k[0] in IGNORED_TABLES)}
        else:
            snap[aspect] = {k for k in value
                            if not (isinstance(k, tuple) and k[0] in IGNORED_TABLES)}
    snap["tables"] -= IGNORED_TABLES
    return snap


def differences(left, right, aspects=None):
    """Human-readable lines for every aspect where two snapshots differ."""
    lines = []
    for aspect in aspects or left:
        a, b = left[aspect], right[aspect]
        if a == b:
            continue
        if isinstance(a, dict):
            for key in sorted(set(a) | set(b), key=repr):
                if a.get(key, "<missing>") != b.get(key, "<missing>"):
                    lines.append(f"{aspect} {key}: {a.get(key, '<missing>')!r} "
                                 f"!= {b.get(key, '<missing>')!r}")
        else:
            for item in sorted(a - b, key=repr):
                lines.append(f"{aspect} only on the left: {item!r}")
            for item in sorted(b - a, key=repr):
                lines.append(f"{aspect} only on the right: {item!r}")
    return lines


# ---------------------------------------------------------------------------
# Scratch databases
# ---------------------------------------------------------------------------


def _admin(url, statement):
    """Run CREATE/DROP DATABASE for ``url``'s database from the server's ``postgres`` one."""
    name = urlsplit(url).path.lstrip("/")
    conn = psycopg2.connect(admin_url(url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement.format(name=name))
    finally:
        conn.close()


@pytest.fixture
def scratch(settings):
    """Make an empty throwaway database on the test server; dropped after the test.

    PostgreSQL scratch databases are named after the test database plus a
    suffix (``hr_test_x`` -> ``hr_test_x_models``), so parallel engineers and
    CI jobs never touch each other's.
    """
    made = []

    def make(suffix):
        parts = urlsplit(settings.database_url)
        name = parts.path.lstrip("/") + "_" + suffix
        url = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
        _admin(url, 'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # an interrupted run's
        _admin(url, 'CREATE DATABASE "{name}"')
        database = build_database(settings.replace(database_url=url))
        made.append((database, url))
        return database

    yield make
    for database, url in made:
        database.close_all()
        _admin(url, 'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def models_database(scratch):
    """A scratch database built by ``create_tables(models.MODELS)``, not by migrations."""
    database = scratch("models")
    with database.bind_ctx(models.MODELS):
        database.create_tables(models.MODELS)
    return database


# ---------------------------------------------------------------------------
# (a) The migrated schema is the models' schema
# ---------------------------------------------------------------------------

MODEL_ASPECTS = ["tables", "columns", "checks", "foreign_keys", "keys"]


@pytest.mark.parametrize("aspect", MODEL_ASPECTS)
def test_migrated_schema_matches_models(database, models_database, aspect):
    """Tables, columns (type, null, default), CHECKs, FKs (ON DELETE) and keys are identical."""
    migrated, from_models = snapshot(database), snapshot(models_database)
    assert migrated[aspect], f"no {aspect} introspected: the comparison would prove nothing"
    assert differences(migrated, from_models, [aspect]) == []


def _index_shapes(snap):
    return sorted((table, *shape) for (table, _), shape in snap["indexes"].items())


def test_migrated_indexes_match_models(database, models_database):
    """Every index (columns, unique, partial predicate) exists in both, ignoring its name."""
    migrated, from_models = snapshot(database), snapshot(models_database)
    assert _index_shapes(migrated) == _index_shapes(from_models)
    # The two partial unique indexes the rules rely on are really partial.
    partial = {name: shape for (_, name), shape in migrated["indexes"].items() if shape[2]}
    assert {"accounts_one_primary_per_user", "accounts_one_settlement_per_currency"} <= set(partial)


def test_migrated_index_names_match_models(database, models_database):
    """Index names agree too, so an autogenerated migration can drop them by name."""
    migrated, from_models = snapshot(database), snapshot(models_database)
    assert differences(migrated, from_models, ["index_defs"]) == []


def test_autodiff_finds_no_changes(database, tmp_path):
    """peewee-migrate's autogenerator sees nothing to migrate (and writes no file)."""
    migrate_dir = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS_DIR, migrate_dir,
                    ignore=shutil.ignore_patterns("__pycache__"))
    repo_before = sorted(p.name for p in schema.MIGRATIONS_DIR.iterdir())

    router = Router(database, migrate_dir=migrate_dir, migrate_table=schema.MIGRATE_TABLE)
    created = router.create("autodiff", auto=list(models.MODELS))

    written = sorted(set(p.name for p in migrate_dir.glob("*.py"))
                     - set(p.name for p in schema.MIGRATIONS_DIR.glob("*.py")))
    # Only the generated migrate() body: the template around it says nothing.
    details = "".join((migrate_dir / name).read_text().partition("def migrate")[2]
                      .partition("def rollback")[0] for name in written)
    assert sorted(p.name for p in schema.MIGRATIONS_DIR.iterdir()) == repo_before
    assert created is None, f"the models differ from the migrations:\n{details}"


# ---------------------------------------------------------------------------
# (b) Every migration rolls back and re-applies cleanly
# ---------------------------------------------------------------------------


def test_every_migration_rolls_back_and_reapplies(scratch):
    """Apply one by one, undo one by one (each undo restores the schema before it), redo."""
    database = scratch("mig")
    names = schema.all_migrations()
    assert names, "no migrations found"

    before = [snapshot(database)]
    for name in names:
        assert schema.migrate(database, target=name) == [name]
        before.append(snapshot(database))
    applied = before[-1]
    assert applied["tables"] == {m._meta.table_name for m in models.MODELS}
    assert schema.pending_migrations(database) == []

    for index in reversed(range(len(names))):
        assert schema.rollback(database, 1) == [names[index]]
        assert differences(snapshot(database), before[index]) == [], (
            f"rolling back {names[index]} did not restore the schema before it")

    empty = snapshot(database)
    assert empty["tables"] == set() and empty["triggers"] == {} and empty["functions"] == {}
    assert empty["types"] == set()
    assert schema.applied_migrations(database) == []

    assert schema.migrate(database) == names
    assert differences(snapshot(database), applied) == []
    assert schema.applied_migrations(database) == names


def test_rollback_refuses_more_steps_than_applied(scratch):
    """Asking to undo more than was applied changes nothing and says why."""
    database = scratch("mig")
    schema.migrate(database)
    applied = snapshot(database)
    with pytest.raises(ValueError, match="only"):
        schema.rollback(database, len(schema.all_migrations()) + 1)
    assert differences(snapshot(database), applied) == []
