"""Users: registration, profile, password change, admin suspension, lookup.

Every change writes its audit row in the same transaction. Audit rows and
errors never carry a password, a hash or a token: ``audit_view`` is the only
shape of a user that goes into the audit log.
"""

import re
import unicodedata
import uuid

import peewee as pw

from . import audit, auth, errors
from .db import db
from .models import USER_ROLES, USER_STATUSES, User
from .cursors import page_query
from .security import check_password_policy, hash_password
from .text import clean_text

NAME_MAX = 100
EMAIL_MAX = 254
# One "@", no spaces, a dot in the domain. Deliverability is a verification
# email's job; this only refuses what is certainly not an address.
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
# E.164: "+", a non-zero country-code digit, at most 15 digits in all.
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_PHONE_SEPARATORS = re.compile(r"[\s\-().]")

# ISO 3166-1 alpha-2, officially assigned codes.
COUNTRIES = frozenset("""
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM
DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS
GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN
KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ
MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM
PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV
SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI
VN VU WF WS YE YT ZA ZM ZW
""".split())

PROFILE_FIELDS = ("first_name", "last_name", "phone", "country")


def audit_view(user):
    """The user's fields that audit rows may hold (never the password hash)."""
    return {"email": user.email, "first_name": user.first_name, "last_name": user.last_name,
            "phone": user.phone, "country": user.country, "role": user.role,
            "status": user.status}


# --------------------------------------------------------------------------
# Field rules (each returns the normalised value or raises ValidationError)

def clean_email(value, field="email"):
    """Return ``value`` normalised (``auth.normalise_email``) if it is an email address.

    A local part or a domain label that mixes look-alike scripts (a Cyrillic
    "а" among Latin letters) is refused: it would be a second account that
    reads exactly like someone else's address. So are quoted local parts,
    address literals and empty domain labels.
    """
    if not isinstance(value, str):
        raise errors.ValidationError("email must be a string", field=field)
    email = auth.normalise_email(value)
    if len(email) > EMAIL_MAX or not _EMAIL.fullmatch(email) or not email.isprintable():
        raise errors.ValidationError("email is not a valid email address", field=field)
    local, _, domain = email.rpartition("@")
    labels = domain.split(".")
    # Quoted local parts and address literals ([127.0.0.1]) are legal in
    # RFC 5321 but no mailbox a person types; an empty label (ex..com) is no
    # domain at all.
    if '"' in local or domain.startswith("[") or not all(1 <= len(x) <= 63 for x in labels):
        raise errors.ValidationError("email is not a valid email address", field=field)
    # UTS #39 applies per label: the name and each label of the domain are in
    # one script (or a combinable set), so "bob@еx.com" with a Cyrillic "е"
    # is not a second bob.
    for part in (local, *labels):
        scripts = letter_scripts(part)
        if len(scripts) > 1 and not scripts <= _COMBINABLE_SCRIPTS:
            raise errors.ValidationError(
                "email mixes letters of different scripts (" + ", ".join(sorted(scripts)).title()
                + ") in one name; write it in one script", field=field)
    return email


# Scripts that are written together (Japanese, Chinese, Korean with Latin,
# as Unicode's "highly restrictive" profile, UTS #39, allows); any other mix,
# such as Latin with Cyrillic or Greek, is how look-alike addresses are made.
_COMBINABLE_SCRIPTS = frozenset({"LATIN", "CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO"})


def letter_scripts(text):
    """The scripts of the letters in ``text``, by Unicode character name ("LATIN", "GREEK")."""
    scripts = set()
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            scripts.add(name.split(" ", 1)[0] if name else "UNKNOWN")
    return scripts


def clean_name(value, field):
    """Return ``value`` trimmed if it is 1-100 printable characters."""
    return clean_text(value, field, max_length=NAME_MAX, required=True)


def clean_phone(value, field="phone"):
    """Return ``value`` in E.164 (spaces, dashes, dots and brackets dropped), or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.ValidationError("phone must be a string", field=field)
    phone = _PHONE_SEPARATORS.sub("", value)
    if not _E164.fullmatch(phone):
        raise errors.ValidationError(
            "phone must be in E.164 format: + then country code and number, e.g. +14155550123",
            field=field)
    return phone


def clean_country(value, field="country"):
    """Return ``value`` as an upper-case ISO 3166-1 alpha-2 code, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().upper() not in COUNTRIES:
        raise errors.ValidationError("country must be an ISO 3166-1 alpha-2 code, e.g. GB",
                                     field=field)
    return value.strip().upper()


def _collect(checks):
    """Run ``{field: thunk}``; return the values or raise one error listing every bad field."""
    values, problems = {}, []
    for field, check in checks.items():
        try:
            values[field] = check()
        except errors.ValidationError as exc:
            problems.append({"field": exc.field or field, "detail": exc.detail})
    if problems:
        first = problems[0]
        raise errors.ValidationError(first["detail"], field=first["field"], errors=problems)
    return values


# --------------------------------------------------------------------------
# Self service

def register(email, password, first_name, last_name, *, phone=None, country=None,
             request_id=None, now=None):
    """Create an active user with role ``user``; return it.

    Conflict (field ``email``) if the email is taken, in any letter case.
    """
    now = now or auth.utcnow()
    values = _collect({
        "email": lambda: clean_email(email),
        "first_name": lambda: clean_name(first_name, "first_name"),
        "last_name": lambda: clean_name(last_name, "last_name"),
        "phone": lambda: clean_phone(phone),
        "country": lambda: clean_country(country),
        "password": lambda: check_password_policy(password, email=auth.normalise_email(email)),
    })
    del values["password"]
    if User.select(User.id).where(User.email == values["email"]).exists():
        # Checked before hashing so a taken email costs no hash; the UNIQUE
        # index below still decides a race between two registrations.
        raise _email_taken()
    password_hash = hash_password(password)
    try:
        with db.atomic():
            user = User.create(id=uuid.uuid4(), password_hash=password_hash, role="user",
                               status="active", created_at=now, updated_at=now, **values)
            audit.record("user.register", "user", user.id, actor_id=user.id,
                         after=audit_view(user), request_id=request_id)
    except pw.IntegrityError:
        if User.select(User.id).where(User.email == values["email"]).exists():
            raise _email_taken() from None
        raise
    return User.get_by_id(user.id)


def _email_taken():
    return errors.Conflict("a user with this email already exists", field="email")


def get_user(user_id):
    """Return the user ``user_id``; NotFound if there is none."""
    user = User.get_or_none(User.id == user_id)
    if user is None:
        raise errors.NotFound("user not found")
    return user


def update_profile(user_id, changes, *, request_id=None, now=None):
    """Change the caller's own names, phone and country; return the user.

    ``changes`` maps field names to new values (``phone``/``country`` may be
    None to clear them). Email, role and status cannot be changed here.
    """
    unknown = [k for k in changes if k not in PROFILE_FIELDS]
    if unknown:
        raise errors.ValidationError(f"{unknown[0]} cannot be changed here", field=unknown[0])
    rules = {"first_name": lambda v: clean_name(v, "first_name"),
             "last_name": lambda v: clean_name(v, "last_name"),
             "phone": clean_phone, "country": clean_country}
    values = _collect({k: (lambda k=k: rules[k](changes[k])) for k in changes})
    with db.atomic():
        user = get_user(user_id)
        before = audit_view(user)
        changed = {k: v for k, v in values.items() if getattr(user, k) != v}
        if not changed:
            return user
        for key, value in changed.items():
            setattr(user, key, value)
        user.updated_at = now or auth.utcnow()
        user.save(only=[getattr(User, k) for k in changed] + [User.updated_at])
        audit.record("user.update", "user", user.id, actor_id=user.id,
                     before={k: before[k] for k in changed}, after=changed,
                     request_id=request_id)
    return user


def change_password(user_id, current_password, new_password, *, keep_token=None,
                    request_id=None, now=None):
    """Replace the caller's password; revoke every other token; return how many.

    A wrong current password counts as a failed login (so a stolen token is
    no way around the lockout) and is a ValidationError on
    ``current_password``; ``keep_token`` (the caller's) keeps working.
    """
    now = now or auth.utcnow()
    user = get_user(user_id)
    try:
        auth.check_password(user, current_password, request_id=request_id, now=now)
    except errors.InvalidCredentials:
        raise errors.ValidationError("current password is incorrect",
                                     field="current_password") from None
    try:
        check_password_policy(new_password, email=user.email)
    except errors.ValidationError as exc:
        raise errors.ValidationError(exc.detail, field="new_password") from None
    if new_password == current_password:
        raise errors.ValidationError("new password must differ from the current one",
                                     field="new_password")
    password_hash = hash_password(new_password)
    with db.atomic():
        (User
         .update({User.password_hash: password_hash, User.updated_at: now,
                  User.failed_logins: 0, User.locked_until: None})
         .where(User.id == user.id)
         .execute())
        revoked = auth.revoke_all(user.id, keep_token=keep_token, now=now)
        audit.record("user.password_change", "user", user.id, actor_id=user.id,
                     after={"other_tokens_revoked": revoked}, request_id=request_id)
    return revoked


# --------------------------------------------------------------------------
# Admin

# status -> the statuses an admin may move it to, per action
_TRANSITIONS = {
    "suspend": ({"active", "pending"}, "suspended"),
    "reactivate": ({"suspended"}, "active"),
}


def _set_status(action, user_id, *, actor_id, reason, request_id, now):
    allowed_from, target = _TRANSITIONS[action]
    now = now or auth.utcnow()
    # Written into the audit log for good and read by other admins: printable only.
    reason = clean_text(reason, "reason", max_length=500)
    with db.atomic():
        user = get_user(user_id)
        if action == "suspend" and str(user.id) == str(actor_id):
            raise errors.Conflict("you cannot suspend yourself")
        if user.status not in allowed_from:
            verb = "suspended" if action == "suspend" else "reactivated"
            raise errors.Conflict(f"a {user.status} user cannot be {verb}")
        # The WHERE on the old status makes a concurrent change lose cleanly.
        updated = (User
                   .update({User.status: target, User.updated_at: now})
                   .where((User.id == user.id) & (User.status == user.status))
                   .execute())
        if not updated:
            raise errors.Conflict("the user changed meanwhile; try again")
        after = {"status": target}
        if reason:
            after["reason"] = reason
        if target == "suspended":
            # authenticate() already refuses a suspended user's tokens; revoking
            # them too means a later reactivation does not revive old sessions.
            after["tokens_revoked"] = auth.revoke_all(user.id, now=now)
        audit.record(f"user.{action}", "user", user.id, actor_id=actor_id,
                     before={"status": user.status}, after=after, request_id=request_id)
        user.status, user.updated_at = target, now
    return user


def suspend(user_id, *, actor_id, reason=None, request_id=None, now=None):
    """Suspend a user (admin): they cannot log in and every token stops working."""
    return _set_status("suspend", user_id, actor_id=actor_id, reason=reason,
                       request_id=request_id, now=now)


def reactivate(user_id, *, actor_id, reason=None, request_id=None, now=None):
    """Reactivate a suspended user (admin); they log in again with their password."""
    return _set_status("reactivate", user_id, actor_id=actor_id, reason=reason,
                       request_id=request_id, now=now)


def _contains(field, text):
    # LIKE with our own escape character: a "%" or "_" typed by the admin is
    # matched literally, not as a wildcard.
    escaped = text.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return pw.NodeList((field, pw.SQL("LIKE"), f"%{escaped}%", pw.SQL("ESCAPE '!'")))


def list_users(*, secret, email=None, status=None, role=None, limit=None, cursor=None):
    """Users newest first, filtered; return a ``cursors.Page``.

    ``email`` matches any part of the address, ignoring case.
    """
    query = User.select()
    if email:
        query = query.where(_contains(User.email, auth.normalise_email(email)))
    if status is not None:
        if status not in USER_STATUSES:
            raise errors.ValidationError(f"status must be one of {', '.join(USER_STATUSES)}",
                                         field="status")
        query = query.where(User.status == status)
    if role is not None:
        if role not in USER_ROLES:
            raise errors.ValidationError(f"role must be one of {', '.join(USER_ROLES)}",
                                         field="role")
        query = query.where(User.role == role)
    return page_query(query, User, secret=secret, scope="admin:users",
                      filters={"email": email, "status": status, "role": role},
                      limit=limit, cursor=cursor)
