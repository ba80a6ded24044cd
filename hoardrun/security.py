"""Passwords, bearer tokens and card-number encryption: the primitives only.

Nothing here touches the database or logs: the token and card tables are
written by domain modules that call these functions. Nothing here ever puts
a password, token, card number or key into an exception message or a repr.
"""

import hashlib
import hmac
import secrets
import unicodedata

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import ConfigError, DecryptionError, ValidationError

# --------------------------------------------------------------------------
# Passwords

# OWASP's argon2id minimum (m=19 MiB, t=2, p=1). Measured on the 2-core
# target machine: ~19-20 ms of CPU per hash or verify (64 MiB/t=3 took
# ~140 ms). p=1 because waitress already runs requests in parallel threads
# (argon2-cffi releases the GIL): more lanes per hash would only take a core
# from another request. 19 MiB per concurrent login keeps a burst of logins
# well inside memory. Raising these later is safe: needs_rehash() flags old
# hashes and the login path rehashes them.
PASSWORD_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1,
                                 hash_len=32, salt_len=16, type=Type.ID)

PASSWORD_MIN_LENGTH = 10
PASSWORD_MAX_LENGTH = 128

# Very common passwords long enough to pass the other rules (lower case).
# A small list on purpose: the length and composition rules do most of the work.
COMMON_PASSWORDS = frozenset("""
password123 password1234 password12 password1! passw0rd123 p@ssw0rd123 p@ssword123
qwerty1234 qwerty12345 qwerty123456 qwertyuiop1 1q2w3e4r5t 1qaz2wsx3edc q1w2e3r4t5
a1b2c3d4e5 abc1234567 abcd123456 abcdef1234 iloveyou12 iloveyou123 letmein123
welcome123 welcome1234 admin12345 administrator1 changeme123 football123 baseball123
monkey12345 dragon12345 sunshine123 princess123 trustno1234 superman123 starwars123
hoardrun123 hoardrun2024 hoardrun2025 hoardrun2026
""".split())


def _normalise(plain):
    # NFKC so the same password typed on different keyboards/OSes (composed vs
    # decomposed accents, full-width digits) hashes the same (NIST 800-63B).
    return unicodedata.normalize("NFKC", plain)


def hash_password(plain):
    """Return the argon2id hash of ``plain`` (a self-describing ``$argon2id$…`` string)."""
    return PASSWORD_HASHER.hash(_normalise(plain))


def verify_password(hash, plain):
    """Return True if ``plain`` matches ``hash``; False on mismatch or a bad hash, never raises."""
    if not isinstance(hash, str) or not isinstance(plain, str):
        return False
    try:
        return PASSWORD_HASHER.verify(hash, _normalise(plain))
    except (VerificationError, InvalidHashError, ValueError):
        # VerificationError covers mismatches; ValueError a non-ASCII "hash".
        return False


def needs_rehash(hash):
    """Return True if ``hash`` was not made with today's parameters (rehash after login)."""
    try:
        return PASSWORD_HASHER.check_needs_rehash(hash)
    except (InvalidHashError, ValueError, TypeError, AttributeError):
        return True


# Made once at import (one ~20 ms hash) so the first unknown-email login is
# not slower than the rest.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def dummy_verify():
    """Spend the same time as a real verify; call it when the email is unknown.

    Without it a login for an unknown email answers ~20 ms sooner than one
    for a known email with a wrong password, which tells an attacker which
    emails have accounts. Always returns False.
    """
    verify_password(_DUMMY_HASH, "not-the-password")
    return False


def check_password_policy(plain, *, email=None):
    """Raise ``ValidationError(field="password")`` if ``plain`` is too weak; else return None."""
    def refuse(detail):
        return ValidationError(detail, field="password")

    if not isinstance(plain, str):
        raise refuse("password must be a string")
    plain = _normalise(plain)
    if not PASSWORD_MIN_LENGTH <= len(plain) <= PASSWORD_MAX_LENGTH:
        raise refuse(f"password must be {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} "
                     "characters long")
    if not any(c.isalpha() for c in plain) or all(c.isalpha() for c in plain):
        raise refuse("password must contain at least one letter and at least one "
                     "digit or symbol")
    lowered = plain.casefold()
    if email and "@" in email:
        local = email.rsplit("@", 1)[0].casefold()
        # "jane+bank@…" is refused for "jane+bank" and for "jane"; parts under
        # 3 characters would refuse half of all passwords, so they are ignored.
        parts = {local, local.split("+", 1)[0]}
        if any(len(p) >= 3 and p in lowered for p in parts):
            raise refuse("password must not contain your email address")
    if lowered in COMMON_PASSWORDS:
        raise refuse("password is too common; choose another")


# --------------------------------------------------------------------------
# Bearer tokens

TOKEN_PREFIX = "hr_"
# 32 random bytes -> 43 url-safe characters after the prefix.
TOKEN_LENGTH = len(TOKEN_PREFIX) + 43


def new_token():
    """Return a new opaque bearer token (``hr_`` + 256 random bits, url-safe).

    The prefix lets secret scanners and people recognise a leaked HoardRun token.
    """
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def looks_like_token(token):
    """Return True if ``token`` has our shape; lets the auth path skip the DB for garbage."""
    return (isinstance(token, str) and len(token) == TOKEN_LENGTH
            and token.startswith(TOKEN_PREFIX))


def hash_token(token):
    """Return the SHA-256 hex digest (64 chars) stored in place of ``token``.

    A fast unsalted hash is right here, unlike for passwords: the token has
    256 random bits, so nobody can guess it from its hash however fast the
    hash is, and the per-request lookup must stay cheap (a salted or slow
    hash would also make lookup by hash impossible or costly).
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------
# Card numbers

CARD_MIN_LENGTH = 12  # ISO/IEC 7812 primary account numbers: 12..19 digits
CARD_MAX_LENGTH = 19
TEST_BIN = "400000"  # a Visa test range: never a real issuer's cards


def _card_digits(number):
    """Return ``number`` without spaces or dashes, or raise without echoing it."""
    if isinstance(number, str):
        digits = number.replace(" ", "").replace("-", "")
        if (digits.isascii() and digits.isdigit()
                and CARD_MIN_LENGTH <= len(digits) <= CARD_MAX_LENGTH):
            return digits
    raise ValidationError(f"card number must be {CARD_MIN_LENGTH} to {CARD_MAX_LENGTH} digits",
                          field="number")


class CardCipher:
    """Encrypts card numbers under the first key; decrypts under any configured key.

    Key rotation: prepend a new key to HOARDRUN_CARD_ENCRYPTION_KEYS (new
    writes use it, old rows still decrypt), run ``rotate`` over every stored
    number, then drop the old key.
    """

    def __init__(self, keys):
        if isinstance(keys, str):
            keys = (keys,)
        keys = tuple(keys or ())
        if not keys:
            raise ConfigError("HOARDRUN_CARD_ENCRYPTION_KEYS is empty: at least one key is needed")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except (ValueError, TypeError):
            # Never echo a key, even a broken one.
            raise ConfigError("HOARDRUN_CARD_ENCRYPTION_KEYS is not valid: expected url-safe "
                              "base64 Fernet keys of 32 bytes") from None
        self._count = len(keys)

    @classmethod
    def from_settings(cls, settings):
        """Build the cipher from ``settings.card_keys``."""
        return cls(settings.card_keys)

    def __repr__(self):
        return f"<CardCipher keys={self._count}>"

    def encrypt(self, number):
        """Return ``number`` (digits; spaces/dashes dropped) encrypted as a text token."""
        return self._fernet.encrypt(_card_digits(number).encode("ascii")).decode("ascii")

    def decrypt(self, token):
        """Return the card number in ``token``; ``DecryptionError`` if no key opens it."""
        try:
            return self._fernet.decrypt(_token_bytes(token)).decode("ascii")
        except InvalidToken:
            raise DecryptionError(_NO_KEY) from None

    def rotate(self, token):
        """Return ``token`` re-encrypted under the first key (for key rotation)."""
        try:
            return self._fernet.rotate(_token_bytes(token)).decode("ascii")
        except InvalidToken:
            raise DecryptionError(_NO_KEY) from None


_NO_KEY = ("card number could not be decrypted: no configured key opens it (was a key "
           "dropped from HOARDRUN_CARD_ENCRYPTION_KEYS before rotation finished?)")


def _token_bytes(token):
    if isinstance(token, bytes):
        return token
    if isinstance(token, str) and token.isascii():
        return token.encode("ascii")
    raise DecryptionError(_NO_KEY)


def fingerprint(number, secret_key):
    """Return HMAC-SHA256(secret_key, number) as 64 hex chars, for UNIQUE on cards.

    Keyed, because a plain hash of a card number is easy to reverse: with a
    known BIN and the Luhn digit only ~10^9 numbers remain. NOTE: changing
    HOARDRUN_SECRET_KEY changes every fingerprint, so existing cards would
    need re-fingerprinting (decrypt, fingerprint again).
    """
    message = b"hoardrun card fingerprint v1:" + _card_digits(number).encode("ascii")
    return hmac.new(secret_key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def _luhn_sum(digits, double_first):
    """Luhn sum of ``digits`` read right to left, doubling every other digit."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if (i % 2 == 0) == double_first:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total


def luhn_check_digit(partial):
    """Return the digit (as a one-character string) that makes ``partial`` + digit Luhn-valid."""
    if not (isinstance(partial, str) and partial.isascii() and partial.isdigit()):
        raise ValidationError("card number prefix must be digits", field="number")
    # The check digit will sit right of ``partial``, so its rightmost digit is doubled.
    return str((10 - _luhn_sum(partial, double_first=True) % 10) % 10)


def is_luhn_valid(number):
    """Return True if ``number`` (a string of at least 2 digits) passes the Luhn check."""
    if not (isinstance(number, str) and number.isascii() and number.isdigit()
            and len(number) >= 2):
        return False
    return _luhn_sum(number, double_first=False) % 10 == 0


def generate_card_number(bin_prefix=TEST_BIN, length=16):
    """Return a new Luhn-valid card number: ``bin_prefix``, random digits, check digit."""
    if not (isinstance(bin_prefix, str) and bin_prefix.isascii() and bin_prefix.isdigit()):
        raise ValidationError("BIN must be digits", field="bin_prefix")
    if not (CARD_MIN_LENGTH <= length <= CARD_MAX_LENGTH and len(bin_prefix) < length - 1):
        raise ValidationError(f"card length must be {CARD_MIN_LENGTH} to {CARD_MAX_LENGTH} "
                              "and longer than the BIN plus a check digit", field="length")
    middle = "".join(str(secrets.randbelow(10)) for _ in range(length - len(bin_prefix) - 1))
    partial = bin_prefix + middle
    return partial + luhn_check_digit(partial)


def mask_card_number(number):
    """Return ``"**** **** **** 1234"``: the last four only, whatever the length.

    The fixed shape hides the number's length too, fits the 19-character
    column and satisfies the ``cards_masked_hides_number`` CHECK.
    """
    return "**** **** **** " + _card_digits(number)[-4:]
