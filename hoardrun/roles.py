"""The application's database role: what production connects as.

The operator (the owner of the schema, who runs the migrations) creates it
with ``invoke db.init --app-role NAME``. It is a plain login role (not a
superuser, owns nothing, cannot create roles or databases, no replication,
no row-security bypass) with exactly the grants the app needs:

* SELECT and INSERT on the append-only tables (those whose rows the
  ``hoardrun_refuse_change`` trigger guards: ledger entries and audit rows),
  so neither an UPDATE, a DELETE nor a TRUNCATE of history is possible
  through the app's credentials, whatever SQL reaches the server;
* SELECT, INSERT, UPDATE and DELETE on every other table (no TRUNCATE, no
  REFERENCES, no TRIGGER), SELECT only on the migration history;
* USAGE of the schema and its sequences, EXECUTE on the ledger functions.

Being no owner, the role cannot disable a trigger, replace a function or
alter a table, and being no superuser it cannot set
``session_replication_role``: the ledger's COMMIT-time rules (migration 010)
hold for every transaction it runs. Granting is idempotent and re-derives
every grant from the live schema, so run it again after each migration (as
``db.init`` does) and tables added since are covered.
"""

import re

from .schema import MIGRATE_TABLE

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: The trigger function that makes a table append-only (migration 001).
APPEND_ONLY_FUNCTION = "hoardrun_refuse_change"


def check_role_name(name):
    """``name`` if it is a plain lower-case identifier, else ValueError (it is spliced into SQL)."""
    if not isinstance(name, str) or not _ROLE_NAME.match(name) or name.startswith("pg_"):
        raise ValueError(f"--app-role={name!r} is not valid: expected lower-case letters, digits "
                         "and underscores, starting with a letter or underscore, not pg_")
    return name


def append_only_tables(database):
    """Tables of the current schema whose rows a ``hoardrun_refuse_change`` trigger guards."""
    return sorted(name for (name,) in database.execute_sql(
        "SELECT DISTINCT c.relname FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid "
        "JOIN pg_proc p ON p.oid = g.tgfoid "
        "WHERE p.proname = %s AND c.relnamespace = current_schema()::regnamespace",
        (APPEND_ONLY_FUNCTION,)))


def grant_app_role(database, name, *, password=None):
    """Create login role ``name`` if missing and give it exactly the app's grants.

    Returns ``(created, append_only_tables, other_tables)``. ``password``
    (when given) is set on the role; it travels as a bound parameter, never
    in a log line.
    """
    name = check_role_name(name)
    role = f'"{name}"'
    with database.atomic():
        exists = database.execute_sql("SELECT rolsuper FROM pg_roles WHERE rolname = %s",
                                      (name,)).fetchone()
        if exists and exists[0]:
            raise ValueError(f"role {name} is a superuser: the app must not run as one")
        if not exists:
            database.execute_sql(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB "
                                 "NOCREATEROLE NOREPLICATION NOBYPASSRLS")
        else:
            database.execute_sql(f"ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                                 "NOREPLICATION NOBYPASSRLS")
        if password:
            # Utility statements take no bound parameters: quote it as a literal.
            literal = database.execute_sql("SELECT quote_literal(%s)", (password,)).fetchone()[0]
            database.execute_sql(f"ALTER ROLE {role} PASSWORD {literal}")
        (dbname,) = database.execute_sql("SELECT quote_ident(current_database())").fetchone()
        (schema,) = database.execute_sql("SELECT quote_ident(current_schema())").fetchone()
        tables = [t for (t,) in database.execute_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "ORDER BY tablename")]
        guarded = set(append_only_tables(database))
        database.execute_sql(f"GRANT CONNECT, TEMPORARY ON DATABASE {dbname} TO {role}")
        database.execute_sql(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        # From nothing, every time: a grant given by hand or by an older
        # release does not survive a re-run.
        database.execute_sql(f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role}")
        for table in tables:
            quoted = f'{schema}."{table}"'
            if table in guarded:
                privileges = "SELECT, INSERT"
            elif table == MIGRATE_TABLE:
                privileges = "SELECT"
            else:
                privileges = "SELECT, INSERT, UPDATE, DELETE"
            database.execute_sql(f"GRANT {privileges} ON {quoted} TO {role}")
        database.execute_sql(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
        database.execute_sql(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role}")
    return (not exists, sorted(guarded), [t for t in tables if t not in guarded])
