"""The app factory: wiring only.

``create_app(settings, ...)`` builds the middleware, media handlers, error
handlers and routes of a falcon WSGI app and returns it; it reads no
environment and opens no connection. ``get_app()`` is the one entry point
that does: it loads settings from the environment, binds the database and
returns ``create_app(settings)``; waitress serves that.

Adding a resource: write ``hoardrun/api/<noun>.py`` with its pydantic
models and ``@spec.validate``-decorated responders (see ``openapi.py``),
then add its routes in ``_routes`` below.
"""

import time

import falcon

from .. import __version__, embedded, replicas
from ..clock import utcnow
from ..config import load_settings
from ..db import init_db
from ..mail import Mailer
from ..health import Health
from . import accounts as accounts_routes
from . import admin as admin_routes
from . import auth as auth_routes
from . import cards as cards_routes
from . import health as health_routes
from . import holds as holds_routes
from . import investments as investments_routes
from . import media, openapi, problems
from . import metrics as metrics_routes
from . import movements as movements_routes
from . import prices as prices_routes
from . import history as history_routes
from . import users as users_routes
from .auth import Authentication
from .middleware import CORS, RequestContext, new_request_id


def create_app(settings, *, clock=None, monotonic=None, id_factory=None, mailer=None):
    """Build the falcon WSGI app for ``settings``.

    ``clock`` (aware UTC datetimes), ``monotonic`` (seconds) and
    ``id_factory`` (request ids) are parameters so tests can pin them;
    ``mailer`` defaults to ``Mailer.from_settings(settings)`` (SMTP, or the
    development outbox). The database must already be bound
    (``hoardrun.db.init_db``).
    """
    clock = clock or utcnow
    mailer = mailer or Mailer.from_settings(settings)
    monotonic = monotonic or time.monotonic
    middleware = [RequestContext(max_body_bytes=settings.max_body_bytes,
                                 id_factory=id_factory or new_request_id,
                                 # Responses are checked against their declared
                                 # schemas everywhere but production (CPU).
                                 validate_responses=not settings.is_production,
                                 idempotency_ttl=settings.idempotency_ttl),
                  # After RequestContext, so a 401/403 carries the request id.
                  Authentication(clock=clock)]
    if settings.cors_origins:
        # Falcon's CORS: answers preflight OPTIONS and adds the allow headers
        # for listed origins only; X-Request-ID is exposed to browser code.
        origins = "*" if "*" in settings.cors_origins else list(settings.cors_origins)
        middleware.insert(0, CORS(allow_origins=origins,
                                  expose_headers=["X-Request-ID", "Retry-After"]))
    metrics, observer = metrics_routes.install(settings)
    if observer is not None:
        middleware.insert(0, observer)  # outermost: times and counts everything
    # Read-only routes may read from these (api/middleware.py replica_reads).
    replicas.configure(settings, monotonic=monotonic)
    app = falcon.App(middleware=middleware)
    media.configure(app)
    problems.install(app)
    _routes(app, settings, Health(settings, clock=clock, monotonic=monotonic), clock, mailer)
    metrics_routes.mount(app, settings, metrics)
    return app


def _routes(app, settings, health, clock, mailer):
    health_routes.mount(app, health, settings, __version__)
    openapi.mount(app)
    auth_routes.mount(app, settings, mailer=mailer, clock=clock)
    users_routes.mount(app, settings=settings, mailer=mailer, clock=clock)
    admin_routes.mount(app, settings, clock=clock)
    accounts_routes.mount(app, clock=clock)
    movements_routes.mount(app, settings)
    history_routes.mount(app, settings, clock=clock)
    cards_routes.mount(app, settings, clock=clock)
    holds_routes.mount(app, clock=clock)
    investments_routes.mount(app, settings)
    prices_routes.mount(app, settings)


def get_app(environ=None, *, settings=None):
    """The app for the current environment (what ``invoke serve`` runs).

    ``settings`` skips reading the environment (the serve task passes
    settings it has already sized for its thread count).
    """
    settings = embedded.with_server(settings or load_settings(environ))
    init_db(settings)
    mailer = Mailer.from_settings(settings)
    app = create_app(settings, mailer=mailer)
    # Mail queued before a restart (or by a process that died) goes out now.
    mailer.wake()
    return app
