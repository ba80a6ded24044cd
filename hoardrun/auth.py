"""Bearer tokens (issue, look up, revoke) and logging in with login throttling.

Tokens are opaque random strings (``security.new_token``); only their
SHA-256 is stored, so a copy of ``auth_tokens`` opens no session.
``authenticate`` runs on every request, so it is ONE reviewed SQL statement
through the pool (PERFORMANCE.md items 1 and 6): token and user joined, and
only an unrevoked, unexpired token of an *active* user matches. Suspending
a user therefore ends their sessions at once, without touching the tokens.

Login throttling: 5 consecutive failed logins for one email, each within
15 minutes of the previous one, lock that email for 15 minutes
(``users.failed_logins``/``locked_until``); while locked every attempt, even
with the right password, is ``TooManyAttempts`` with ``retry_after`` seconds
and costs no password hash. A success resets the count. Each attempt is
counted atomically BEFORE its password is hashed (one UPDATE … RETURNING,
committed at once), so a burst of concurrent guesses gets at most 5
verdicts, the right password among them or not. Emails without a user are
throttled the same way in memory, so a lockout does not reveal which emails
have accounts; an unknown email also spends a dummy hash, so the timing
does not either.
"""

import math
import threading
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

from peewee import Case

from . import audit, errors
from .config import DEFAULT_TOKEN_TTL
from .clock import utcnow
from .db import db
from .ids import as_uuid
from .models import AuthToken, User
from .security import (
    dummy_verify, hash_password, hash_token, looks_like_token, needs_rehash, new_token,
    verify_password,
)

MAX_FAILED_LOGINS = 5
FAILURE_WINDOW = timedelta(minutes=15)
LOCK_DURATION = timedelta(minutes=15)


@dataclass(frozen=True)
class CurrentUser:
    """Who is calling: what ``authenticate`` found for a bearer token."""

    id: uuid.UUID
    email: str
    role: str
    status: str

    @property
    def is_admin(self):
        return self.role == "admin"




def _db_time(value):
    # The column's own conversion (refuses a naive datetime).
    return AuthToken.expires_at.db_value(value)


# --------------------------------------------------------------------------
# Tokens

# A plain parameterised statement, not one PREPAREd per connection: a
# prepared statement is session state, which a transaction-mode pooler does
# not keep. Measured with pgbench (simple protocol, as psycopg2 speaks), the
# unprepared lookup and a PL/pgSQL function with its cached plan cost the
# same, ~0.05 ms; the prepared one saved ~0.04 ms of it.
_AUTHENTICATE_SQL = (
    "SELECT u.id, u.email, u.role, u.status"
    " FROM auth_tokens t JOIN users u ON u.id = t.user_id"
    " WHERE t.token_hash = %s AND t.revoked_at IS NULL AND t.expires_at > %s"
    " AND u.status = 'active'")


def authenticate(token, *, now=None):
    """Return the ``CurrentUser`` for a live token of an active user, else None.

    One indexed statement (``auth_tokens.token_hash`` is UNIQUE); garbage
    that does not even look like a token never reaches the database.
    """
    if not looks_like_token(token):
        return None
    params = (hash_token(token), _db_time(now or utcnow()))
    row = db.execute_sql(_AUTHENTICATE_SQL, params).fetchone()
    if row is None:
        return None
    user_id, email, role, status = row
    return CurrentUser(as_uuid(user_id), email, role, status)


def issue_token(user_id, *, ttl=DEFAULT_TOKEN_TTL, now=None):
    """Store a new token for ``user_id``; return ``(token, expires_at)``.

    The token itself is returned exactly once, here; only its hash is kept.
    """
    token = new_token()
    expires_at = (now or utcnow()) + timedelta(seconds=ttl)
    AuthToken.insert(id=uuid.uuid4(), user=user_id, token_hash=hash_token(token),
                     expires_at=expires_at).execute()
    return token, expires_at


def revoke(token, *, now=None):
    """Revoke ``token``; return True if a live token was revoked."""
    if not looks_like_token(token):
        return False
    return bool(AuthToken
                .update(revoked_at=now or utcnow())
                .where((AuthToken.token_hash == hash_token(token))
                       & AuthToken.revoked_at.is_null())
                .execute())


def revoke_all(user_id, *, keep_token=None, now=None):
    """Revoke every live token of ``user_id`` except ``keep_token``; return how many."""
    condition = (AuthToken.user == user_id) & AuthToken.revoked_at.is_null()
    if keep_token is not None:
        condition &= AuthToken.token_hash != hash_token(keep_token)
    return AuthToken.update(revoked_at=now or utcnow()).where(condition).execute()


def logout(user_id, token, *, request_id=None, now=None):
    """Revoke the caller's ``token`` (other sessions stay) and audit it."""
    with db.atomic():
        if revoke(token, now=now):
            audit.record("auth.logout", "user", user_id, actor_id=user_id,
                         request_id=request_id)


# --------------------------------------------------------------------------
# Login

# Dots a domain may be written with (NFKC already maps the fullwidth one).
_DOMAIN_DOTS = str.maketrans({"\u3002": ".", "\uff61": "."})


def normalise_email(email):
    """The one spelling of an address that is stored, unique and looked up.

    Trimmed, NFKC-normalised and case-folded (so NFC and NFD spellings,
    fullwidth letters and any letter case are one address), with the
    domain's trailing dot (the DNS root, ``example.com.``) removed. Every
    place that stores or finds a user by email goes through here.
    """
    if not isinstance(email, str):
        return ""
    text = unicodedata.normalize("NFKC", email.strip())
    # casefold, then NFKC again (casefolding can un-normalise, e.g. U+0130),
    # then lower: the stored form must pass the CHECK email = lower(email).
    text = unicodedata.normalize("NFKC", text.casefold()).lower()
    local, at, domain = text.rpartition("@")
    if not at:
        return text
    return f"{local}@{domain.translate(_DOMAIN_DOTS).rstrip('.')}"


def _retry_after(locked_until, now):
    return max(1, math.ceil((locked_until - now).total_seconds()))


def _locked(retry_after):
    return errors.TooManyAttempts(
        f"too many failed logins; try again in {retry_after} seconds", retry_after=retry_after)


class _UnknownEmailThrottle:
    """The same lockout rule for emails that have no user, kept in memory.

    Bounded (oldest entries dropped) so a flood of random emails cannot grow
    it without limit. Per process: good enough for its one purpose, making
    unknown emails behave like known ones.
    """

    MAX_ENTRIES = 10_000

    def __init__(self):
        self._lock = threading.Lock()
        self._entries = OrderedDict()  # email -> [failures, last_failure, locked_until]

    def claim(self, email, now):
        """Count one attempt for ``email`` (before hashing); seconds to wait if locked, else None.

        Check and count under one lock, as the UPDATE does for known users,
        so concurrent guesses cannot all pass the check first.
        """
        with self._lock:
            entry = self._entries.pop(email, None)
            if entry and entry[2] and entry[2] > now:
                self._entries[email] = entry
                return _retry_after(entry[2], now)
            if entry is None or now - entry[1] > FAILURE_WINDOW:
                entry = [0, now, None]
            entry[0] += 1
            entry[1] = now
            entry[2] = now + LOCK_DURATION if entry[0] >= MAX_FAILED_LOGINS else None
            self._entries[email] = entry
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
            return None

    def clear(self):
        with self._lock:
            self._entries.clear()


unknown_emails = _UnknownEmailThrottle()


def login(email, password, *, ttl=DEFAULT_TOKEN_TTL, request_id=None, now=None):
    """Check ``email``/``password`` and issue a token; return ``(user, token, expires_at)``.

    Raises InvalidCredentials (unknown email and wrong password alike),
    TooManyAttempts while the email is locked, UserNotActive for a suspended,
    deactivated or pending user who gave the right password (only then, so
    the status is not revealed to someone guessing).
    """
    now = now or utcnow()
    email = normalise_email(email)
    user = User.get_or_none(User.email == email) if email else None
    if user is None:
        retry = unknown_emails.claim(email, now)
        if retry:
            raise _locked(retry)
        dummy_verify()
        raise errors.InvalidCredentials("email or password is incorrect")
    # login() resets the count itself, in the transaction that issues the token.
    attempts = check_password(user, password, request_id=request_id, now=now, reset=False)
    if user.status != "active":
        raise errors.UserNotActive(f"this user is {user.status} and cannot log in")
    with db.atomic():
        changes = {**_reset_changes(attempts), User.last_login_at: now, User.updated_at: now}
        if needs_rehash(user.password_hash):
            # Cost parameters were raised since this hash was made.
            changes[User.password_hash] = hash_password(password)
        User.update(changes).where(User.id == user.id).execute()
        token, expires_at = issue_token(user.id, ttl=ttl, now=now)
        audit.record("auth.login", "user", user.id, actor_id=user.id,
                     after={"token_expires_at": expires_at}, request_id=request_id)
    user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
    return user, token, expires_at


def check_password(user, password, *, request_id=None, now=None, reset=True):
    """Verify ``password`` for ``user`` under the lockout rule, or raise.

    Used by login and by a password change (a stolen token must not become
    an unthrottled way to guess the password). The attempt is counted
    before the hash is checked (``_claim_attempt``): TooManyAttempts while
    locked (without hashing), InvalidCredentials on a mismatch. A match
    resets the count (``reset``; a caller that resets it anyway passes False)
    and returns the attempt's number (for ``_reset_changes``).
    """
    now = now or utcnow()
    if user.locked_until is not None and user.locked_until > now:
        raise _locked(_retry_after(user.locked_until, now))
    attempts = _claim_attempt(user.id, now)
    if verify_password(user.password_hash, password):
        if reset:
            User.update(_reset_changes(attempts)).where(User.id == user.id).execute()
        return attempts
    locked_until = now + LOCK_DURATION if attempts >= MAX_FAILED_LOGINS else None
    with db.atomic():
        audit.record("auth.login_failed", "user", user.id,
                     after={"failed_logins": attempts, "locked_until": locked_until},
                     request_id=request_id)
    raise errors.InvalidCredentials("email or password is incorrect")


def _reset_changes(attempts):
    """The UPDATE values that clear the count after a right password, attempt ``attempts``.

    Only when no other attempt was counted since this one: otherwise a right
    password (the owner's, or a lucky guess) inside a burst of wrong ones
    would wipe the attempts counted after it and hand the burst five more
    verdicts. Then the count and any lock it reached stay.
    """
    unchanged = User.failed_logins == attempts
    return {User.failed_logins: Case(None, [(unchanged, 0)], User.failed_logins),
            User.locked_until: Case(None, [(unchanged, None)], User.locked_until)}


def _claim_attempt(user_id, now):
    """Count one login attempt in ONE atomic UPDATE … RETURNING; return the count.

    Runs and commits before the password is hashed: concurrent attempts
    queue on the row, each sees the count the previous one left, and the
    one that reaches MAX_FAILED_LOGINS sets the lock, so attempts after it
    match no row and are TooManyAttempts without a hash. A success resets
    the count afterwards, so it only ever counts consecutive failures.
    """
    # updated_at doubles as "time of the last attempt": every attempt bumps
    # it, and one more than FAILURE_WINDOW after it starts over.
    # NOTE: values inside CASE are not converted by the column, hence _db_time.
    count = Case(None, [(User.updated_at < _db_time(now - FAILURE_WINDOW), 1)],
                 User.failed_logins + 1)
    with db.atomic():
        row = (User
               .update({User.failed_logins: count,
                        User.locked_until: Case(None, [(count >= MAX_FAILED_LOGINS,
                                                        _db_time(now + LOCK_DURATION))], None),
                        User.updated_at: now})
               .where((User.id == user_id)
                      & (User.locked_until.is_null() | (User.locked_until <= now)))
               .returning(User.failed_logins, User.locked_until)
               .tuples()
               .execute())
        row = next(iter(row), None)
    if row is None:
        # Locked by a concurrent attempt since ``user`` was read.
        locked_until = (User
                        .select(User.locked_until)
                        .where(User.id == user_id)
                        .scalar())
        raise _locked(_retry_after(locked_until, now) if locked_until else 1)
    return row[0]
