"""Email ownership: verification codes, email changes and password reset.

Codes and tokens are random and stored only as HMAC-SHA256 under the server
secret (``email_codes.code_hash``): a copy of the table opens nothing, and
even a six-digit code cannot be found from its hash without the secret.

* **Verification.** Registering sends a 6-digit code to the new address
  (``settings.verification_ttl``, default 24 h). Only the newest code of a
  user counts; each allows ``MAX_CODE_ATTEMPTS`` guesses, counted in one
  atomic UPDATE before the comparison, so concurrent guesses cannot exceed
  it. A new code costs ``RESEND_INTERVAL`` between two and at most
  ``CODES_PER_HOUR`` an hour (429 with Retry-After).
* **Changing the address** sets ``users.pending_email`` and sends a code
  there; ``email`` (and who can pay it) stays until that code is entered.
* **Password reset.** ``forgot_password`` runs ONE statement whether or not
  the address belongs to a verified, active user (it inserts the token and
  the outbox row only if it does), so the answer and its timing are the
  same. Reset links last ``settings.reset_ttl`` (default 1 h) and at most
  ``RESETS_PER_HOUR`` are sent per user per hour: an attacker asking for
  many cannot flood the mailbox, and because a new link never cancels the
  older ones (all of which are younger than their lifetime), the user always
  holds a working link. Neither the login lockout nor wrong reset tokens
  block a reset, and a reset clears the lockout.
"""

import hashlib
import hmac
import math
import secrets
import uuid
from datetime import timedelta

import peewee as pw

from . import audit, auth, errors, users
from .db import db
from .ids import as_uuid
from .mail import Mailer
from .models import User
from .security import check_password_policy, hash_password

VERIFY, RESET = "verify_email", "reset_password"
CODE_DIGITS = 6
MAX_CODE_ATTEMPTS = 5
RESEND_INTERVAL = timedelta(seconds=60)
CODES_PER_HOUR = 5
RESETS_PER_HOUR = 5
HOUR = timedelta(hours=1)
RESET_PREFIX = "hrr_"
RESET_TOKEN_LENGTH = len(RESET_PREFIX) + 43  # 32 random bytes, url-safe base64


def _digest(secret, purpose, value):
    message = f"hoardrun {purpose} v1:{value}".encode("utf-8")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def new_code():
    """A random ``CODE_DIGITS``-digit code (leading zeros kept)."""
    return f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"


def new_reset_token():
    """A reset token: ``hrr_`` + 256 random bits (not a bearer token's shape)."""
    return RESET_PREFIX + secrets.token_urlsafe(32)


def _locked_user(user_id):
    user = User.select().where(User.id == user_id).for_update().first()
    if user is None:
        raise errors.NotFound("user not found")
    return user


def _no_code():
    return errors.InvalidCode("no valid code: it expired, was used or replaced, or took too "
                              "many wrong tries; ask for a new one (resend-verification)",
                              field="code")


def _bad_token():
    return errors.InvalidCode("the reset token is invalid, expired or already used; "
                              "ask for a new one (forgot-password)", field="token")


# --------------------------------------------------------------------------
# Verification codes

def _check_rate(user_id, now):
    created = [row[0] for row in db.execute_sql(
        "SELECT created_at FROM email_codes WHERE user_id = %s AND purpose = 'verify_email' "
        "AND created_at > %s ORDER BY created_at DESC", (user_id.hex, now - HOUR))]
    free_at = None
    if created and created[0] > now - RESEND_INTERVAL:
        free_at = created[0] + RESEND_INTERVAL
    elif len(created) >= CODES_PER_HOUR:
        free_at = created[CODES_PER_HOUR - 1] + HOUR
    if free_at is not None:
        retry = max(1, math.ceil((free_at - now).total_seconds()))
        raise errors.TooManyAttempts(f"a code was sent recently; ask again in {retry} seconds",
                                     retry_after=retry)


def _send_code(user, email, *, settings, mailer, now, limit):
    """Replace the user's live code by a new one for ``email`` (caller holds the row lock)."""
    if limit:
        _check_rate(user.id, now)
    db.execute_sql("UPDATE email_codes SET used_at = %s WHERE user_id = %s "
                   "AND purpose = 'verify_email' AND used_at IS NULL", (now, user.id.hex))
    code_id, code = uuid.uuid4(), new_code()
    expires_at = now + timedelta(seconds=settings.verification_ttl)
    db.execute_sql(
        "INSERT INTO email_codes (id, user_id, purpose, email, code_hash, created_at, "
        "expires_at) VALUES (%s, %s, 'verify_email', %s, %s, %s, %s)",
        (code_id.hex, user.id.hex, email,
         _digest(settings.secret_key, VERIFY, f"{code_id}:{code}"), now, expires_at))
    hours = settings.verification_ttl // 3600
    lifetime = f"{hours} hours" if hours >= 2 else f"{settings.verification_ttl // 60} minutes"
    mailer.send(email, "Your HoardRun verification code",
                f"Your HoardRun verification code is {code}\n\n"
                f"Enter it in the app to confirm this address. It works once, for "
                f"{lifetime}. If you did not ask for it, ignore this email: nothing "
                "changes until the code is entered.\n")


def register(email, password, first_name, last_name, *, settings, mailer, phone=None,
             country=None, request_id=None, now=None):
    """Create the user (``users.register``) with an unverified email and send its code."""
    now = now or auth.utcnow()
    user = users.register(email, password, first_name, last_name, phone=phone,
                          country=country, request_id=request_id, now=now)
    with db.atomic():
        _send_code(_locked_user(user.id), user.email, settings=settings, mailer=mailer,
                   now=now, limit=False)
    mailer.wake()
    return user


def resend_verification(user_id, *, settings, mailer, request_id=None, now=None):
    """Send a new code to the pending or unverified address; return that address.

    Conflict if there is nothing to verify; TooManyAttempts when asked too often.
    """
    now = now or auth.utcnow()
    with db.atomic():
        user = _locked_user(user_id)
        target = user.pending_email or (None if user.email_verified else user.email)
        if target is None:
            raise errors.Conflict("your email address is already verified")
        _send_code(user, target, settings=settings, mailer=mailer, now=now, limit=True)
        audit.record("user.verification_sent", "user", user.id, actor_id=user.id,
                     after={"email": target}, request_id=request_id)
    mailer.wake()
    return target


def verify_email(user_id, code, *, settings, mailer, request_id=None, now=None):
    """Check ``code``; mark the address verified (or make the pending one current).

    InvalidCode for a wrong, expired, used or spent code (each wrong guess
    counts); Conflict if the address is verified already or was taken meanwhile.
    """
    now = now or auth.utcnow()
    if not (isinstance(code, str) and len(code) == CODE_DIGITS and code.isascii()
            and code.isdigit()):
        raise errors.ValidationError(f"code must be the {CODE_DIGITS} digits from the email",
                                     field="code")
    user = users.get_user(user_id)
    row = db.execute_sql(
        "SELECT id, email, code_hash FROM email_codes WHERE user_id = %s "
        "AND purpose = 'verify_email' AND used_at IS NULL AND expires_at > %s "
        "AND attempts < %s ORDER BY created_at DESC LIMIT 1",
        (user.id.hex, now, MAX_CODE_ATTEMPTS)).fetchone()
    if row is None:
        if user.email_verified and user.pending_email is None:
            raise errors.Conflict("your email address is already verified")
        raise _no_code()
    code_id, email, stored = as_uuid(row[0]), row[1], row[2]
    # The guess is counted (and committed) before it is compared.
    counted = db.execute_sql(
        "UPDATE email_codes SET attempts = attempts + 1 WHERE id = %s AND used_at IS NULL "
        "AND attempts < %s RETURNING attempts", (code_id.hex, MAX_CODE_ATTEMPTS)).fetchone()
    if counted is None:
        raise _no_code()
    if not hmac.compare_digest(stored, _digest(settings.secret_key, VERIFY, f"{code_id}:{code}")):
        left = MAX_CODE_ATTEMPTS - counted[0]
        if left <= 0:
            raise errors.InvalidCode("wrong code, and that was the last try: ask for a new "
                                     "one (resend-verification)", field="code")
        raise errors.InvalidCode(f"wrong code; {left} {'try' if left == 1 else 'tries'} left",
                                 field="code")
    with db.atomic():
        user = _locked_user(user_id)
        used = db.execute_sql("UPDATE email_codes SET used_at = %s WHERE id = %s "
                              "AND used_at IS NULL", (now, code_id.hex)).rowcount
        if not used:
            raise _no_code()
        if email == user.email:
            (User.update({User.email_verified: True, User.updated_at: now})
             .where(User.id == user.id).execute())
            audit.record("user.email_verify", "user", user.id, actor_id=user.id,
                         after={"email": email}, request_id=request_id)
        elif email == user.pending_email:
            try:
                with db.atomic():
                    (User
                     .update({User.email: email, User.pending_email: None,
                              User.email_verified: True, User.updated_at: now})
                     .where(User.id == user.id)
                     .execute())
            except pw.IntegrityError:
                raise errors.Conflict("another user has registered this email address "
                                      "meanwhile", field="email") from None
            audit.record("user.email_change", "user", user.id, actor_id=user.id,
                         before={"email": user.email}, after={"email": email},
                         request_id=request_id)
            mailer.send(user.email, "Your HoardRun email address was changed",
                        f"The email address of your HoardRun account is now {email}.\n"
                        "If you did not do this, contact support at once.\n")
        else:
            raise _no_code()
    mailer.wake()
    return users.get_user(user_id)


def update_me(user_id, changes, *, settings, mailer, request_id=None, now=None):
    """Apply a profile PATCH in one transaction; a new ``email`` only becomes pending.

    ``changes`` as for ``users.update_profile`` plus an optional ``email``:
    that address gets a code and replaces the current one once verified (the
    current address stays, and stays payable, until then). Asking for the
    current address cancels a pending change. Conflict if another user has
    the address; TooManyAttempts when codes were sent too often.
    """
    now = now or auth.utcnow()
    changes = dict(changes)
    email = changes.pop("email", None)
    with db.atomic():
        user = users.update_profile(user_id, changes, request_id=request_id, now=now)
        if email is not None:
            _request_email_change(user_id, email, settings=settings, mailer=mailer,
                                  request_id=request_id, now=now)
            user = users.get_user(user_id)
    mailer.wake()
    return user


def _request_email_change(user_id, new_email, *, settings, mailer, request_id, now):
    new = users.clean_email(new_email)
    user = _locked_user(user_id)
    before = user.pending_email
    if new == user.email:
        if before is None:
            return
        db.execute_sql("UPDATE email_codes SET used_at = %s WHERE user_id = %s "
                       "AND purpose = 'verify_email' AND used_at IS NULL AND email = %s",
                       (now, user.id.hex, before))
        new = None
    else:
        if (User.select(User.id)
                .where((User.email == new) & (User.id != user.id))
                .exists()):
            raise errors.Conflict("a user with this email already exists", field="email")
        _send_code(user, new, settings=settings, mailer=mailer, now=now, limit=True)
    (User.update({User.pending_email: new, User.updated_at: now})
     .where(User.id == user.id).execute())
    audit.record("user.email_change_request", "user", user.id, actor_id=user.id,
                 before={"pending_email": before}, after={"pending_email": new},
                 request_id=request_id)


# --------------------------------------------------------------------------
# Password reset

_FORGOT_SQL = (
    "WITH u AS (SELECT id, email FROM users WHERE email = %s AND email_verified"
    " AND status = 'active' AND (SELECT count(*) FROM email_codes c WHERE c.user_id = users.id"
    " AND c.purpose = 'reset_password' AND c.created_at > %s) < %s),"
    " c AS (INSERT INTO email_codes (id, user_id, purpose, email, code_hash, created_at,"
    " expires_at) SELECT %s, u.id, 'reset_password', u.email, %s, %s, %s FROM u RETURNING id),"
    " m AS (" + Mailer.insert_from("u", "email") + " RETURNING id)"
    " SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM m)")


def forgot_password(email, *, settings, mailer, now=None):
    """Send a reset link if ``email`` is a verified, active user's; reveal nothing either way.

    The same work is done for every address (one statement whose inserts
    find no row for an unknown one). Returns nothing on purpose.
    """
    now = now or auth.utcnow()
    address = users.clean_email(email)
    token = new_reset_token()
    minutes = settings.reset_ttl // 60
    body = (f"Someone (we hope you) asked to reset the password of the HoardRun account "
            f"for {address}.\n\nYour reset token:\n\n    {token}\n\n"
            f"Enter it in the app with your new password. It works once, for {minutes} "
            "minutes. If you did not ask for this, ignore this email: your password stays "
            "as it is.\n")
    params = (address, now - HOUR, RESETS_PER_HOUR, uuid.uuid4().hex,
              _digest(settings.secret_key, RESET, token), now,
              now + timedelta(seconds=settings.reset_ttl),
              uuid.uuid4().hex, "Reset your HoardRun password", mailer.seal(body))
    with db.atomic():
        queued = db.execute_sql(_FORGOT_SQL, params).fetchone()[1]
    if queued:
        mailer.wake()


def reset_password(token, new_password, *, settings, mailer, request_id=None, now=None):
    """Set a new password with a reset token; revoke every bearer token; audit it.

    The token is single use (and its siblings die with it); the login
    lockout is cleared. InvalidCode for a bad, expired or used token;
    ValidationError on ``new_password`` for a weak one (the token survives).
    """
    now = now or auth.utcnow()
    if not (isinstance(token, str) and len(token) == RESET_TOKEN_LENGTH
            and token.startswith(RESET_PREFIX)):
        raise _bad_token()
    row = db.execute_sql(
        "SELECT id, user_id, email FROM email_codes WHERE code_hash = %s "
        "AND purpose = 'reset_password' AND used_at IS NULL AND expires_at > %s",
        (_digest(settings.secret_key, RESET, token), now)).fetchone()
    if row is None:
        raise _bad_token()
    code_id, user_id, email = as_uuid(row[0]), as_uuid(row[1]), row[2]
    user = users.get_user(user_id)
    if user.email != email or user.status != "active":
        raise _bad_token()
    try:
        check_password_policy(new_password, email=user.email)
    except errors.ValidationError as exc:
        raise errors.ValidationError(exc.detail, field="new_password") from None
    password_hash = hash_password(new_password)
    with db.atomic():
        used = db.execute_sql("UPDATE email_codes SET used_at = %s WHERE id = %s "
                              "AND used_at IS NULL", (now, code_id.hex)).rowcount
        if not used:
            raise _bad_token()
        # Every other reset link in the mailbox dies with this one.
        db.execute_sql("UPDATE email_codes SET used_at = %s WHERE user_id = %s "
                       "AND purpose = 'reset_password' AND used_at IS NULL",
                       (now, user.id.hex))
        (User
         .update({User.password_hash: password_hash, User.failed_logins: 0,
                  User.locked_until: None, User.updated_at: now})
         .where(User.id == user.id)
         .execute())
        revoked = auth.revoke_all(user.id, now=now)
        audit.record("user.password_reset", "user", user.id, actor_id=user.id,
                     after={"tokens_revoked": revoked}, request_id=request_id)
        mailer.send(user.email, "Your HoardRun password was changed",
                    "The password of your HoardRun account was just reset, and every "
                    "session was logged out.\nIf you did not do this, contact support at "
                    "once.\n")
    mailer.wake()
