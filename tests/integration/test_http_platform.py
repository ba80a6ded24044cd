"""The HTTP platform as a client sees it: problems, request ids, JSON, CORS, OpenAPI."""

import http.client
import json
import re
import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import peewee as pw
import pytest
from falcon import testing
from openapi_spec_validator import validate as validate_openapi
from pydantic import BaseModel, Field
from spectree import Response

from hoardrun import db as dbm
from hoardrun import errors
from hoardrun.api import create_app
from hoardrun.api.openapi import Problem, spec
from hoardrun.config import load_settings

PROBLEM = "application/problem+json"
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "request_id"}


# -- test-only resources (mounted on the test's app, never on the real one) ---------

class EchoIn(BaseModel):
    amount: Decimal
    name: str = Field(min_length=1)


class EchoQuery(BaseModel):
    limit: int = Field(default=10, ge=1, le=100)


class EchoOut(BaseModel):
    amount: Decimal
    name: str
    limit: int


class Echo:
    """Validated body and query string, echoed back."""

    def __init__(self):
        self.calls = 0

    @spec.validate(json=EchoIn, query=EchoQuery, resp=Response(HTTP_200=EchoOut), tags=["test"])
    def on_post(self, req, resp):
        self.calls += 1
        body, query = req.context.json, req.context.query
        resp.media = {"amount": body.amount, "name": body.name, "limit": query.limit}


class Values:
    """Values the JSON handler must render: Decimal, UUID, datetimes."""

    ID = uuid.UUID("12345678-1234-5678-1234-567812345678")

    @spec.validate(resp=Response("HTTP_200"), tags=["test"])
    def on_get(self, req, resp):
        resp.media = {
            "price": Decimal("0.10"),
            "big": Decimal("12345678901234567890.123456789"),
            "id": self.ID,
            "aware": datetime(2024, 5, 6, 9, 30, tzinfo=timezone(timedelta(hours=2))),
            "naive_utc": datetime(2024, 5, 6, 7, 30, 0, 500),
        }


class Raises:
    """Raises whatever the test put in ``error``."""

    def __init__(self, error):
        self.error = error

    @spec.validate(resp=Response("HTTP_200"), tags=["test"])
    def on_get(self, req, resp):
        raise self.error


class Queries:
    """Touches the database (test-only: resources in the product never query)."""

    @spec.validate(resp=Response("HTTP_200"), tags=["test"])
    def on_get(self, req, resp):
        resp.media = {"one": dbm.db.execute_sql("SELECT 1").fetchone()[0]}


class Undeclared:
    """A responder without declared schemas."""

    def on_get(self, req, resp):
        resp.media = {}


def problem(resp, status):
    """Assert ``resp`` is an RFC 9457 problem with ``status``; return its body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == PROBLEM
    body = resp.json
    assert PROBLEM_KEYS <= set(body), body
    assert body["status"] == status
    assert re.fullmatch(r"https://hoardrun\.dev/problems/[a-z0-9-]+", body["type"])
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body


@pytest.fixture
def echo(app):
    resource = Echo()
    app.add_route("/test/echo", resource)
    return resource


class Counted:
    """No input model: in production spectree has nothing to check (a fast path)."""

    def __init__(self):
        self.calls = 0

    @spec.validate(resp=Response(HTTP_200=EchoOut), tags=["test"])
    def on_get(self, req, resp, name):
        self.calls += 1
        resp.media = {"amount": Decimal("1.50"), "name": name, "limit": 1}


def test_with_responses_trusted_input_is_still_validated_and_each_responder_runs_once(
        settings, database):
    # Production trusts responses (RequestContext); a route with no input model
    # then skips spectree entirely, and one with models must still refuse input.
    app = create_app(settings.replace(env="production"))
    echo, counted = Echo(), Counted()
    app.add_route("/test/echo", echo)
    app.add_route("/test/counted/{name}", counted)
    client = testing.TestClient(app)
    resp = client.simulate_get("/test/counted/abc")
    assert resp.status_code == 200, resp.text
    assert resp.json == {"amount": "1.50", "name": "abc", "limit": 1}
    assert counted.calls == 1
    body = problem(client.simulate_post("/test/echo", params={"limit": "1000"},
                                        json={"amount": "1", "name": "x"}), 422)
    assert [e["field"] for e in body["errors"]] == ["limit"]
    body = problem(client.simulate_post("/test/echo", params={"limit": "5"},
                                        json={"amount": "1", "name": "a\x00b"}), 422)
    assert [e["field"] for e in body["errors"]] == ["name"]
    assert echo.calls == 0
    resp = client.simulate_post("/test/echo", params={"limit": "5"},
                                json={"amount": "2.5", "name": "ok"})
    assert resp.status_code == 200 and echo.calls == 1, resp.text


# -- errors --------------------------------------------------------------------

def test_unknown_route_is_a_404_problem(client):
    body = problem(client.simulate_get("/api/nope"), 404)
    assert body["type"].endswith("/not-found")
    assert body["instance"] == "/api/nope"


def test_wrong_method_is_a_405_problem_with_allow(client):
    resp = client.simulate_delete("/api/health/liveness")
    body = problem(resp, 405)
    assert body["type"].endswith("/method-not-allowed")
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) == {"GET", "OPTIONS"}


@pytest.mark.parametrize("raw", ['{"amount": 1,', "not json", '{"amount": NaN, "name": "x"}',
                                 '{"amount": Infinity, "name": "x"}'])
def test_malformed_json_is_a_400_problem(client, echo, raw):
    resp = client.simulate_post("/test/echo", body=raw,
                                headers={"Content-Type": "application/json"})
    body = problem(resp, 400)
    assert body["type"].endswith("/malformed-request")
    assert echo.calls == 0


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_json_is_a_415_problem(client, echo, content_type):
    resp = client.simulate_post("/test/echo", body="amount=1&name=x",
                                headers={"Content-Type": content_type})
    body = problem(resp, 415)
    assert body["type"].endswith("/unsupported-media-type")
    assert echo.calls == 0


def test_a_body_over_the_limit_is_a_413_problem_before_it_is_read(environ, database):
    settings = load_settings({**environ, "HOARDRUN_MAX_BODY_BYTES": "64"})
    app = create_app(settings)
    echo = Echo()
    app.add_route("/test/echo", echo)
    client = testing.TestClient(app)
    small = json.dumps({"amount": "1.00", "name": "ok"})
    assert client.simulate_post("/test/echo", body=small,
                                headers={"Content-Type": "application/json"}).status_code == 200
    big = json.dumps({"amount": "1.00", "name": "x" * 100})
    body = problem(client.simulate_post("/test/echo", body=big,
                                        headers={"Content-Type": "application/json"}), 413)
    assert body["type"].endswith("/content-too-large")
    assert "64" in body["detail"]
    assert echo.calls == 1


def test_validation_failure_is_a_422_problem_naming_each_field(client, echo):
    resp = client.simulate_post("/test/echo", json={"amount": "twelve", "name": ""})
    body = problem(resp, 422)
    assert body["type"].endswith("/validation-error")
    assert {e["field"] for e in body["errors"]} == {"amount", "name"}
    assert all(e["detail"] for e in body["errors"])
    assert echo.calls == 0


def test_an_empty_body_is_a_422_naming_the_required_fields(client, echo):
    body = problem(client.simulate_post("/test/echo", body="",
                                        headers={"Content-Type": "application/json"}), 422)
    assert {e["field"] for e in body["errors"]} == {"amount", "name"}


def test_query_string_validation_is_a_422_problem(client, echo):
    resp = client.simulate_post("/test/echo", params={"limit": "1000"},
                                json={"amount": "1", "name": "x"})
    body = problem(resp, 422)
    assert [e["field"] for e in body["errors"]] == ["limit"]


@pytest.mark.parametrize("error, status, code", [
    (errors.NotFound("No such account"), 404, "not-found"),
    (errors.Conflict("Email already registered"), 409, "conflict"),
    (errors.InsufficientFunds("Balance too low"), 422, "insufficient-funds"),
    (errors.AmountError("Too many decimal places", field="amount"), 422, "invalid-amount"),
])
def test_domain_errors_map_by_their_own_status_and_code(app, client, error, status, code):
    app.add_route("/test/raises", Raises(error))
    body = problem(client.simulate_get("/test/raises"), status)
    assert body["type"] == f"https://hoardrun.dev/problems/{code}"
    assert body["title"] == type(error).title
    assert body["detail"] == error.detail
    if error.field:
        assert body["errors"] == [{"field": error.field, "detail": error.detail}]


@pytest.mark.parametrize("error", [
    pw.OperationalError("could not connect to server: password=hunter2 host=db"),
    errors.DatabaseUnavailable("pool exhausted after 30 s: postgresql://u:hunter2@db/x"),
])
def test_database_unavailable_is_a_503_with_retry_after(app, client, error):
    app.add_route("/test/raises", Raises(error))
    resp = client.simulate_get("/test/raises")
    body = problem(resp, 503)
    assert int(resp.headers["Retry-After"]) > 0
    assert body["type"].endswith("/database-unavailable")
    assert "hunter2" not in resp.text


def test_an_exhausted_pool_is_a_503_with_retry_after(environ, database_url):
    settings = load_settings({**environ, "DATABASE_POOL_SIZE": "1", "DATABASE_MAX_OVERFLOW": "0",
                              "DATABASE_POOL_TIMEOUT": "0.2"})
    database = dbm.init_db(settings)
    app = create_app(settings)
    app.add_route("/test/queries", Queries())
    client = testing.TestClient(app)
    held, release = threading.Event(), threading.Event()

    def hold():
        try:
            dbm.db.connect()
            held.set()
            release.wait(timeout=30)
        finally:
            dbm.release_connection()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(timeout=30)
        resp = client.simulate_get("/test/queries")
        problem(resp, 503)
        assert resp.headers["Retry-After"]
    finally:
        release.set()
        holder.join(timeout=30)
    try:
        # the pool has its connection back: the same route now works
        assert client.simulate_get("/test/queries").json == {"one": 1}
    finally:
        database.close_all()


def test_an_unexpected_error_is_a_500_with_only_the_request_id(app, client, caplog):
    app.add_route("/test/raises",
                  Raises(KeyError("SELECT card_number FROM cards WHERE password='hunter2'")))
    caplog.set_level("INFO")
    resp = client.simulate_get("/test/raises", headers={"X-Request-ID": "req-500-test"})
    body = problem(resp, 500)
    assert set(body) == PROBLEM_KEYS
    assert body["request_id"] == "req-500-test"
    for leaked in ("SELECT", "hunter2", "KeyError", "Traceback", "raises.py", 'File "'):
        assert leaked not in resp.text
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert logged and "req-500-test" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # the traceback goes to the log


def test_a_response_that_breaks_its_schema_is_a_500_not_a_leak(app, client):
    class Broken:
        @spec.validate(resp=Response(HTTP_200=EchoOut), tags=["test"])
        def on_get(self, req, resp):
            resp.media = {"amount": "1", "secret_internal_field": "x"}

    app.add_route("/test/broken", Broken())
    resp = client.simulate_get("/test/broken")
    problem(resp, 500)
    assert "secret_internal_field" not in resp.text


# -- request ids and the access log ----------------------------------------------------

def test_a_request_id_is_generated_when_none_is_given(client):
    first = client.simulate_get("/api/health/liveness").headers["X-Request-ID"]
    second = client.simulate_get("/api/health/liveness").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


def test_a_valid_request_id_is_propagated(client):
    rid = "Edge-Proxy_1.abc-" + "x" * 47  # 64 characters, the maximum
    assert client.simulate_get("/api/health/liveness",
                                headers={"X-Request-ID": rid}).headers["X-Request-ID"] == rid
    body = problem(client.simulate_get("/nowhere", headers={"X-Request-ID": rid}), 404)
    assert body["request_id"] == rid


@pytest.mark.parametrize("given", ["x" * 65, "has space", "<script>", "a\u00e9b", "semi;colon",
                                   ""])
def test_an_unsafe_request_id_is_replaced(client, given):
    resp = client.simulate_get("/api/health/liveness", headers={"X-Request-ID": given})
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])


def test_the_id_factory_is_pinnable(settings, database):
    client = testing.TestClient(create_app(settings, id_factory=lambda: "fixed-id"))
    assert client.simulate_get("/api/health/liveness").headers["X-Request-ID"] == "fixed-id"


def test_one_access_line_per_request_without_secrets(client, caplog):
    caplog.set_level("INFO", logger="hoardrun.access")
    client.simulate_get("/api/health/liveness", params={"token": "tok-SECRET-1"},
                        headers={"X-Request-ID": "log-test-1",
                                 "Authorization": "Bearer tok-SECRET-2"})
    lines = [r for r in caplog.records if r.name == "hoardrun.access"]
    assert len(lines) == 1
    record = lines[0]
    assert (record.method, record.path, record.status, record.request_id) == (
        "GET", "/api/health/liveness", 200, "log-test-1")
    assert record.duration_ms >= 0
    assert "log-test-1" in record.getMessage() and "200" in record.getMessage()
    assert "SECRET" not in caplog.text


@pytest.mark.parametrize("raw_path", [
    "/api/v1/x%0d%0aGET%20/api/v1/admin/users%20200%200.1ms%20request_id=forged",
    "/api/v1/x%0aGET%20/api/v1/admin%20200",
    "/api/v1/%1b[2J%1b[31mred%07",
    "/api/v1/%e2%80%aeevil",
])
def test_a_path_cannot_forge_access_log_lines_or_terminal_escapes(live_server, caplog, raw_path):
    """Send the encoded path over a real socket: the access line holds it escaped, one line."""
    caplog.set_level("INFO", logger="hoardrun.access")
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 404
    (record,) = [r for r in caplog.records if r.name == "hoardrun.access"]
    message = record.getMessage()
    for bad in ("\r", "\n", "\x1b", "\x07", "\u202e"):
        assert bad not in message and bad not in record.path, (bad, message)
    assert "\\x" in message or "\\u" in message or "\\r" in message or "\\n" in message


def test_a_backslash_in_a_path_is_escaped_too(live_server, caplog):
    """A literal ``\\n`` typed in the path must not look like an escaped newline."""
    caplog.set_level("INFO", logger="hoardrun.access")
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    try:
        conn.request("GET", "/api/v1/a%5Cnb")
        conn.getresponse().read()
    finally:
        conn.close()
    (record,) = [r for r in caplog.records if r.name == "hoardrun.access"]
    assert record.path == "/api/v1/a\\\\nb"


def test_errors_are_logged_with_their_status(client, caplog):
    caplog.set_level("INFO", logger="hoardrun.access")
    client.simulate_post("/api/health")
    (record,) = [r for r in caplog.records if r.name == "hoardrun.access"]
    assert record.status == 405


def test_the_connection_is_returned_even_when_the_request_fails(app, client):
    class QueriesThenFails:
        @spec.validate(resp=Response("HTTP_200"), tags=["test"])
        def on_get(self, req, resp):
            dbm.db.execute_sql("SELECT 1")
            raise errors.Conflict("after a query")

    app.add_route("/test/fails", QueriesThenFails())
    problem(client.simulate_get("/test/fails"), 409)
    info = dbm.pool_info()
    assert (info["checked_out"], info["checked_in"]) == (0, 1)


# -- JSON --------------------------------------------------------------------------

def test_amounts_round_trip_exactly_as_decimal_strings(client, echo):
    resp = client.simulate_post("/test/echo", body='{"amount": 0.1000000000000000055511, '
                                                   '"name": "x"}',
                                headers={"Content-Type": "application/json"})
    assert resp.status_code == 200
    assert resp.json["amount"] == "0.1000000000000000055511"


def test_decimal_uuid_and_datetimes_are_rendered_for_clients(app, client):
    app.add_route("/test/values", Values())
    body = client.simulate_get("/test/values").json
    assert body == {
        "price": "0.10",
        "big": "12345678901234567890.123456789",
        "id": "12345678-1234-5678-1234-567812345678",
        "aware": "2024-05-06T07:30:00Z",
        "naive_utc": "2024-05-06T07:30:00.000500Z",
    }


# -- CORS --------------------------------------------------------------------------

ORIGIN = "https://app.hoardrun.example"


@pytest.fixture
def cors_client(environ, database):
    settings = load_settings({**environ, "HOARDRUN_CORS_ORIGINS": ORIGIN})
    return testing.TestClient(create_app(settings))


def test_cors_preflight_is_answered_for_an_allowed_origin(cors_client):
    resp = cors_client.simulate_options("/api/health/readiness", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization, Content-Type"})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "GET" in resp.headers["Access-Control-Allow-Methods"]
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()


def test_cors_headers_on_a_real_request_expose_the_request_id(cors_client):
    resp = cors_client.simulate_get("/api/health/liveness", headers={"Origin": ORIGIN})
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"].lower()


def test_cors_ignores_other_origins(cors_client):
    resp = cors_client.simulate_get("/api/health/liveness",
                                    headers={"Origin": "https://evil.example"})
    assert resp.status_code == 200
    assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("origin", [ORIGIN, "https://evil.example", None])
def test_cors_answers_vary_on_origin(cors_client, origin):
    """Shared caches must not hand one origin's CORS answer (or none) to another."""
    headers = {"Origin": origin} if origin else {}
    for resp in (cors_client.simulate_get("/api/health/liveness", headers=headers),
                 cors_client.simulate_get("/api/v1/users/me", headers=headers)):
        assert "origin" in [v.strip().lower() for v in resp.headers.get("Vary", "").split(",")]


def test_a_cors_preflight_varies_on_what_it_asks_for(cors_client):
    resp = cors_client.simulate_options("/api/v1/transfers", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Content-Type"})
    vary = {v.strip().lower() for v in resp.headers["Vary"].split(",")}
    assert {"origin", "access-control-request-method",
            "access-control-request-headers"} <= vary


def test_without_configured_origins_no_cors_headers(client):
    resp = client.simulate_options("/api/health/liveness", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert resp.status_code == 200  # OPTIONS is still answered, never 405
    assert "Access-Control-Allow-Origin" not in resp.headers


# -- OpenAPI -----------------------------------------------------------------------

_CONVERTER = re.compile(r"{(\w+)(?::[^}]*)?}")


def router_operations(app):
    """Every (path, method) the app's router really serves, from its resources."""
    found = set()

    def walk(nodes):
        for node in nodes:
            if node.resource is not None:
                path = _CONVERTER.sub(r"{\1}", node.uri_template)
                for method, responder in node.method_map.items():
                    # falcon fills unsupported methods (405) and OPTIONS with
                    # plain functions; the resource's own responders are methods
                    if hasattr(responder, "__self__") and method != "OPTIONS":
                        found.add((path, method.lower()))
            walk(node.children)

    walk(app._router._roots)
    return found


def document_operations(doc):
    return {(path, method) for path, ops in doc["paths"].items() for method in ops}


def coverage_gaps(app):
    doc = testing.TestClient(app).simulate_get("/api/openapi.json").json
    served, documented = router_operations(app), document_operations(doc)
    return served - documented, documented - served


def test_openapi_document_is_valid_openapi_3_1(client):
    resp = client.simulate_get("/api/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    doc = resp.json
    assert doc["openapi"].startswith("3.1")
    validate_openapi(doc)


def test_openapi_covers_every_route_and_invents_none(app):
    missing, invented = coverage_gaps(app)
    assert not missing, f"routes the document lacks: {sorted(missing)}"
    assert not invented, f"documented paths with no route: {sorted(invented)}"
    assert ("/api/health/readiness", "get") in router_operations(app)
    assert ("/api/openapi.json", "get") in router_operations(app)


def test_the_coverage_check_catches_an_undeclared_route(app):
    app.add_route("/test/undeclared", Undeclared())
    missing, invented = coverage_gaps(app)
    assert missing == {("/test/undeclared", "get")}
    assert not invented


def test_declared_schemas_are_the_documented_ones(app, echo):
    app.add_route("/test/items/{item_id:uuid}", Values())
    doc = testing.TestClient(app).simulate_get("/api/openapi.json").json
    validate_openapi(doc)
    (item_id,) = doc["paths"]["/test/items/{item_id}"]["get"]["parameters"]
    assert (item_id["in"], item_id["schema"]["format"]) == ("path", "uuid")
    operation = doc["paths"]["/test/echo"]["post"]
    body_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert set(schema["required"]) == {"amount", "name"}
    (limit,) = [p for p in operation["parameters"] if p["in"] == "query"]
    assert limit["name"] == "limit" and limit["schema"]["maximum"] == 100
    problem_ref = operation["responses"]["422"]["content"][PROBLEM]["schema"]["$ref"]
    assert problem_ref.endswith("/Problem")
    assert set(Problem.model_fields) <= set(doc["components"]["schemas"]["Problem"]["properties"])
    # health responses carry their models; a GET without input has no 422
    readiness = doc["paths"]["/api/health/readiness"]["get"]["responses"]
    assert {"200", "503", "default"} <= set(readiness)
    assert "422" not in readiness


def test_docs_page_uses_only_local_assets(client):
    resp = client.simulate_get("/api/docs")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    page = resp.text
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {a.rsplit("/", 1)[1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in assets:
        got = client.simulate_get(asset)
        assert got.status_code == 200, asset
        assert len(got.content) > 1000, asset
    assert '"/api/openapi.json"' in page
