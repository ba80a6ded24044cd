"""Card numbers: shown once, stored only encrypted, never logged; keys required and rotatable."""

import logging

import pytest

from hoardrun import accounts, cards
from hoardrun.config import load_settings, new_card_key
from hoardrun.errors import ConfigError, DecryptionError
from hoardrun.models import Card, User
from hoardrun.security import CardCipher
from tests.conftest import base_environ
from tests.integration.test_cards_api import API, open_account, pay, refund


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


# --------------------------------------------------------------------------
# The number after issue: in no response, no log line, no column


@pytest.fixture
def environ(database_url):
    """SQL echo on: every statement and its parameters go to the log."""
    return base_environ(database_url, DATABASE_ECHO="true")


def _spellings(number):
    """The number as digits, in groups of four, and with dashes."""
    groups = [number[i:i + 4] for i in range(0, len(number), 4)]
    return (number, " ".join(groups), "-".join(groups))


def _found_in(text, number):
    return any(spelling in text for spelling in _spellings(number))


def dump_database(database):
    """Every value of every column of every table, as text: ``[(table, column, text)]``."""
    out = []
    for table in database.get_tables():
        columns = [c.name for c in database.get_columns(table)]
        select = ", ".join(f'CAST("{c}" AS TEXT)' for c in columns)
        for row in database.execute_sql(f'SELECT {select} FROM "{table}"'):
            out.extend((table, column, value) for column, value in zip(columns, row)
                       if value is not None)
    return out


def test_the_full_number_leaves_only_in_the_issue_response(client, make_user, database,
                                                           settings, caplog):
    caplog.set_level(logging.DEBUG)
    jane, admin = make_user(), make_user(role="admin")
    account = open_account(client, jane, deposit="500.00")
    issued = client.simulate_post(f"{API}/cards", headers=jane.headers, json={
        "account_id": account, "type": "debit", "cardholder_name": "Jane Doe"})
    assert issued.status_code == 201
    number = issued.json["number"]
    card_id = issued.json["id"]
    url = f"{API}/cards/{card_id}"

    # Every later response about the card, its money and its audit trail.
    paid = pay(client, jane, card_id, "20.00", key="sec-pay")
    responses = [
        client.simulate_get(url, headers=jane.headers),
        client.simulate_get(f"{API}/cards", headers=jane.headers),
        client.simulate_post(f"{url}/freeze", headers=jane.headers),
        client.simulate_post(f"{url}/unfreeze", headers=jane.headers),
        client.simulate_patch(f"{url}/limits", headers=jane.headers,
                              json={"daily_limit": "100.00"}),
        client.simulate_patch(f"{url}/controls", headers=jane.headers,
                              json={"international_enabled": True}),
        paid,
        pay(client, jane, card_id, "20.00", key="sec-pay"),
        refund(client, jane, card_id, paid.json["id"], "5.00", key="sec-refund"),
        client.simulate_get(f"{API}/transactions/{paid.json['id']}", headers=jane.headers),
        client.simulate_get(f"{API}/accounts/{account}/transactions", headers=jane.headers),
        client.simulate_post(f"{url}/cancel", headers=jane.headers),
        client.simulate_get(f"{API}/admin/audit", headers=admin.headers,
                            params={"entity_type": "card"}),
    ]
    assert [r.status_code for r in responses] == [200] * 6 + [201, 201, 201] + [200] * 4
    for result in responses:
        assert not _found_in(result.text, number), result.text
    assert responses[0].json["masked_number"] == "**** **** **** " + number[-4:]

    # Logs: the SQL echo really ran (the card INSERT is there), and no line holds the number.
    lines = [record.getMessage() + (caplog.text if record.exc_info else "")
             for record in caplog.records]
    assert any("INSERT" in line and "cards" in line for line in lines)
    assert not [line for line in lines if _found_in(line, number)]
    assert not _found_in(caplog.text, number)

    # The database: every column of every table, as text.
    dump = dump_database(database)
    assert any(t == "cards" and c == "last_four" and v == number[-4:] for t, c, v in dump)
    assert [(t, c) for t, c, v in dump if _found_in(v, number)] == []
    # ... and the encrypted column is the one place it can be recovered from.
    stored = Card.get_by_id(card_id).number_encrypted
    assert CardCipher.from_settings(settings).decrypt(stored) == number


def test_rotate_keys_task_lets_the_old_key_go(environ, database, settings, uid, tmp_path):
    from tests.integration.test_database_init import run_task

    old_key, new_key = new_card_key(), new_card_key()
    user, account = _holder(uid)
    number = cards.issue_card(user.id, account.id, "debit", "Ada Lovelace",
                              settings=settings.replace(card_keys=(old_key,))).number

    # Without the key the number was written under, the task stops with one line.
    failed = run_task({**environ, "HOARDRUN_CARD_ENCRYPTION_KEYS": new_key},
                      "cards.rotate-keys", cwd=tmp_path)
    assert failed.code == 1 and "could not be decrypted" in failed.error_lines[-1]

    run = run_task({**environ, "HOARDRUN_CARD_ENCRYPTION_KEYS": f"{new_key},{old_key}"},
                   "cards.rotate-keys", cwd=tmp_path)
    assert run.code == 0, run.output
    assert "re-encrypted 1 card number(s)" in run.stdout
    # The SQL echo of the task (DATABASE_ECHO=true here) shows ciphertext only.
    assert "UPDATE" in run.output and not _found_in(run.output, number)
    stored = Card.get().number_encrypted
    assert CardCipher((new_key,)).decrypt(stored) == number
    with pytest.raises(DecryptionError):
        CardCipher((old_key,)).decrypt(stored)
