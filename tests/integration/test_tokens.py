"""Security primitives against the real schema: tokens and card fields fit their tables."""

import peewee as pw
import pytest

from hoardrun.db import db
from hoardrun.models import Account, AuthToken, Card, User
from hoardrun.security import (
    CardCipher, fingerprint, generate_card_number, hash_password, hash_token, mask_card_number,
    new_token, verify_password,
)


def _user(uid):
    return User.create(email=f"{uid()}@example.com", first_name="Jane", last_name="Doe",
                       password_hash=hash_password("Zebra-Lantern-73"))


def _card(user, account, number, settings, cipher, **fields):
    values = dict(user=user, account=account, type="debit", cardholder_name="JANE DOE",
                  number_encrypted=cipher.encrypt(number),
                  number_fingerprint=fingerprint(number, settings.secret_key),
                  last_four=number[-4:], masked_number=mask_card_number(number),
                  expiry_month=12, expiry_year=2030, daily_limit=100_000, monthly_limit=500_000)
    values.update(fields)
    return Card.create(**values)


def test_token_is_found_by_its_hash_and_never_stored(database, uid):
    user = _user(uid)
    token = new_token()
    AuthToken.create(user=user, token_hash=hash_token(token),
                     expires_at=pw.SQL("CURRENT_TIMESTAMP"))
    found = AuthToken.get(AuthToken.token_hash == hash_token(token))
    assert found.user_id == user.id
    assert token not in found.token_hash
    assert AuthToken.select().where(AuthToken.token_hash == hash_token(new_token())).count() == 0
    stored = User.get_by_id(user.id).password_hash
    assert stored.startswith("$argon2id$") and verify_password(stored, "Zebra-Lantern-73")


def test_card_fields_pass_the_checks_and_decrypt_after_a_round_trip(database, settings, uid):
    cipher = CardCipher.from_settings(settings)
    user = _user(uid)
    account = Account.create(user=user, account_number="12345678901", name="Main",
                             type="checking", currency="USD")
    number = generate_card_number()
    card = _card(user, account, number, settings, cipher)
    stored = Card.get_by_id(card.id)
    assert number not in stored.number_encrypted
    assert cipher.decrypt(stored.number_encrypted) == number
    assert stored.masked_number == "**** **** **** " + number[-4:]

    # The same number cannot be issued twice, found through the fingerprint alone.
    with pytest.raises(pw.IntegrityError), db.atomic():
        _card(user, account, number, settings, cipher)

    # The CHECK our mask passes is real: a mask that shows the number is refused.
    other = generate_card_number()
    revealing = other[:4] + " **** " + other[-4:]
    with pytest.raises(pw.IntegrityError), db.atomic():
        _card(user, account, other, settings, cipher, masked_number=revealing)
