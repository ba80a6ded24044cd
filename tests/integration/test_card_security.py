"""Card numbers: shown once, stored only encrypted, never logged; keys required and rotatable."""

import pytest

from hoardrun import accounts, cards
from hoardrun.config import load_settings, new_card_key
from hoardrun.errors import ConfigError, DecryptionError
from hoardrun.models import Card, User
from hoardrun.security import CardCipher
from tests.conftest import base_environ


def _holder(uid):
    user = User.create(email=f"{uid()}@example.com", first_name="Ada", last_name="Lovelace",
                       password_hash="not-a-real-hash")
    return user, accounts.open_account(user.id, "checking", "USD", "Main")


def test_production_refuses_to_start_without_a_card_key():
    env = base_environ("postgresql://db.example/hoardrun", HOARDRUN_ENV="production")
    env.pop("HOARDRUN_CARD_ENCRYPTION_KEYS")
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert "HOARDRUN_CARD_ENCRYPTION_KEYS" in str(caught.value)


def test_rotation_leaves_every_card_readable_with_only_the_new_key(database, settings, uid):
    old_key, new_key = new_card_key(), new_card_key()
    before = settings.replace(card_keys=(old_key,))
    user, account = _holder(uid)
    numbers = {cards.issue_card(user.id, account.id, "debit", "Ada Lovelace",
                                settings=before).number for _ in range(3)}

    # Step 1: the new key goes first, the old one stays so nothing breaks meanwhile.
    during = settings.replace(card_keys=(new_key, old_key))
    assert cards.rotate_keys(during, batch_size=2) == 3

    # Step 2: the old key is dropped; every number still decrypts, with the new key only.
    only_new, only_old = CardCipher((new_key,)), CardCipher((old_key,))
    stored = [c.number_encrypted for c in Card.select()]
    assert {only_new.decrypt(token) for token in stored} == numbers
    for token in stored:
        with pytest.raises(DecryptionError):
            only_old.decrypt(token)

    # A second run (e.g. after an interruption) is harmless.
    assert cards.rotate_keys(settings.replace(card_keys=(new_key,))) == 3
    assert {only_new.decrypt(c.number_encrypted) for c in Card.select()} == numbers


def test_rotation_without_the_old_key_fails_loudly_and_changes_nothing(database, settings, uid):
    old_key = new_card_key()
    user, account = _holder(uid)
    number = cards.issue_card(user.id, account.id, "debit", "Ada Lovelace",
                              settings=settings.replace(card_keys=(old_key,))).number
    with pytest.raises(DecryptionError):
        cards.rotate_keys(settings.replace(card_keys=(new_card_key(),)))
    assert CardCipher((old_key,)).decrypt(Card.get().number_encrypted) == number
