"""/api/v1/users/me: my profile, its changes and my password."""

import json

import pytest
from helpers import API, bearer, login, login_token

from hoardrun.db import db
from hoardrun.models import AuditLog, User

ME = f"{API}/users/me"
NEW_PASSWORD = "Copper-Kettle-58"


def test_me_is_always_my_own_profile_without_secrets(client, make_user):
    jane = make_user(via_api=True, first_name="Jane")
    john = make_user(first_name="John")

    mine = client.simulate_get(ME, headers=jane.headers)
    his = client.simulate_get(ME, headers=john.headers)

    assert mine.status_code == his.status_code == 200
    assert (mine.json["id"], mine.json["first_name"]) == (str(jane.id), "Jane")
    assert (his.json["id"], his.json["first_name"]) == (str(john.id), "John")
    assert mine.json == jane.profile | {"last_login_at": mine.json["last_login_at"],
                                        "updated_at": mine.json["updated_at"]}
    assert not {"password", "password_hash", "failed_logins"} & set(mine.json)


def test_patch_me_changes_names_phone_and_country_and_audits_only_the_change(client,
                                                                            make_user):
    jane = make_user(phone="+14155550123")

    result = client.simulate_patch(ME, headers={**jane.headers, "X-Request-ID": "patch-1"},
                                   json={"first_name": " Janet ", "phone": None,
                                         "country": "de"})

    assert result.status_code == 200, result.text
    assert (result.json["first_name"], result.json["phone"], result.json["country"]) == (
        "Janet", None, "DE")
    assert result.json["last_name"] == "Doe"
    assert client.simulate_get(ME, headers=jane.headers).json == result.json
    [row] = AuditLog.select().where(AuditLog.action == "user.update")
    assert (row.actor_id, row.request_id) == (jane.id, "patch-1")
    assert json.loads(row.before) == {"first_name": "Jane", "phone": "+14155550123",
                                      "country": None}
    assert json.loads(row.after) == {"first_name": "Janet", "phone": None, "country": "DE"}


@pytest.mark.parametrize("body, bad_field", [
    ({"email": "not-an-email"}, "email"),
    ({"email": None}, "email"),
    ({"role": "admin"}, "role"),
    ({"status": "active"}, "status"),
    ({"phone": "12345"}, "phone"),
    ({"country": "ZZ"}, "country"),
    ({"first_name": ""}, "first_name"),
    ({"last_name": None}, "last_name"),
])
def test_patch_me_refuses_other_fields_and_bad_values_with_422(client, make_user, body,
                                                              bad_field):
    jane = make_user()

    result = client.simulate_patch(ME, headers=jane.headers, json=body)

    assert result.status_code == 422, result.text
    assert bad_field in {e["field"] for e in result.json["errors"]}
    user = User.get_by_id(jane.id)
    assert (user.email, user.role, user.last_name) == (jane.email, "user", "Doe")
    assert AuditLog.select().where(AuditLog.action == "user.update").count() == 0


def test_password_change_revokes_my_other_tokens_and_keeps_this_one(client, make_user):
    jane = make_user(via_api=True)
    laptop = login_token(client, jane.email)

    result = client.simulate_post(f"{ME}/password", headers=jane.headers,
                                  json={"current_password": jane.password,
                                        "new_password": NEW_PASSWORD})

    assert result.status_code == 204, result.text
    assert client.simulate_get(ME, headers=jane.headers).status_code == 200
    assert client.simulate_get(ME, headers=bearer(laptop)).status_code == 401
    assert login(client, jane.email, jane.password).status_code == 401
    assert login(client, jane.email, NEW_PASSWORD).status_code == 200

    users_table = repr(db.execute_sql("SELECT * FROM users").fetchall())
    assert NEW_PASSWORD not in users_table and jane.password not in users_table
    [row] = AuditLog.select().where(AuditLog.action == "user.password_change")
    assert row.actor_id == jane.id
    assert json.loads(row.after) == {"other_tokens_revoked": 1}
    audit_text = repr(db.execute_sql("SELECT * FROM audit_log").fetchall())
    assert NEW_PASSWORD not in audit_text and jane.password not in audit_text


@pytest.mark.parametrize("current, new, bad_field", [
    ("Wrong-Password-1", NEW_PASSWORD, "current_password"),
    (None, "short1!", "new_password"),
    (None, "password123", "new_password"),
    (None, None, "new_password"),  # the same as the current one
])
def test_password_change_refuses_a_wrong_current_or_weak_new_password(client, make_user,
                                                                     current, new,
                                                                     bad_field):
    jane = make_user()
    laptop = login_token(client, jane.email)

    result = client.simulate_post(f"{ME}/password", headers=jane.headers,
                                  json={"current_password": current or jane.password,
                                        "new_password": new or jane.password})

    assert result.status_code == 422, result.text
    assert result.json["errors"][0]["field"] == bad_field
    assert client.simulate_get(ME, headers=bearer(laptop)).status_code == 200
    assert login(client, jane.email, jane.password).status_code == 200


def test_wrong_current_passwords_count_towards_the_login_lockout(client, make_user):
    jane = make_user()
    wrong = {"current_password": "Wrong-Password-1", "new_password": NEW_PASSWORD}

    answers = [client.simulate_post(f"{ME}/password", headers=jane.headers,
                                    json=wrong).status_code for _ in range(6)]

    assert answers == [422] * 5 + [429]
    assert login(client, jane.email, jane.password).status_code == 429
