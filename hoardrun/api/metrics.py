"""``GET /metrics``: Prometheus text format, for operators only.

Mounted only when ``HOARDRUN_METRICS`` is on. With ``HOARDRUN_METRICS_TOKEN``
set (required in production) a scrape must send ``Authorization: Bearer
<token>``; anyone else gets a 401 problem, so the public listener serves
nothing an outsider can read. Scrapers are configured with
``authorization: {credentials: <token>}``.

What is measured (``RequestMetrics``, a middleware, and the money routes):

* ``hoardrun_http_requests_total{method, route, status}`` and
  ``hoardrun_http_request_duration_seconds{method, route}`` by route
  *template* (``/api/v1/accounts/{account_id:uuid}``), never the raw path,
  so ids and scanners cannot explode the series; unrouted requests are
  ``route="unmatched"``;
* ``hoardrun_db_pool_connections{state=in_use|idle|overflow}``, this
  process's pool after each request and at each scrape;
* ``hoardrun_ledger_movements_total{kind, outcome=posted|refused, reason}``
  (``reason`` is the problem code of a refusal) and
  ``hoardrun_idempotent_replays_total{kind}``.

Several server processes: start every process with the same empty
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode); each
writes its numbers there and any one scrape reads the sum of all of them.
"""

import atexit
import hmac
import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest, multiprocess, values
from spectree import Response

from .. import db as dbm
from .. import errors
from .auth import bearer_token
from .openapi import Problem, spec

PATH = "/metrics"
# Seconds; the money path's p99 is ~25-50 ms on two cores (README, Benchmark).
LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
POOL_STATES = ("in_use", "idle", "overflow")


class Metrics:
    """The service's metrics, in their own registry (one per app)."""

    def __init__(self, multiproc_dir=None):
        self.multiproc_dir = multiproc_dir
        if multiproc_dir and values.ValueClass.__name__ != "MmapedValue":
            # prometheus-client picks file-backed values when it is imported.
            raise errors.ConfigError("PROMETHEUS_MULTIPROC_DIR must be in the server's "
                                     "environment when it starts, not set later")
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hoardrun_http_requests", "HTTP requests served",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("hoardrun_http_request_duration_seconds",
                                 "Time from request to response", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.pool = Gauge("hoardrun_db_pool_connections", "Database pool connections by state",
                          ["state"], multiprocess_mode="livesum", registry=r)
        self.movements = Counter("hoardrun_ledger_movements",
                                 "Money movements through the API by kind and outcome",
                                 ["kind", "outcome", "reason"], registry=r)
        self.replays = Counter("hoardrun_idempotent_replays",
                               "Money-moving POSTs answered from a stored first response",
                               ["kind"], registry=r)
        if multiproc_dir:
            pid = os.getpid()
            # A stopped worker's pool gauges must leave the sum (counters stay).
            atexit.register(multiprocess.mark_process_dead, pid, multiproc_dir)

    def observe_pool(self):
        info = dbm.pool_info()
        self.pool.labels("in_use").set(info["checked_out"])
        self.pool.labels("idle").set(info["checked_in"])
        self.pool.labels("overflow").set(info["overflow"])

    def exposition(self):
        """The text a scrape gets: this process's numbers, or every process's sum."""
        if self.multiproc_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)


class RequestMetrics:
    """Middleware: counts and times every request; records money outcomes.

    Installed first, so its ``process_response`` runs last: after the
    connection went back to the pool, and around every other middleware.
    """

    def __init__(self, metrics, *, timer=time.perf_counter):
        self.metrics = metrics
        self.timer = timer

    def process_request(self, req, resp):
        req.context.metrics_started = self.timer()

    def process_response(self, req, resp, resource, req_succeeded):
        m = self.metrics
        route = req.uri_template if resource is not None and req.uri_template else "unmatched"
        m.requests.labels(req.method, route, str(resp.status_code)).inc()
        started = getattr(req.context, "metrics_started", None)
        if started is not None:
            m.latency.labels(req.method, route).observe(self.timer() - started)
        movement = getattr(req.context, "movement", None)
        if movement is not None:
            kind, outcome, reason = movement
            if outcome == "replayed":
                m.replays.labels(kind).inc()
            else:
                m.movements.labels(kind, outcome, reason).inc()
        if dbm.db.obj is not None:
            m.observe_pool()


class MetricsEndpoint:
    """``GET /metrics``."""

    auth = None  # not a user route: its own bearer token, below

    def __init__(self, metrics, token=""):
        self.metrics = metrics
        self.token = token.encode("utf-8")

    @spec.validate(resp=Response("HTTP_200", HTTP_401=Problem), tags=["operations"],
                   skip_validation=True)
    def on_get(self, req, resp):
        """Prometheus metrics (text format); a bearer token when the operator set one."""
        if self.token:
            given = (bearer_token(req) or "").encode("utf-8")
            if not hmac.compare_digest(given, self.token):
                raise errors.Unauthorized("this route needs the metrics bearer token")
        self.metrics.observe_pool()
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = self.metrics.exposition()
        resp.cache_control = ["no-store"]


def install(settings):
    """``(metrics, middleware)`` for ``settings``, or ``(None, None)`` when metrics are off."""
    if not settings.metrics:
        return None, None
    metrics = Metrics(settings.metrics_multiproc_dir)
    return metrics, RequestMetrics(metrics)


def mount(app, settings, metrics):
    """Add ``GET /metrics`` to ``app`` (only when metrics are on)."""
    if metrics is not None:
        app.add_route(PATH, MetricsEndpoint(metrics, settings.metrics_token))


