"""One address, one user: equivalent spellings of an email are the same user everywhere.

NFC and NFD spellings, fullwidth letters, any letter case and a trailing
dot on the domain name one mailbox; the API stores one normalised spelling
(NFKC, case-folded, no trailing dot) and finds the user by any of them:
register, login, P2P by email, the admin user search. A local part that
mixes look-alike scripts is refused.
"""

import unicodedata
import uuid

import pytest
from helpers import API, PASSWORD, login, register
from money_helpers import deposit, ok, open_account, post_money

from hoardrun.models import User

PROBLEM = "https://hoardrun.dev/problems/"


def spellings(tag):
    """Equivalent spellings of one address with an accented letter: (stored, others)."""
    nfc = unicodedata.normalize("NFC", f"josé.{tag}@example.com")
    nfd = unicodedata.normalize("NFD", nfc)
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in nfc)
    assert len({nfc, nfd, fullwidth}) == 3  # really three different strings
    return nfc, [nfd, fullwidth, nfc.upper(), nfc + ".", f" {nfd.upper()}. "]


@pytest.fixture
def tag():
    # Digits only: hex letters would be Latin letters in a Cyrillic or Greek name.
    return str(uuid.uuid4().int)[:10]


def test_register_stores_one_spelling_and_refuses_every_equivalent_one(client, tag):
    stored, others = spellings(tag)
    created = register(client, unicodedata.normalize("NFD", stored).upper() + ".")
    assert created.status_code == 201, created.text
    assert created.json["email"] == stored
    for other in [stored, *others]:
        again = register(client, other)
        assert again.status_code == 409, (other, again.text)
        assert again.json["type"] == PROBLEM + "conflict"
    assert User.select().where(User.email.contains(tag)).count() == 1


@pytest.mark.parametrize("form", ["nfd", "fullwidth", "upper", "trailing-dot", "all"])
def test_login_works_with_any_equivalent_spelling(client, tag, form):
    stored, others = spellings(tag)
    assert register(client, stored).status_code == 201
    spelled = dict(zip(["nfd", "fullwidth", "upper", "trailing-dot", "all"], others))[form]
    result = login(client, spelled)
    assert result.status_code == 200, result.text


def test_a_fullwidth_or_dotted_spelling_is_not_a_second_user_to_lock_out(client, tag):
    """Wrong passwords under every spelling count against the one user."""
    stored, others = spellings(tag)
    assert register(client, stored).status_code == 201
    for spelled in (others * 2)[:5]:
        assert login(client, spelled, "Wrong-password-1").status_code == 401
    assert login(client, stored).status_code == 429


def test_p2p_by_email_finds_the_user_under_any_spelling(client, make_user, tag):
    stored, others = spellings(tag)
    payee = make_user(via_api=True, email=stored)
    theirs = open_account(client, payee)
    payer = make_user()
    mine = open_account(client, payer)
    deposit(client, payer, mine["id"], "10.00")
    for spelled in others:
        body = ok(post_money(client, payer, "/p2p",
                             {"recipient_email": spelled, "amount": "1.00"}), 201)
        assert body["counterparty"]["user_id"] == str(payee.id)
    balance = ok(client.simulate_get(f"{API}/accounts/{theirs['id']}",
                                     headers=payee.headers), 200)["balance"]
    assert balance == f"{len(others)}.00"


def test_the_admin_search_finds_the_user_by_a_fullwidth_or_decomposed_spelling(client,
                                                                              make_user, tag):
    stored, others = spellings(tag)
    created = register(client, stored)
    admin = make_user(role="admin")
    for query in (others[0], others[1], others[2].rstrip(".")):
        items = ok(client.simulate_get(f"{API}/admin/users", headers=admin.headers,
                                       params={"email": query}), 200)["items"]
        assert [u["id"] for u in items] == [created.json["id"]], query


def test_changing_the_email_to_another_spelling_of_a_taken_address_is_refused(client, tag):
    """PATCH /users/me normalises like register: another user's address, spelt otherwise, is 409."""
    stored, others = spellings(tag)
    assert register(client, stored).status_code == 201
    mover = f"mover.{tag}@example.com"
    assert register(client, mover).status_code == 201
    token = login(client, mover).json["token"]
    for other in others:
        result = client.simulate_patch(f"{API}/users/me", json={"email": other},
                                       headers={"Authorization": f"Bearer {token}"})
        assert result.status_code == 409, (other, result.text)
    assert User.get(User.email == mover).pending_email is None


@pytest.mark.parametrize("email", [
    "p\u0430ypal-{tag}@example.com",       # Cyrillic а among Latin letters
    "j\u043ehn-{tag}@example.com",         # Cyrillic о
    "jane\u03bf-{tag}@example.com",        # Greek omicron
    "\u0455cott-{tag}@example.com",        # Cyrillic ѕ (dze)
    "bob-{tag}@\u0435x.com",               # Cyrillic е in the domain (found by attacking)
    "bob-{tag}@ex\u0430mple.com",          # Cyrillic а inside a Latin label
])
def test_a_local_part_mixing_look_alike_scripts_is_refused_with_422(client, tag, email):
    result = register(client, email.format(tag=tag))
    assert result.status_code == 422, result.text
    assert result.json["type"] == PROBLEM + "validation-error"
    assert "email" in {e["field"] for e in result.json["errors"]}
    assert "script" in result.json["detail"]
    assert not User.select().where(User.email.contains(tag)).exists()


@pytest.mark.parametrize("email", ["bob-{tag}@ex..com", '"bob-{tag}"@example.com',
                                   "bob-{tag}@[127.0.0.1]", "bob-{tag}@.example.com"])
def test_addresses_no_person_types_are_refused(client, tag, email):
    """Found by attacking the API: empty labels, quoted names and address literals."""
    result = register(client, email.format(tag=tag))
    assert result.status_code == 422, result.text
    assert "email" in {e["field"] for e in result.json["errors"]}
    assert not User.select().where(User.email.contains(tag)).exists()


@pytest.mark.parametrize("email", ["иван-{tag}@example.com", "αλέξης-{tag}@example.gr",
                                   "山田たろう{tag}@example.jp", "jane-{tag}@пример.рф"])
def test_one_script_addresses_in_any_script_are_welcome(client, tag, email):
    result = register(client, email.format(tag=tag))
    assert result.status_code == 201, result.text
    assert login(client, email.format(tag=tag), PASSWORD).status_code == 200
