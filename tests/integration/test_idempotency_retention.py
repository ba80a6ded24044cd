"""Idempotency keys are kept for HOARDRUN_IDEMPOTENCY_TTL, then are new again and pruned.

Inside the window a replay is byte for byte the first response, even after a
prune; past it the key moves money again (the lapsed row is replaced), and
``db.prune`` deletes only lapsed rows, batch by batch.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from falcon import testing
from money_helpers import get_account, ok, open_account, post_money, problem

from hoardrun import idempotency
from hoardrun.api import create_app
from hoardrun.db import db

ROOT = Path(__file__).resolve().parents[2]
DAY = 24 * 3600


@pytest.fixture
def account(client, jane):
    return open_account(client, jane)


def age_keys(seconds, key=None):
    """Make keys look first used ``seconds`` ago (all of them, or just ``key``)."""
    sql = "UPDATE idempotency_keys SET created_at = now() - make_interval(secs => %s)"
    params = [seconds]
    if key is not None:
        sql += " WHERE key = %s"
        params.append(key)
    db.execute_sql(sql, params)


def stored_keys():
    return sorted(k for (k,) in db.execute_sql("SELECT key FROM idempotency_keys"))


def pay_in(client, person, account_id, amount="10.00", key="pay-1"):
    return post_money(client, person, f"/accounts/{account_id}/deposits", {"amount": amount},
                      key=key)


def test_the_default_window_is_seven_days(settings):
    assert settings.idempotency_ttl == 7 * DAY == idempotency.DEFAULT_TTL


def test_a_replay_inside_the_window_is_byte_for_byte_even_after_a_prune(client, jane, account):
    first = pay_in(client, jane, account["id"])
    assert first.status_code == 201
    age_keys(7 * DAY - 3600)  # six days and 23 hours old: still inside the window
    assert idempotency.prune(7 * DAY) == 0
    again = pay_in(client, jane, account["id"])
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert get_account(client, jane, account["id"])["balance"] == "10.00"


def test_a_key_past_the_window_is_new_and_moves_money_again(client, jane, account):
    first = pay_in(client, jane, account["id"])
    age_keys(7 * DAY + 60)
    again = pay_in(client, jane, account["id"])
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "false"
    assert again.json["id"] != first.json["id"]
    assert get_account(client, jane, account["id"])["balance"] == "20.00"
    # The new first response is what replays now.
    third = pay_in(client, jane, account["id"])
    assert third.headers["idempotent-replayed"] == "true" and third.content == again.content
    assert stored_keys() == ["pay-1"]


def test_a_lapsed_key_may_carry_another_request(client, jane, account):
    ok(pay_in(client, jane, account["id"], amount="10.00"), 201)
    problem(pay_in(client, jane, account["id"], amount="11.00"), 422, "idempotency-key-reused")
    age_keys(7 * DAY + 60)
    result = pay_in(client, jane, account["id"], amount="11.00")
    assert result.status_code == 201 and result.headers["idempotent-replayed"] == "false"
    assert get_account(client, jane, account["id"])["balance"] == "21.00"


def test_the_window_follows_the_setting(settings, database, make_user):
    client = testing.TestClient(create_app(settings.replace(idempotency_ttl=DAY)))
    person = make_user()
    acc = open_account(client, person)
    ok(pay_in(client, person, acc["id"]), 201)
    age_keys(DAY - 60)
    assert pay_in(client, person, acc["id"]).headers["idempotent-replayed"] == "true"
    age_keys(DAY + 60)
    assert pay_in(client, person, acc["id"]).headers["idempotent-replayed"] == "false"
    assert get_account(client, person, acc["id"])["balance"] == "20.00"


def test_prune_deletes_only_lapsed_keys_in_batches(client, jane, account, monkeypatch):
    for n in range(5):
        ok(pay_in(client, jane, account["id"], key=f"old-{n}"), 201)
    age_keys(8 * DAY)
    ok(pay_in(client, jane, account["id"], key="fresh"), 201)
    statements = []
    execute = type(db.obj).execute_sql

    def counting(self, sql, *args, **kwargs):
        if "DELETE FROM idempotency_keys" in sql:
            statements.append(sql)
        return execute(self, sql, *args, **kwargs)

    monkeypatch.setattr(type(db.obj), "execute_sql", counting)
    assert idempotency.prune(7 * DAY, batch_size=2) == 5
    assert len(statements) == 3  # 2 + 2 + 1: the short batch ends the run
    monkeypatch.undo()
    assert stored_keys() == ["fresh"]
    assert pay_in(client, jane, account["id"], key="fresh").headers["idempotent-replayed"] == "true"
    # The money is untouched: pruning forgets keys, never movements.
    assert get_account(client, jane, account["id"])["balance"] == "60.00"


def test_the_prune_task_reports_what_it_deleted(client, jane, account, environ, tmp_path):
    ok(pay_in(client, jane, account["id"], key="old"), 201)
    ok(pay_in(client, jane, account["id"], key="new"), 201)
    age_keys(2 * DAY, key="old")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "HOARDRUN_"))}
    env.update(environ, HOARDRUN_IDEMPOTENCY_TTL=str(DAY))
    proc = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT),
                           "db.prune", "--batch", "10"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pruned 1 idempotency key(s) first used more than 86400s ago" in proc.stdout
    assert stored_keys() == ["new"]
    bad = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT),
                          "db.prune", "--batch", "0"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "--batch=0 is not valid: expected an integer >= 1"
