"""The full-request ceiling: what one keyed API transfer sends, replayed by pgbench.

``capture`` runs two keyed transfers through the real app in this process
(falcon's test client, the same production settings as the bench server)
and records every statement the psycopg2 cursor sends, as
``tests/integration/test_round_trips.py`` does, rendered with ``mogrify``
into the exact text that goes on the wire; the second transfer (on a warm
connection, token lookup prepared) is kept, and the token lookup's
``PREPARE`` is read back from ``pg_prepared_statements``.

``scripts`` turns that capture into pgbench scripts, one per bench user:
the user's id, accounts and token hash are swapped in, and every other
identifier the request made (movement and audit ids, references, the
idempotency key, the request id) becomes pgbench random numbers, so each
replayed transaction is a new transfer. Each round trip stays one
round trip (its statements joined with ``\\;``).
"""

import re
import uuid

import falcon.testing

from hoardrun import db as dbm
from hoardrun.api.app import create_app
from hoardrun.security import hash_token

UUID = re.compile(r"(?<![0-9A-Za-z_])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                  r"[0-9a-f]{12}(?![0-9A-Za-z_])")
HEX32 = re.compile(r"(?<![0-9A-Za-z_])(?:[0-9a-f]{32}|[0-9A-F]{32})(?![0-9A-Za-z_])")
#: (variable suffix, digits) of each uuid segment; decimal digits are hex digits too
SEGMENTS = (("a", 8), ("b", 4), ("c", 4), ("d", 4), ("e", 12))


def capture(settings, person, token):
    """``{"round_trips": [sql, ...], "prepare": [sql, ...], "person": person}``.

    ``person`` is ``(user_id, email, accounts)`` with ``checking`` and
    ``savings`` accounts; the database must be bound to ``settings``.
    """
    sent = []
    original = dbm.PostgresDatabase.cursor

    class Recording:
        def __init__(self, cursor):
            self._cursor = cursor

        def execute(self, sql, params=None):
            sent.append(self._cursor.mogrify(sql, params).decode("utf-8"))
            return self._cursor.execute(sql, params)

        def __getattr__(self, name):
            return getattr(self._cursor, name)

    client = falcon.testing.TestClient(create_app(settings))
    user_id, _, accounts = person
    body = {"from_account_id": accounts["checking"], "to_account_id": accounts["savings"],
            "amount": "0.01", "description": "bench"}
    headers = {"Authorization": f"Bearer {token}"}
    dbm.PostgresDatabase.cursor = lambda self, *a, **k: Recording(original(self, *a, **k))
    try:
        for _ in range(2):
            sent.clear()
            result = client.simulate_post("/api/v1/transfers", json=body, headers={
                **headers, "Idempotency-Key": uuid.uuid4().hex})
            if result.status_code != 201:
                raise RuntimeError(f"the captured transfer failed: {result.status_code} "
                                   f"{result.text[:300]}")
    finally:
        dbm.PostgresDatabase.cursor = original
    prepare = [row[0] for row in dbm.db.execute_sql(
        "SELECT statement FROM pg_prepared_statements ORDER BY name").fetchall()]
    dbm.release_connection()
    return {"round_trips": list(sent), "prepare": prepare, "person": person,
            "token_hash": hash_token(token)}


def split_top_level(sql):
    """``sql`` split at semicolons outside quotes, dollar quotes and comments."""
    parts, start, i, n = [], 0, 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            j = i + 1
            while j < n:
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:  # '' or "" inside
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
        elif ch == "$":
            m = re.match(r"\$[A-Za-z_]*\$", sql[i:])
            if m:
                end = sql.find(m.group(0), i + len(m.group(0)))
                i = n if end < 0 else end + len(m.group(0))
            else:
                i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
        elif ch == ";":
            parts.append(sql[start:i])
            start = i = i + 1
        else:
            i += 1
    parts.append(sql[start:])
    return [p.strip() for p in parts if p.strip()]


def _fixed(person, token_hash):
    """The values that identify ``person``: ids dashed and as hex (as the SQL sends them)."""
    user_id, _, accounts = person
    ids = [str(user_id), *(str(a) for a in accounts.values())]
    return [*ids, *(i.replace("-", "") for i in ids), token_hash]


def template(captured):
    """The capture as a pgbench script body with its varying identifiers as variables.

    Returns ``(text, variable_count)``; the text still holds the captured
    user's own values, which ``scripts`` replaces per user.
    """
    fixed = set(_fixed(captured["person"], captured["token_hash"]))
    names = {}

    def variable(match):
        value = match.group(0)
        if value in fixed:
            return value
        # One id may appear dashed, as hex and in capitals (a reference):
        # every form of it becomes the same digits.
        k = names.setdefault(value.replace("-", "").lower(), len(names) + 1)
        joiner = "-" if "-" in value else ""
        # NOTE: pgbench reads ":name" greedily over [A-Za-z0-9_], so each
        # segment is its own variable, ended by "-", ":" or a quote.
        return joiner.join(f":hr{seg}{k}" for seg, _ in SEGMENTS)

    commands = []
    for trip in captured["round_trips"]:
        text = HEX32.sub(variable, UUID.sub(variable, trip))
        commands.append(" \\; ".join(split_top_level(text)) + ";")
    return "\n".join(commands) + "\n", len(names)


def scripts(captured, people, tokens, limit=100):
    """One pgbench script per user (up to ``limit``): fresh ids each transaction."""
    body, count = template(captured)
    header = []
    for k in range(1, count + 1):
        # Decimal digits are hex digits too: 8 + 12 + 12 random digits.
        header += [f"\\set hr{seg}{k} random({10 ** (n - 1)}, {10 ** n - 1})"
                   for seg, n in SEGMENTS]
    # The app prepares its token lookup once per connection; so does each client.
    header += ["\\if :hr_prepared = 0",
               *[" \\; ".join(split_top_level(p)) + ";" for p in captured["prepare"]],
               "\\set hr_prepared 1", "\\endif"]
    original = _fixed(captured["person"], captured["token_hash"])
    out = []
    for person in people[:limit]:
        text = body
        for old, new in zip(original, _fixed(person, hash_token(tokens[person[0]]))):
            text = text.replace(old, new)
        out.append("\n".join(header) + "\n" + text)
    return out
