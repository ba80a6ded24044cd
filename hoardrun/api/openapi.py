"""Declared schemas: they validate requests and generate ``/api/openapi.json``.

Adding a route is one step. In the resource module, decorate each responder
with ``spec.validate`` naming its pydantic models, then ``add_route`` it in
``app.py``::

    class TransferIn(BaseModel):
        amount: Decimal
        ...

    class Transfers:
        @spec.validate(json=TransferIn, query=None,
                       resp=Response(HTTP_201=TransferOut, HTTP_404=Problem),
                       tags=["transfers"])
        def on_post(self, req, resp):
            body = req.context.json        # a validated TransferIn
            ...

Request bodies (``json=``) and query strings (``query=``, read from
``req.context.query``) are validated before the responder runs; a failure
is a 422 problem naming the fields. The document is built from these same
declarations and the app's real router, so it cannot drift: a test walks
the router and fails on any route the document lacks (an undecorated
responder is left out, ``mode="strict"``) or any path it invents.
"""

import copy
import importlib.util
import logging
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import falcon
from pydantic import BaseModel, ConfigDict, Field
from spectree import Response, SecurityScheme, SpecTree
from spectree.models import SecuritySchemeData, SecureType
from spectree.plugins.falcon_plugin import FalconPlugin

from .. import __version__
from ..errors import ValidationError
from .media import JSON, PROBLEM_JSON

log = logging.getLogger("hoardrun.api")

OPENAPI_PATH = "/api/openapi.json"
DOCS_PATH = "/api/docs"
DOCS_ASSETS_PATH = "/api/docs/assets"


class FieldError(BaseModel):
    """One offending input field."""

    field: str
    detail: str


class Problem(BaseModel):
    """An RFC 9457 problem (every error response)."""

    model_config = ConfigDict(title="Problem")

    type: str = Field(examples=["https://hoardrun.dev/problems/validation-error"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


def _field_errors(validation_error):
    out = []
    for item in validation_error.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in item.get("loc", ())) or "body"
        out.append({"field": loc, "detail": item.get("msg", "invalid")})
    return out


def _has_nul(value):
    """Whether any text in ``value`` (validated input) holds a NUL: the cheap test that
    runs on every request; ``_nul_fields`` names the fields only when one does."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, BaseModel):
        value = value.__dict__.values()
    elif isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return False
    for item in value:
        if _has_nul(item):
            return True
    return False


def _nul_fields(value, path=""):
    """Dotted names of the text fields in ``value`` (validated input) holding a NUL."""
    if isinstance(value, str):
        if "\x00" in value:
            yield path or "body"
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            shown = info.alias or name
            yield from _nul_fields(getattr(value, name), f"{path}.{shown}" if path else shown)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _nul_fields(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _nul_fields(item, f"{path}.{index}" if path else str(index))


def _before(req, resp, req_validation_error, instance, model_adapter):
    """Turn spectree's own 422 body into our problem (raised, so one renderer).

    A NUL character passes the declared schemas (it is a valid JSON and URL
    character) but is never meaningful text, and PostgreSQL refuses it in any
    string (the driver raises before the query is sent): it is refused here,
    once for every body and query string, as a 422 naming the field.
    """
    if req_validation_error is not None:
        errors = _field_errors(req_validation_error)
        fields = ", ".join(e["field"] for e in errors)
        raise ValidationError(f"Invalid input: {fields}", errors=errors)
    inputs = [getattr(req.context, part, None) for part in ("query", "json", "headers")]
    if not any(_has_nul(value) for value in inputs):
        return
    nul = [name for value in inputs for name in _nul_fields(value)]
    if nul:
        raise ValidationError(f"Invalid input: {', '.join(nul)} contains a NUL character",
                              errors=[{"field": name, "detail": "must not contain a NUL "
                                       "character"} for name in nul])


def _after(req, resp, resp_validation_error, instance, model_adapter):
    """A response that breaks its declared schema is our bug: log it, answer 500."""
    if resp_validation_error is not None:
        raise RuntimeError(f"response does not match its declared schema: "
                           f"{_field_errors(resp_validation_error)}")


_CONVERTER = re.compile(r"{(\w+)(?::[^}]*)?}")


class _Plugin(FalconPlugin):
    """spectree's Falcon plugin with the document path taken from the route as is.

    spectree 3.0.0 regex-escapes literal segments (``/api/openapi\\.json``)
    and drops a trailing slash (``/api/health/`` is its own route in falcon);
    only ``{name:converter}`` needs rewriting to ``{name}``.
    """

    def parse_path(self, route, path_parameter_descriptions):
        _, parameters = super().parse_path(route, path_parameter_descriptions)
        return _CONVERTER.sub(r"{\1}", route.uri_template), parameters

    def register_route(self, app):  # documents are built per app by ``document``
        raise NotImplementedError("use hoardrun.api.openapi.document(app)")

    def validate(self, func, query, json, form, headers, cookies, resp, *rest, **kwargs):
        # rest = (before, after, status, skip_validation, force_serialize, resource, req, resp)
        if not getattr(rest[6].context, "validate_responses", True):
            resp = None
            if not (query or json or form or headers or cookies or self.config.annotations):
                # No input model and the response trusted: spectree would only
                # run _before's NUL check over no input (a health probe's
                # whole budget is a few of these microseconds).
                return func(*rest[5:], **kwargs)
        return super().validate(func, query, json, form, headers, cookies, resp, *rest,
                                **kwargs)

    def validate_response(self, resp, resp_model, skip_validation, force_resp_serialize):
        # Checking every response against its schema costs more than the rest
        # of a history page; tests and development keep it, production (see
        # RequestContext) trusts them. Our media are plain data rendered by
        # one JSON handler, so there is nothing else to do without a model.
        if resp_model is None:
            return None
        return super().validate_response(resp, resp_model, skip_validation,
                                         force_resp_serialize)


_MODEL_NAMES = {}


def _model_name(model):
    """Component names are the model's class name; two models may not share one."""
    if get_origin(model) is list:
        return _model_name(get_args(model)[0]) + "List"
    name = model.__name__
    known = _MODEL_NAMES.setdefault(name, model)
    if known is not model and not _same_root(known, model):
        raise TypeError(f"two API models are named {name!r} ({known.__module__} and "
                        f"{model.__module__}): rename one, the OpenAPI document needs "
                        "unique schema names")
    return name


def _same_root(a, b):
    # spectree builds a fresh RootModel class for each ``list[Model]`` it meets.
    ra = getattr(a, "model_fields", {}).get("root")
    rb = getattr(b, "model_fields", {}).get("root")
    return ra is not None and rb is not None and ra.annotation == rb.annotation


#: Declare ``security=BEARER`` on an operation that needs a bearer token
#: (``hoardrun.api.auth`` enforces it; this puts it in the document).
BEARER_SCHEME = "bearerAuth"
BEARER = {BEARER_SCHEME: []}

spec = SpecTree(
    "falcon",
    security_schemes=[SecurityScheme(name=BEARER_SCHEME, data=SecuritySchemeData(
        type=SecureType.HTTP, scheme="bearer",
        description="An opaque token from POST /api/v1/auth/login."))],
    naming_strategy=_model_name,
    nested_naming_strategy=lambda parent, child: child,
    backend=_Plugin,
    title="HoardRun API",
    description="Personal-finance backend. Errors are application/problem+json (RFC 9457).",
    version=__version__,
    mode="strict",
    annotations=False,
    before=_before,
    after=_after,
    validation_error_model=Problem,
)


def document(app):
    """The OpenAPI 3.1 document for ``app``'s routes and their declared schemas."""
    # One module-level SpecTree holds the declarations (the decorators run
    # at import); a shallow copy bound to this app walks its router. The
    # model table is copied because spectree moves nested $defs out of it
    # while generating.
    tree = copy.copy(spec)
    tree.models = copy.deepcopy(spec.models)
    tree.backend = _Plugin(tree)
    tree.app = app
    doc = tree._generate_spec()  # NOTE: private, pinned by spectree==3.0.0
    _problem_responses(doc)
    if not doc.get("security"):
        doc.pop("security", None)
    return doc


def _problem_responses(doc):
    """Errors are problem+json: say so, and give every operation a default."""
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    doc["components"]["schemas"].setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}"))
    for defs_key in ("$defs",):
        for name, schema in doc["components"]["schemas"]["Problem"].pop(defs_key, {}).items():
            doc["components"]["schemas"].setdefault(name, schema)
    for operations in doc["paths"].values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            takes_input = "requestBody" in operation or any(
                p.get("in") != "path" for p in operation.get("parameters", ()))
            if not takes_input:
                # spectree adds a 422 to every validated operation; one that
                # reads no body or query string cannot fail validation.
                responses.pop("422", None)
            for code, response in responses.items():
                content = response.get("content")
                if code[:1] in "45" and content and JSON in content:
                    content[PROBLEM_JSON] = content.pop(JSON)
            responses.setdefault("default", {
                "description": "Error (RFC 9457 problem)",
                "content": {PROBLEM_JSON: {"schema": problem_ref}},
            })


class OpenAPIDocument(BaseModel):
    """An OpenAPI 3.1 document."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


class Document:
    """``/api/openapi.json``: built once, from the app it is mounted on."""

    def __init__(self):
        self._app = None
        self._body = None

    def bind(self, app):
        """Remember the app whose router the document describes."""
        self._app = app

    @spec.validate(resp=Response(HTTP_200=OpenAPIDocument), tags=["docs"],
                   skip_validation=True)
    def on_get(self, req, resp):
        """The OpenAPI 3.1 document of this API."""
        if self._body is None:
            # Built lazily, after every route is added; the bytes are the
            # same for every request, so building twice under a race is harmless.
            from .media import dumps
            self._body = dumps(document(self._app)).encode("utf-8")
        resp.content_type = JSON
        resp.data = self._body


_DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>HoardRun API</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{assets}/swagger-ui-bundle.js"></script>
  <script src="{assets}/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "{openapi}",
      dom_id: "#swagger-ui",
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout"
    }});
  </script>
</body>
</html>
"""


def swagger_ui_dir():
    """The Swagger UI 5 files shipped in the flask-swagger-ui wheel (no CDN).

    Located without importing the package (which would import Flask): only
    its static ``dist`` folder is used.
    """
    found = importlib.util.find_spec("flask_swagger_ui")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "dist"
    return path if (path / "swagger-ui-bundle.js").is_file() else None


class Docs:
    """``/api/docs``: Swagger UI over ``/api/openapi.json``, assets served locally."""

    def __init__(self):
        self._page = _DOCS_PAGE.format(assets=DOCS_ASSETS_PATH,
                                       openapi=OPENAPI_PATH).encode("utf-8")

    @spec.validate(resp=Response("HTTP_200"), tags=["docs"], skip_validation=True)
    def on_get(self, req, resp):
        """Interactive API documentation (HTML)."""
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self._page


def mount(app):
    """Add the document, the docs page and its static assets to ``app``."""
    doc = Document()
    doc.bind(app)
    app.add_route(OPENAPI_PATH, doc)
    app.add_route(DOCS_PATH, Docs())
    assets = swagger_ui_dir()
    if assets is None:
        log.warning("flask-swagger-ui is not installed: /api/docs has no assets")
    else:
        app.add_static_route(DOCS_ASSETS_PATH, str(assets))
