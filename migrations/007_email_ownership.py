"""007 email ownership: verification codes, reset tokens, the mail outbox.

``email_codes`` holds one row per code or token ever sent: only a keyed
hash (HMAC-SHA256 under the server secret), the address it was sent to,
its expiry, how many wrong guesses it took and when it was used.
``mail_outbox`` is the queue the sender works through: a message is written
in the same transaction as the change that caused it, and delivered (and
retried) by the mail sender after the commit. ``users.pending_email`` is an
address the user asked to change to; it replaces ``email`` only once verified.
"""

import peewee as pw
from peewee import SQL


def _check(name, expression):
    return SQL(f"CONSTRAINT {name} CHECK ({expression})")


class TimestampTZ(pw.Field):
    field_type = "TIMESTAMPTZ"


def _now():
    return [SQL("DEFAULT CURRENT_TIMESTAMP")]


class FrozenModel(pw.Model):
    # As hoardrun.db.BaseModel: index names follow table names.
    class Meta:
        legacy_table_names = False


class User(FrozenModel):
    # Only what the foreign key needs: the table exists since 001.
    id = pw.UUIDField(primary_key=True)

    class Meta:
        table_name = "users"


class EmailCode(FrozenModel):
    id = pw.UUIDField(primary_key=True)
    user = pw.ForeignKeyField(User, backref="email_codes", on_delete="CASCADE")
    purpose = pw.CharField(max_length=16)
    email = pw.CharField(max_length=254)
    code_hash = pw.CharField(max_length=64, unique=True)
    attempts = pw.SmallIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    created_at = TimestampTZ(constraints=_now())
    expires_at = TimestampTZ()
    used_at = TimestampTZ(null=True)

    class Meta:
        table_name = "email_codes"
        constraints = [
            _check("email_codes_purpose", "purpose IN ('verify_email', 'reset_password')"),
            _check("email_codes_hash_hex", "length(code_hash) = 64"),
            _check("email_codes_attempts", "attempts >= 0"),
            _check("email_codes_expiry", "expires_at > created_at"),
        ]
        indexes = (
            (("user", "purpose", "created_at"), False),
        )


class MailOutbox(FrozenModel):
    id = pw.UUIDField(primary_key=True)
    recipient = pw.CharField(max_length=254)
    subject = pw.CharField(max_length=200)
    body = pw.TextField(null=True)
    status = pw.CharField(max_length=8, default="pending", constraints=[SQL("DEFAULT 'pending'")])
    attempts = pw.SmallIntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    last_error = pw.CharField(max_length=500, null=True)
    created_at = TimestampTZ(constraints=_now())
    next_attempt_at = TimestampTZ(constraints=_now())
    sent_at = TimestampTZ(null=True)

    class Meta:
        table_name = "mail_outbox"
        constraints = [
            _check("mail_outbox_status", "status IN ('pending', 'sent', 'failed')"),
            _check("mail_outbox_attempts", "attempts >= 0"),
            _check("mail_outbox_sent_at", "(status = 'sent') = (sent_at IS NOT NULL)"),
        ]
        indexes = (
            (("created_at",), False),
        )


MailOutbox.add_index(MailOutbox.index(MailOutbox.next_attempt_at,
                                      where=(MailOutbox.status == "pending"),
                                      name="mail_outbox_due"))

PENDING_EMAIL_CHECK = (
    "pending_email IS NULL OR (pending_email <> email AND length(pending_email) >= 3"
    " AND pending_email <> replace(pending_email, '@', ''))")


def migrate(migrator, database, *, fake=False):
    """Add users.pending_email (with its CHECK), then the two tables."""
    migrator.add_fields("users", pending_email=pw.CharField(max_length=254, null=True))
    migrator.sql("ALTER TABLE users ADD CONSTRAINT users_pending_email CHECK "
                 f"({PENDING_EMAIL_CHECK})")
    migrator.create_model(EmailCode)
    migrator.create_model(MailOutbox)


def rollback(migrator, database, *, fake=False):
    """Drop the tables, then the column and its CHECK."""
    migrator.remove_model(MailOutbox)
    migrator.remove_model(EmailCode)
    migrator.sql("ALTER TABLE users DROP CONSTRAINT IF EXISTS users_pending_email")
    migrator.remove_fields("users", "pending_email")
