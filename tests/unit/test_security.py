"""Passwords, tokens and card numbers: what a user or an operator would notice."""

import re

import pytest
from hoardrun import security
from hoardrun.config import load_settings, new_card_key
from hoardrun.errors import ConfigError, DecryptionError, ValidationError
from hoardrun.security import (
    CardCipher, check_password_policy, dummy_verify, fingerprint, generate_card_number,
    hash_password, hash_token, is_luhn_valid, looks_like_token, luhn_check_digit,
    mask_card_number, needs_rehash, new_token, verify_password,
)

GOOD_PASSWORD = "correct horse 42 battery"
CARD = "4111111111111111"
SECRET = "s" * 40


# ---------------------------------------------------------------- passwords

def test_password_round_trip_and_wrong_password():
    stored = hash_password(GOOD_PASSWORD)
    assert verify_password(stored, GOOD_PASSWORD) is True
    assert verify_password(stored, GOOD_PASSWORD + "x") is False
    assert verify_password(stored, "") is False


def test_stored_hash_is_salted_argon2id_and_never_the_password():
    first, second = hash_password(GOOD_PASSWORD), hash_password(GOOD_PASSWORD)
    assert first.startswith("$argon2id$")
    assert GOOD_PASSWORD not in first
    assert first != second  # a fresh salt each time: equal passwords do not show


def test_stored_hash_uses_at_least_owasp_minimum():
    params = dict(p.split("=") for p in hash_password(GOOD_PASSWORD).split("$")[3].split(","))
    assert int(params["m"]) >= 19 * 1024 and int(params["t"]) >= 2 and int(params["p"]) >= 1


@pytest.mark.parametrize("bad_hash", [
    "", "not a hash", "$argon2id$v=19$m=19456,t=2,p=1$garbage", "$2b$12$" + "a" * 53,
    "$argon2id$ünïcode", None, 42,
])
def test_verify_with_invalid_hash_is_false_not_an_exception(bad_hash):
    assert verify_password(bad_hash, GOOD_PASSWORD) is False


def test_unicode_password_verifies_in_either_normal_form():
    composed, decomposed = "Caf\u00e9-au-lait-99", "Cafe\u0301-au-lait-99"
    assert verify_password(hash_password(composed), decomposed)


def test_needs_rehash_flags_weaker_or_broken_hashes_only():
    assert needs_rehash(hash_password(GOOD_PASSWORD)) is False
    weak = security.PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)
    old = weak.hash(GOOD_PASSWORD)
    assert verify_password(old, GOOD_PASSWORD)  # old users can still log in...
    assert needs_rehash(old) is True  # ...and get upgraded on that login
    assert needs_rehash("garbage") is True


def test_dummy_verify_is_false_and_uses_a_real_argon2id_hash():
    assert dummy_verify() is False
    # Same parameters as real hashes, so it costs the same time.
    assert security._DUMMY_HASH.startswith("$argon2id$")
    assert needs_rehash(security._DUMMY_HASH) is False


@pytest.mark.parametrize("password, email, words", [
    ("short1!", None, "10 to 128"),
    ("a1" * 64 + "b", None, "10 to 128"),
    ("1234567890123", None, "letter"),
    ("onlyletterslong", None, "digit or symbol"),
    ("              ", None, "letter"),
    ("Janedoe-2024!", "JaneDoe@example.com", "email"),
    ("xx-jane-77-xx", "jane+bank@example.com", "email"),
    ("Password123", None, "too common"),
    ("QWERTY12345", None, "too common"),
    (None, None, "string"),
])
def test_policy_refuses_weak_passwords_on_the_password_field(password, email, words):
    with pytest.raises(ValidationError) as caught:
        check_password_policy(password, email=email)
    assert caught.value.field == "password"
    assert caught.value.status == 422
    assert words in caught.value.detail
    if password:
        assert password not in caught.value.detail


@pytest.mark.parametrize("password, email", [
    ("correct horse battery", None),  # a passphrase: spaces count as symbols
    ("jo-tr0ub4dor&3x", "jo@example.com"),  # a 2-letter local part is too short to judge
    ("a" * 127 + "1", "jane@example.com"),
    ("Zebra-Lantern-73", "jane.doe@example.com"),
])
def test_policy_accepts_reasonable_passwords(password, email):
    assert check_password_policy(password, email=email) is None


# ------------------------------------------------------------------ tokens

def test_new_tokens_are_prefixed_random_and_distinct():
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert re.fullmatch(r"hr_[A-Za-z0-9_-]{43}", token)
        assert looks_like_token(token)


def test_looks_like_token_rejects_garbage_without_a_lookup():
    for junk in ["", "hr_", "Bearer x", new_token()[3:], new_token() + "x", None, b"hr_x"]:
        assert looks_like_token(junk) is False


def test_token_hash_is_64_hex_and_deterministic():
    """That no token is stored in the clear is proved on the stored rows (test_log_secrets.py)."""
    token = new_token()
    digest = hash_token(token)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert hash_token(token) == digest
    assert hash_token(new_token()) != digest
    # One character off is a different token.
    assert hash_token(token[:-1] + ("A" if token[-1] != "A" else "B")) != digest


# ------------------------------------------------------------ card cipher

def test_cipher_round_trip_and_ciphertext_hides_number():
    cipher = CardCipher((new_card_key(),))
    token = cipher.encrypt(CARD)
    assert CARD not in token and "1111" not in token
    assert cipher.decrypt(token) == CARD
    assert cipher.encrypt(CARD) != token  # random IV: equal numbers do not show


def test_cipher_normalises_spaces_and_refuses_non_numbers_without_echo():
    cipher = CardCipher((new_card_key(),))
    assert cipher.decrypt(cipher.encrypt("4111 1111 1111 1111")) == CARD
    for bad in ["4111-1111-1111-111x", "12345", "4" * 20, "", None]:
        with pytest.raises(ValidationError) as caught:
            cipher.encrypt(bad)
        assert caught.value.field == "number"
        if bad:
            assert bad not in str(caught.value)


def test_decrypt_after_prepending_a_new_key():
    old, new = new_card_key(), new_card_key()
    stored = CardCipher((old,)).encrypt(CARD)
    rotated_config = CardCipher((new, old))
    assert rotated_config.decrypt(stored) == CARD
    # New writes already use the new key.
    assert CardCipher((new,)).decrypt(rotated_config.encrypt(CARD)) == CARD


def test_rotate_moves_a_number_to_the_new_key_so_the_old_can_be_dropped():
    old, new = new_card_key(), new_card_key()
    stored = CardCipher((old,)).encrypt(CARD)
    rotated = CardCipher((new, old)).rotate(stored)
    assert CardCipher((new,)).decrypt(rotated) == CARD
    with pytest.raises(DecryptionError):
        CardCipher((old,)).decrypt(rotated)


def test_decrypt_with_wrong_key_raises_a_clear_domain_error():
    stored = CardCipher((new_card_key(),)).encrypt(CARD)
    other = CardCipher((new_card_key(),))
    for attempt in (other.decrypt, other.rotate):
        with pytest.raises(DecryptionError) as caught:
            attempt(stored)
        assert caught.value.status == 500
        assert "HOARDRUN_CARD_ENCRYPTION_KEYS" in caught.value.detail
    for garbage in ["", "not-a-token", "ünïcode", None]:
        with pytest.raises(DecryptionError):
            other.decrypt(garbage)


def test_cipher_refuses_missing_or_broken_keys_without_echoing_them():
    with pytest.raises(ConfigError):
        CardCipher(())
    broken = "this-is-not-a-fernet-key"
    with pytest.raises(ConfigError) as caught:
        CardCipher((broken,))
    assert broken not in str(caught.value)


def test_cipher_from_settings_reads_the_comma_separated_key_list():
    old, new = new_card_key(), new_card_key()
    settings = load_settings({"HOARDRUN_ENV": "test", "DATABASE_URL": "postgresql://localhost/x",
                              "HOARDRUN_SECRET_KEY": SECRET,
                              "HOARDRUN_CARD_ENCRYPTION_KEYS": f"{new},{old}"})
    cipher = CardCipher.from_settings(settings)
    assert cipher.decrypt(CardCipher((old,)).encrypt(CARD)) == CARD
    assert CardCipher((new,)).decrypt(cipher.encrypt(CARD)) == CARD


def test_cipher_repr_hides_keys():
    keys = (new_card_key(), new_card_key())
    cipher = CardCipher(keys)
    for text in (repr(cipher), str(cipher), f"{cipher!r} {cipher}"):
        for key in keys:
            assert key not in text
            assert key[:8] not in text
    assert "2" in repr(cipher)


# ------------------------------------------------------------ fingerprints

def test_fingerprint_is_keyed_64_hex_and_ignores_formatting():
    digest = fingerprint(CARD, SECRET)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert fingerprint("4111 1111 1111 1111", SECRET) == digest
    assert fingerprint(CARD, "t" * 40) != digest  # without the key it cannot be recomputed
    assert fingerprint("4111111111111129", SECRET) != digest


# --------------------------------------------------------- Luhn and masks

@pytest.mark.parametrize("number, valid", [
    ("4111111111111111", True), ("4111111111111112", False),
    ("5555555555554444", True), ("378282246310005", True), ("79927398713", True),
    ("79927398710", False), ("", False), ("4111a11111111111", False), (None, False),
])
def test_luhn_known_vectors(number, valid):
    assert is_luhn_valid(number) is valid


def test_luhn_check_digit_known_vectors():
    assert luhn_check_digit("411111111111111") == "1"
    assert luhn_check_digit("7992739871") == "3"
    assert luhn_check_digit("37828224631000") == "5"
    with pytest.raises(ValidationError):
        luhn_check_digit("41x1")


def test_generated_numbers_are_valid_16_digits_with_the_test_bin():
    numbers = [generate_card_number() for _ in range(1000)]
    for number in numbers:
        assert len(number) == 16 and number.isdigit()
        assert number.startswith("400000")
        assert is_luhn_valid(number)
    assert len(set(numbers)) > 990  # random middle digits, not a counter


def test_generate_other_bins_and_lengths():
    number = generate_card_number("510510", length=19)
    assert len(number) == 19 and number.startswith("510510") and is_luhn_valid(number)
    with pytest.raises(ValidationError):
        generate_card_number("4000000000000000", length=16)
    with pytest.raises(ValidationError):
        generate_card_number("40x0")


def _passes_db_mask_check(masked, last_four):
    """The cards_masked_hides_number CHECK from models.Card, in Python."""
    return (len(masked) <= 19
            and masked[-4:] == last_four
            and masked.strip("*0123456789 ") == ""
            and masked.count("*") >= 8)


@pytest.mark.parametrize("number", [
    CARD, "378282246310005", "6011 0009 9013 9424",
    generate_card_number(length=19), generate_card_number(length=12),
])
def test_mask_shows_last_four_only_and_passes_the_db_check(number):
    masked = mask_card_number(number)
    digits = number.replace(" ", "")
    assert masked == "**** **** **** " + digits[-4:]
    assert _passes_db_mask_check(masked, digits[-4:])
    assert digits[:6] not in masked


def test_mask_refuses_non_numbers():
    with pytest.raises(ValidationError):
        mask_card_number("1234")
