"""006 idempotency-key retention: an index on idempotency_keys.created_at.

``invoke db.prune`` deletes keys older than HOARDRUN_IDEMPOTENCY_TTL in
batches of ``created_at < cutoff ORDER BY created_at LIMIT n``; without this
index every batch would scan the whole table while live traffic writes to it.
"""


def migrate(migrator, database, *, fake=False):
    migrator.add_index("idempotency_keys", "created_at")


def rollback(migrator, database, *, fake=False):
    migrator.drop_index("idempotency_keys", "created_at")
