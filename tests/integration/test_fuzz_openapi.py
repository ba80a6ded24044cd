"""Fuzzing every documented operation with schemathesis, on a real waitress server.

schemathesis reads ``/api/openapi.json`` from the running server and, for
each operation, generates requests from its declared schemas: valid ones
(positive) and ones that break the schema on purpose (negative: wrong types,
missing fields, values out of range). Every answer must

* not be a server error (``not_a_server_error``: no 5xx, ever);
* match the schema documented for its status (``response_schema_conformance``);
* carry the media type documented for its status (``content_type_conformance``):
  success bodies ``application/json``, every error ``application/problem+json``.

The requests are authenticated as a real user who has funded accounts in two
currencies, a transfer, a P2P payment, a card with a payment and a holding.
Each operation with ids in its path is fuzzed twice in positive mode: once
with generated ids (almost always 404) and once with the user's own real
ids, so the generated bodies and queries reach the code behind the lookup.
Admin operations are sent with an admin's token and aimed at a separate
"victim" user, so the fuzzer can suspend, freeze and reverse without
locking itself out; ``logout`` gets a fresh token for every request.

Generation is bounded and repeatable: ``FUZZ_EXAMPLES`` (default 25) examples
per operation and mode, ``derandomize=True`` (the same cases on every run, so
CI is deterministic), no deadline and no example database on disk. Set
``HOARDRUN_FUZZ_EXAMPLES`` to fuzz deeper locally.
"""

import os
import re
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from money_helpers import API, ok, open_account
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance,
)

import helpers
from hoardrun import auth, investments, ledger
from tests.integration.conftest import LiveServer

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = int(os.environ.get("HOARDRUN_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
REQUEST_TIMEOUT = 30  # seconds; a hung request fails the run instead of stalling it
# Operations that end what they act on run last, so the others still find a
# live card, open accounts and an active victim.
LAST = ("/cancel", "/close", "/suspend", "/logout", "/password")
_PATH_PARAM = re.compile(r"{(\w+)}")


class World:
    """The user the fuzzer acts as, an admin, a victim, and their real ids."""

    def __init__(self, client):
        self.user = helpers.make_user(client, first_name="Fuzz", last_name="Tester")
        self.admin = helpers.make_user(client, role="admin")
        self.victim = helpers.make_user(client, first_name="Victor", last_name="Tim")
        investments.load_default_prices()

        usd = open_account(client, self.user, "USD", "Everyday")
        savings = open_account(client, self.user, "USD", "Savings", type="savings")
        open_account(client, self.user, "EUR", "Euro")
        brokerage = open_account(client, self.user, "USD", "Brokerage", type="investment")
        victim_usd = open_account(client, self.victim, "USD", "Victim")
        for account in (usd, savings, brokerage):
            ledger.deposit(account["id"], 500_000)
        victim_entry = ledger.deposit(victim_usd["id"], 100_000).credit.entry_id

        post = lambda path, body: ok(client.simulate_post(  # noqa: E731
            API + path, headers=self.user.headers, json=body), 201)
        transfer = post("/transfers", {"from_account_id": usd["id"],
                                       "to_account_id": savings["id"], "amount": "10.00"})
        payment = post("/p2p", {"recipient_email": self.victim.email, "amount": "5.00"})
        card = post("/cards", {"account_id": usd["id"], "type": "debit",
                               "cardholder_name": "Fuzz Tester"})
        card_payment = post(f"/cards/{card['id']}/payments", {
            "merchant_name": "Corner Shop", "merchant_category": "5411", "amount": "20.00",
            "currency": "USD", "channel": "chip"})
        authorization = post(f"/cards/{card['id']}/authorizations", {
            "merchant_name": "Grand Hotel", "merchant_category": "7011", "amount": "1.00",
            "currency": "USD", "channel": "chip"})
        holding = post("/investments/orders", {"account_id": brokerage["id"], "symbol": "AAPL",
                                               "side": "buy", "quantity": "2"})
        # Path parameters by name; {payment_id} means a P2P payment under
        # /p2p and a card payment under /cards.
        self.ids = {
            "account_id": usd["id"], "transfer_id": transfer["id"], "payment_id": payment["id"],
            "transaction_id": transfer_entry(client, self.user, usd["id"]),
            "card_id": card["id"], "holding_id": holding["holding_id"], "symbol": "AAPL",
            "authorization_id": authorization["id"],
        }
        self.card_ids = {**self.ids, "payment_id": card_payment["id"]}
        self.admin_ids = {"user_id": str(self.victim.id), "account_id": victim_usd["id"],
                          "entry_id": str(victim_entry), "symbol": "AAPL"}

    def real_ids(self, operation):
        """The real path parameters for ``operation`` (admin ones aimed at the victim)."""
        names = _PATH_PARAM.findall(operation.path)
        if operation.path.startswith(f"{API}/admin/"):
            table = self.admin_ids
        elif operation.path.startswith(f"{API}/cards/"):
            table = self.card_ids
        else:
            table = self.ids
        return {name: table[name] for name in names}

    def headers(self, operation):
        """The Authorization header this operation is sent with."""
        if operation.path.startswith(f"{API}/admin/"):
            return dict(self.admin.headers)
        if operation.path.endswith("/auth/logout"):
            # Each logout revokes the token it carries: give it one to spend.
            return helpers.bearer(auth.issue_token(self.user.id)[0])
        return dict(self.user.headers)


def transfer_entry(client, person, account_id):
    """The id of the newest entry on ``account_id`` (the transfer just made)."""
    body = ok(client.simulate_get(f"{API}/accounts/{account_id}/transactions",
                                  headers=person.headers, params={"limit": 1}), 200)
    return body["items"][0]["id"]


def fuzz(operation, strategy, server_url, session, world, outcome):
    """Run ``FUZZ_EXAMPLES`` cases of ``strategy``; record statuses and failures."""

    @hypothesis_settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(HealthCheck),
                         # No shrinking: every failure is recorded with its
                         # curl line below, and the run stays bounded.
                         phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=server_url, session=session,
                             headers=world.headers(operation), timeout=REQUEST_TIMEOUT)
        outcome["statuses"][response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as failure:  # names every check that failed
            outcome["failures"].append(str(failure))

    try:
        run()
    except Unsatisfiable:
        # Negative mode on an operation with no inputs: nothing to break.
        outcome["unsatisfiable"] = True


@pytest.fixture
def served(app, settings):
    """The app under waitress; yields its base URL."""
    with LiveServer(app, settings, threads=4) as server:
        yield server.url


def test_every_documented_operation_survives_fuzzing(client, served):
    """Generated valid and invalid requests to every operation: no 5xx, answers as documented."""
    world = World(client)
    schema = schemathesis.openapi.from_url(f"{served}/api/openapi.json", timeout=REQUEST_TIMEOUT)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda op: op.label.endswith(LAST))
    assert len(operations) > 40, [op.label for op in operations]

    report = {}
    with requests.Session() as session:
        for operation in operations:
            runs = [("positive", operation.as_strategy(GenerationMode.POSITIVE)),
                    ("negative", operation.as_strategy(GenerationMode.NEGATIVE))]
            real = world.real_ids(operation)
            if real:
                runs.append(("positive, real ids", operation.as_strategy(
                    GenerationMode.POSITIVE, path_parameters=real)))
            for mode, strategy in runs:
                outcome = report[f"{operation.label} [{mode}]"] = {
                    "statuses": Counter(), "failures": [], "unsatisfiable": False}
                fuzz(operation, strategy, served, session, world, outcome)

    failures = {label: o["failures"] for label, o in report.items() if o["failures"]}
    assert not failures, "\n\n".join(
        f"{label}: {len(found)} failing case(s); the first:\n{found[0]}"
        for label, found in failures.items())
    # The run really exercised the API: every operation was called, and the
    # real ids reached past the lookups (some 2xx where generated ids get 404).
    for label, outcome in report.items():
        if not outcome["unsatisfiable"]:
            assert sum(outcome["statuses"].values()) > 0, label
    reached = {label for label, o in report.items()
               if "real ids" in label and any(200 <= s < 300 for s in o["statuses"])}
    assert len(reached) >= 10, sorted(reached)
