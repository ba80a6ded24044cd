"""Driving accounts and money through the HTTP API in tests (accounts, money, history).

Each helper makes one real request through falcon's test client and asserts
the status it expects, so a test reads as the user's story::

    acc = open_account(client, jane)                 # 201, returns the body
    deposit(client, jane, acc["id"], "100.00")       # 201, returns the entry
"""

import uuid

from hoardrun.models import AuditLog

API = "/api/v1"
PROBLEM_BASE = "https://hoardrun.dev/problems/"


def ok(result, status):
    assert result.status_code == status, (result.status_code, result.text)
    return result.json


def problem(result, status, code):
    """Assert ``result`` is a problem+json of ``status`` and ``code``; return its body."""
    assert result.status_code == status, (result.status_code, result.text)
    assert result.headers["content-type"].startswith("application/problem+json")
    assert result.json["type"] == PROBLEM_BASE + code, result.json
    return result.json


def field_names(body):
    return {e["field"] for e in body.get("errors") or ()}


def open_account(client, person, currency="USD", name="Everyday", type="checking"):
    result = client.simulate_post(f"{API}/accounts", headers=person.headers,
                                  json={"type": type, "currency": currency, "name": name})
    return ok(result, 201)


def get_account(client, person, account_id):
    return ok(client.simulate_get(f"{API}/accounts/{account_id}", headers=person.headers), 200)


def post_money(client, person, path, body, *, key=None, headers=None):
    """POST a money movement; returns the raw result (status not asserted)."""
    extra = dict(person.headers)
    if key is not None:
        extra["Idempotency-Key"] = key
    extra.update(headers or {})
    return client.simulate_post(f"{API}{path}", headers=extra, json=body)


def deposit(client, person, account_id, amount, description=None, **kw):
    return ok(post_money(client, person, f"/accounts/{account_id}/deposits",
                         {"amount": amount, "description": description}, **kw), 201)


def withdraw(client, person, account_id, amount, **kw):
    return ok(post_money(client, person, f"/accounts/{account_id}/withdrawals",
                         {"amount": amount}, **kw), 201)


def transfer(client, person, from_id, to_id, amount, description=None, **kw):
    return ok(post_money(client, person, "/transfers",
                         {"from_account_id": from_id, "to_account_id": to_id,
                          "amount": amount, "description": description}, **kw), 201)


def pay(client, person, recipient, amount, note=None, **kw):
    body = {"recipient_email": recipient.email, "amount": amount, "note": note}
    return ok(post_money(client, person, "/p2p", body, **kw), 201)


def walk(client, person, url, params=None):
    """Every item of a cursor-paginated list, page by page (asserting each page is 200)."""
    params = dict(params or {})
    items, pages = [], 0
    while True:
        body = ok(client.simulate_get(url, headers=person.headers, params=params), 200)
        items.extend(body["items"])
        pages += 1
        if body["next_cursor"] is None:
            return items, pages
        params["cursor"] = body["next_cursor"]


def audit_rows(action, entity_id=None):
    query = AuditLog.select().where(AuditLog.action == action)
    if entity_id is not None:
        query = query.where(AuditLog.entity_id == str(entity_id))
    return list(query.order_by(AuditLog.created_at))


def random_id():
    return str(uuid.uuid4())
