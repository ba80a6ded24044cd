"""The tamper-evident history: every account's entries form a hash chain.

Each entry carries ``seq`` (its place in its account's history, 1, 2, ...)
and ``chain_hash`` = sha256(previous entry's chain_hash || the entry's
canonical content), written by the ledger's writer in the entry's own
transaction (migration 010; ``hoardrun_entry_hash`` is the one definition of
the canonical content). An edit made behind the application's back, even by
a superuser with the triggers off, changes an entry's content or position
without its hash: ``verify_chain`` recomputes every link and names the first
entry of each account where the chain breaks.

NOTE: a chain proves the history was not changed *after* its hashes were
written. Someone who can rewrite every hash from the edited entry onwards
(a superuser) can forge a consistent chain; to catch that, record the chain
heads (``chain_heads``) somewhere they cannot write, and compare.
"""

from .db import db

_BREAKS = """
WITH c AS (
    SELECT t AS entry, t.account_id, t.id, t.reference, t.seq, t.chain_hash,
           lag(t.chain_hash) OVER w AS previous_hash, row_number() OVER w AS position
      FROM transactions t
    WINDOW w AS (PARTITION BY t.account_id ORDER BY t.seq, t.created_at, t.id))
SELECT DISTINCT ON (c.account_id) c.account_id, c.id, c.reference, c.seq, c.position,
       c.seq <> c.position AS misplaced
  FROM c
 WHERE c.seq <> c.position
    OR c.chain_hash IS DISTINCT FROM hoardrun_entry_hash(c.previous_hash, c.entry)
 ORDER BY c.account_id, c.position
"""


def verify_chain():
    """Recompute every account's chain; one line per account whose chain breaks (empty: intact).

    The line names the first entry whose content, position or predecessor no
    longer matches the hash it carries (later ones are then unproven).
    """
    problems = []
    for account_id, entry_id, reference, seq, position, misplaced in db.execute_sql(_BREAKS):
        why = (f"it is number {seq} but entry {position} of its account: an entry before it "
               "was removed or the order was changed" if misplaced else
               "its content, its position or the entry before it was changed after it was "
               "written")
        problems.append(f"account {account_id}: hash chain broken at entry {entry_id} "
                        f"({reference}, number {position}): {why}")
    return problems


def chain_heads():
    """``{account_id: (seq, chain_hash hex)}`` of every account's latest entry."""
    return {account_id: (seq, bytes(head).hex()) for account_id, seq, head in db.execute_sql(
        "SELECT DISTINCT ON (account_id) account_id, seq, chain_hash FROM transactions "
        "ORDER BY account_id, seq DESC")}
