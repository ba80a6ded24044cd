"""/api/v1/admin: users, suspensions, account freezes, reversals and the audit log."""

import json
import uuid

import pytest
from helpers import API

from hoardrun import accounts, errors, ledger
from hoardrun.db import db
from hoardrun.models import Account, AuditLog, Transaction, User

ADMIN = f"{API}/admin"
PROBLEM = "https://hoardrun.dev/problems/"


def post(client, path, who, body=None, **headers):
    return client.simulate_post(ADMIN + path, headers={**who.headers, **headers},
                                json={} if body is None else body)


def get(client, path, who, **params):
    return client.simulate_get(ADMIN + path, headers=who.headers, params=params or None)


def pages(client, path, who, **params):
    """Follow next_cursor to the end; return every item in order."""
    items, cursor = [], None
    while True:
        result = get(client, path, who, **params, **({"cursor": cursor} if cursor else {}))
        assert result.status_code == 200, result.text
        assert len(result.json["items"]) <= params.get("limit", 50)
        items += result.json["items"]
        cursor = result.json["next_cursor"]
        if cursor is None:
            return items


def open_funded_account(user_id, minor=5_000, currency="USD"):
    account = accounts.open_account(user_id, "checking", currency, "Main")
    return account, ledger.deposit(account.id, minor)


# -- who may call -------------------------------------------------------------------

def test_admin_routes_are_403_for_a_normal_user_and_401_without_a_token(client, make_user):
    jane = make_user()
    victim = make_user()
    account, posting = open_funded_account(victim.id)
    # Real targets for the routes this module serves; any other admin route in
    # the document (other modules add theirs) is called with a random id.
    targets = {
        ("post", "/users/{user_id}/suspend"): f"/users/{victim.id}/suspend",
        ("post", "/users/{user_id}/reactivate"): f"/users/{victim.id}/reactivate",
        ("post", "/accounts/{account_id}/freeze"): f"/accounts/{account.id}/freeze",
        ("post", "/accounts/{account_id}/unfreeze"): f"/accounts/{account.id}/unfreeze",
        ("post", "/transactions/{entry_id}/reverse"):
            f"/transactions/{posting.credit.entry_id}/reverse",
    }
    document = client.simulate_get("/api/openapi.json").json
    declared = {(method, path[len(ADMIN):]) for path, ops in document["paths"].items()
                if path.startswith(ADMIN + "/") for method in ops}
    assert declared >= set(targets) | {("get", "/users"), ("get", "/users/{user_id}"),
                                       ("get", "/audit")}

    for method, template in sorted(declared):
        path = targets.get((method, template)) or "/".join(
            str(uuid.uuid4()) if part.startswith("{") else part
            for part in template.split("/"))
        body = {} if method != "get" else None
        as_user = client.simulate_request(method.upper(), ADMIN + path, headers=jane.headers,
                                          json=body)
        anonymous = client.simulate_request(method.upper(), ADMIN + path, json=body)
        assert as_user.status_code == 403, (method, path, as_user.text)
        assert as_user.json["type"] == PROBLEM + "forbidden"
        assert anonymous.status_code == 401, (method, path)

    assert User.get_by_id(victim.id).status == "active"
    assert Account.get_by_id(account.id).status == "active"
    assert Transaction.select().where(Transaction.type == "reversal").count() == 0


# -- users --------------------------------------------------------------------------

def test_admin_lists_users_newest_first_in_cursor_pages_with_filters(client, make_user,
                                                                     admin, uid):
    tag = uid()
    people = [make_user(email=f"{tag}.{i}@example.com") for i in range(4)]
    literal = make_user(email=f"a_b.{tag}@example.com")
    wildcard_bait = make_user(email=f"axb.{tag}@example.com")
    suspended = make_user(status="suspended")
    everyone = [admin, *people, literal, wildcard_bait, suspended]

    listed = pages(client, "/users", admin, limit=2)

    assert [u["id"] for u in listed] == [str(p.id) for p in reversed(everyone)]
    assert {"failed_logins", "locked_until"} <= set(listed[0])
    assert not {"password", "password_hash"} & set(listed[0])

    def ids(**params):
        return [u["id"] for u in pages(client, "/users", admin, **params)]

    assert ids(email=tag.upper()) == [str(p.id) for p in
                                      reversed([*people, literal, wildcard_bait])]
    assert ids(email=f"A_B.{tag}") == [str(literal.id)]  # "_" is no wildcard
    assert ids(status="suspended") == [str(suspended.id)]
    assert ids(role="admin") == [str(admin.id)]


@pytest.mark.parametrize("params, field, problem", [
    ({"limit": 0}, "limit", "validation-error"),
    ({"limit": 101}, "limit", "validation-error"),
    ({"status": "frozen"}, "status", "validation-error"),
    ({"cursor": "not-a-cursor"}, "cursor", "invalid-cursor"),
])
def test_admin_user_list_refuses_bad_query_parameters(client, admin, params, field, problem):
    result = get(client, "/users", admin, **params)

    assert result.status_code == 422
    assert result.json["type"] == PROBLEM + problem
    assert field in {e["field"] for e in result.json["errors"]}


def test_admin_gets_one_user_or_404(client, make_user, admin):
    jane = make_user()

    found = get(client, f"/users/{jane.id}", admin)

    assert found.status_code == 200
    assert (found.json["email"], found.json["failed_logins"]) == (jane.email, 0)
    assert get(client, f"/users/{uuid.uuid4()}", admin).status_code == 404
    assert get(client, "/users/not-a-uuid", admin).status_code == 404


def test_suspend_and_reactivate_move_the_status_once_each_and_are_audited(client, make_user,
                                                                          admin):
    jane = make_user()

    suspended = post(client, f"/users/{jane.id}/suspend", admin, {"reason": "chargebacks"},
                     **{"X-Request-ID": "suspend-1"})

    assert suspended.status_code == 200, suspended.text
    assert suspended.json["status"] == "suspended"
    [row] = AuditLog.select().where(AuditLog.action == "user.suspend")
    assert (row.actor_id, row.entity_id, row.request_id) == (admin.id, str(jane.id),
                                                            "suspend-1")
    assert json.loads(row.before) == {"status": "active"}
    assert json.loads(row.after) == {"status": "suspended", "reason": "chargebacks",
                                     "tokens_revoked": 1}
    again = post(client, f"/users/{jane.id}/suspend", admin)
    assert again.status_code == 409

    reactivated = post(client, f"/users/{jane.id}/reactivate", admin)
    assert reactivated.status_code == 200
    assert User.get_by_id(jane.id).status == "active"
    assert post(client, f"/users/{jane.id}/reactivate", admin).status_code == 409
    assert [r.action for r in AuditLog.select().where(AuditLog.entity_id == str(jane.id))
            .order_by(AuditLog.created_at)] == ["user.suspend", "user.reactivate"]


def test_suspension_refuses_self_unknown_users_and_long_reasons(client, make_user, admin):
    jane = make_user()

    assert post(client, f"/users/{admin.id}/suspend", admin).status_code == 409
    assert post(client, f"/users/{uuid.uuid4()}/suspend", admin).status_code == 404
    too_long = post(client, f"/users/{jane.id}/suspend", admin, {"reason": "x" * 501})
    assert too_long.status_code == 422
    assert too_long.json["errors"][0]["field"] == "reason"
    assert User.get_by_id(admin.id).status == User.get_by_id(jane.id).status == "active"


@pytest.mark.parametrize("text", ["a\u0007b", "pay\u202eecnatsiser", "x\u200by", "two\nlines",
                                  "tab\there"])
def test_admin_free_text_is_printable_text_only(client, make_user, admin, text):
    """Found by attacking the API: reasons and reversal descriptions took control characters.

    They stay in the append-only audit log for good, and a reversal's
    description is shown in the customer's own history.
    """
    jane = make_user()
    account = accounts.open_account(jane.id, "checking", "USD", name="Main")
    ledger.deposit(account.id, 1_000)
    entry = Transaction.get((Transaction.account == account.id)
                            & (Transaction.direction == "inbound"))
    before = AuditLog.select().count()
    for path, body, field in (
            (f"/users/{jane.id}/suspend", {"reason": text}, "reason"),
            (f"/accounts/{account.id}/freeze", {"reason": text}, "reason"),
            (f"/transactions/{entry.id}/reverse", {"description": text}, "description")):
        result = post(client, path, admin, body)
        assert result.status_code == 422, (path, result.text)
        assert result.json["errors"][0]["field"] == field
    assert AuditLog.select().count() == before
    assert User.get_by_id(jane.id).status == "active"
    assert Account.get_by_id(account.id).status == "active"


# -- accounts -----------------------------------------------------------------------

def test_a_frozen_account_moves_no_money_until_unfrozen(client, make_user, admin):
    jane = make_user()
    account, _ = open_funded_account(jane.id, 5_000)

    frozen = post(client, f"/accounts/{account.id}/freeze", admin, {"reason": "kyc"})

    assert frozen.status_code == 200, frozen.text
    assert (frozen.json["status"], frozen.json["balance"]) == ("suspended", "50.00")
    with pytest.raises(errors.AccountNotActive):
        ledger.withdraw(account.id, 100)
    assert post(client, f"/accounts/{account.id}/freeze", admin).status_code == 409

    unfrozen = post(client, f"/accounts/{account.id}/unfreeze", admin)
    assert unfrozen.status_code == 200
    assert unfrozen.json["status"] == "active"
    ledger.withdraw(account.id, 100)
    assert Account.get_by_id(account.id).balance == 4_900
    assert post(client, f"/accounts/{account.id}/unfreeze", admin).status_code == 409
    actions = [(r.action, r.actor_id) for r in AuditLog.select()
               .where(AuditLog.entity_id == str(account.id), AuditLog.action != "account.open")
               .order_by(AuditLog.created_at)]
    assert actions == [("account.freeze", admin.id), ("account.unfreeze", admin.id)]


def test_closed_settlement_and_unknown_accounts_cannot_be_frozen(client, make_user, admin):
    jane = make_user()
    account = accounts.open_account(jane.id, "savings", "USD", "Spare")
    accounts.close(jane.id, account.id)
    open_funded_account(jane.id)  # a deposit makes the USD settlement account
    settlement = Account.get(Account.type == "settlement")

    closed = post(client, f"/accounts/{account.id}/freeze", admin)

    assert closed.status_code == 409
    assert "closed" in closed.json["detail"]
    assert post(client, f"/accounts/{settlement.id}/freeze", admin).status_code == 409
    assert post(client, f"/accounts/{uuid.uuid4()}/freeze", admin).status_code == 404
    assert Account.get_by_id(account.id).status == "closed"
    assert Account.get_by_id(settlement.id).status == "active"


# -- reversals ----------------------------------------------------------------------

def test_reversal_posts_an_opposite_pair_once_and_the_books_still_balance(client, make_user,
                                                                         admin):
    jane = make_user()
    account, deposit = open_funded_account(jane.id, 1_234)

    result = post(client, f"/transactions/{deposit.credit.entry_id}/reverse", admin,
                  {"description": "deposited twice by mistake"})

    assert result.status_code == 200, result.text
    entries = result.json["entries"]
    assert {e["type"] for e in entries} == {"reversal"}
    assert {e["amount"] for e in entries} == {"12.34"}
    assert {e["reverses_id"] for e in entries} == {str(deposit.credit.entry_id),
                                                   str(deposit.debit.entry_id)}
    mine = next(e for e in entries if e["account_id"] == str(account.id))
    assert (mine["direction"], mine["balance_after"]) == ("outbound", "0.00")
    assert Account.get_by_id(account.id).balance == 0
    assert ledger.verify() == []
    [row] = AuditLog.select().where(AuditLog.action == "transaction.reverse")
    assert (row.actor_id, row.entity_id) == (admin.id, str(deposit.credit.entry_id))

    twice = post(client, f"/transactions/{deposit.debit.entry_id}/reverse", admin)
    assert twice.status_code == 422
    assert twice.json["type"] == PROBLEM + "reversal-not-allowed"
    of_reversal = post(client, f"/transactions/{entries[0]['id']}/reverse", admin)
    assert of_reversal.status_code == 422
    assert post(client, f"/transactions/{uuid.uuid4()}/reverse", admin).status_code == 404
    assert Transaction.select().where(Transaction.type == "reversal").count() == 2


# -- audit log ----------------------------------------------------------------------

def test_audit_log_pages_newest_first_and_filters_without_secrets(client, make_user, admin):
    jane = make_user(via_api=True)
    client.simulate_patch(f"{API}/users/me", headers=jane.headers, json={"first_name": "J"})
    post(client, f"/users/{jane.id}/suspend", admin)
    post(client, f"/users/{jane.id}/reactivate", admin)

    everything = pages(client, "/audit", admin, limit=2)

    assert [r["action"] for r in everything] == [
        "user.reactivate", "user.suspend", "user.update", "auth.login", "user.register"]
    assert len({r["id"] for r in everything}) == len(everything)
    stamps = [r["created_at"] for r in everything]
    assert stamps == sorted(stamps, reverse=True)
    assert all(r["request_id"] for r in everything)
    assert everything[1]["before"] == {"status": "active"}

    def actions(**params):
        return [r["action"] for r in pages(client, "/audit", admin, **params)]

    assert actions(actor_id=str(admin.id)) == ["user.reactivate", "user.suspend"]
    assert actions(action="user.update", entity_type="user",
                   entity_id=str(jane.id)) == ["user.update"]
    assert actions(entity_type="account") == []
    bad = get(client, "/audit", admin, actor_id="someone")
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "actor_id"
    audit_text = repr(db.execute_sql("SELECT * FROM audit_log").fetchall())
    assert jane.password not in audit_text and jane.token not in audit_text
    assert "argon2" not in audit_text
