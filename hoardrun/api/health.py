"""``/api/health``: the five probes, in the original service's JSON shapes.

* ``/api/health`` and ``/api/health/``: always 200; whether the database
  answered (an answer up to 1 s old may be reused).
* ``/api/health/detailed``: service, version, environment, uptime, host
  figures, dependencies and the database block; always 200.
* ``/api/health/database``: 200 healthy, or 503 with ``connection_healthy:
  false`` and an error string.
* ``/api/health/readiness``: 200 ready only when the database answers and no
  migration is pending; else 503 ``not_ready`` naming the failed check.
* ``/api/health/liveness``: 200 alive; never touches the database.

Every body has ``status`` and ``timestamp`` (UTC, ISO 8601 with ``Z``).
The answers come from ``hoardrun.health.Health``; nothing here queries.
"""

from datetime import datetime
from typing import Literal

import falcon
from pydantic import BaseModel, Field
from spectree import Response

from ..health import SERVICE
from .openapi import spec
from .problems import RETRY_AFTER_SECONDS

TAGS = ["health"]


class PoolInfo(BaseModel):
    pool_size: int
    checked_in: int
    checked_out: int
    overflow: int


class DatabaseBlock(BaseModel):
    database_url: str
    database_version: str | None
    connection_healthy: bool
    pool_info: PoolInfo
    error: str | None = None


class BasicHealth(BaseModel):
    status: Literal["healthy"]
    timestamp: datetime
    service: str
    database: Literal["connected", "disconnected"]
    database_healthy: bool
    message: str


class Memory(BaseModel):
    total: int
    available: int
    percent: float


class Disk(BaseModel):
    total: int
    free: int
    percent: float


class SystemInfo(BaseModel):
    python_version: str
    memory: Memory
    disk: Disk


class Dependencies(BaseModel):
    database: bool


class ReplicaInfo(BaseModel):
    url: str = Field(description="DATABASE_REPLICA_URLS entry, credentials masked")
    healthy: bool = Field(description="Answering, a standby, and within DATABASE_REPLICA_MAX_LAG")
    lag_seconds: float | None = Field(description="Replay lag; 0 when it has replayed all "
                                      "the primary has written; null when unknown")
    replay_lsn: str | None
    error: str | None


class DetailedHealth(BaseModel):
    status: Literal["healthy", "degraded"]
    timestamp: datetime
    service: str
    version: str
    environment: str
    uptime: float
    system: SystemInfo
    dependencies: Dependencies
    database: DatabaseBlock
    replicas: list[ReplicaInfo] = Field(description="Read replicas (DATABASE_REPLICA_URLS); "
                                        "a replica that is down does not degrade the status")


class DatabaseHealth(BaseModel):
    status: Literal["healthy", "unhealthy"]
    timestamp: datetime
    database: DatabaseBlock


class Check(BaseModel):
    status: Literal["healthy", "unhealthy", "up_to_date", "pending", "unknown"]
    error: str | None = None
    pending: list[str] | None = None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    timestamp: datetime
    #: check name -> status, as the original service answered ("database": "healthy")
    checks: dict[str, Literal["healthy", "unhealthy", "up_to_date", "pending", "unknown"]]
    details: dict[str, Check]
    failed: list[str]


class Liveness(BaseModel):
    status: Literal["alive"]
    timestamp: datetime
    uptime: float


def _unavailable(resp):
    resp.status = falcon.HTTP_503
    resp.set_header("Retry-After", RETRY_AFTER_SECONDS)


class Health:
    """``GET /api/health`` and ``/api/health/``."""

    def __init__(self, health):
        self.health = health

    @spec.validate(resp=Response(HTTP_200=BasicHealth), tags=TAGS)
    def on_get(self, req, resp):
        """Basic health: always 200, says whether the database answered."""
        ok = self.health.database_answered_recently()
        resp.media = {
            "status": "healthy",
            "timestamp": self.health.now(),
            "service": SERVICE,
            "database": "connected" if ok else "disconnected",
            "database_healthy": ok,
            "message": "Service is running" + ("" if ok else " (database not answering)"),
        }


class HealthDetailed:
    """``GET /api/health/detailed``."""

    def __init__(self, health, settings, version):
        self.health = health
        self.environment = settings.env
        self.version = version

    @spec.validate(resp=Response(HTTP_200=DetailedHealth), tags=TAGS)
    def on_get(self, req, resp):
        """Service, version, environment, uptime, host figures and the database block."""
        database = self.health.database()
        ok = database["connection_healthy"]
        resp.media = {
            "status": "healthy" if ok else "degraded",
            "timestamp": self.health.now(),
            "service": SERVICE,
            "version": self.version,
            "environment": self.environment,
            "uptime": self.health.uptime(),
            "system": self.health.system(),
            "dependencies": {"database": ok},
            "database": database,
            "replicas": self.health.replicas(),
        }


class HealthDatabase:
    """``GET /api/health/database``."""

    def __init__(self, health):
        self.health = health

    @spec.validate(resp=Response(HTTP_200=DatabaseHealth, HTTP_503=DatabaseHealth), tags=TAGS)
    def on_get(self, req, resp):
        """The database: masked URL, server version, live pool numbers; 503 when down."""
        database = self.health.database()
        ok = database["connection_healthy"]
        if not ok:
            _unavailable(resp)
        resp.media = {
            "status": "healthy" if ok else "unhealthy",
            "timestamp": self.health.now(),
            "database": database,
        }


class HealthReadiness:
    """``GET /api/health/readiness``."""

    def __init__(self, health):
        self.health = health

    @spec.validate(resp=Response(HTTP_200=Readiness, HTTP_503=Readiness), tags=TAGS)
    def on_get(self, req, resp):
        """Ready only when the database answers and no migration is pending."""
        ready, checks, failed = self.health.readiness()
        if not ready:
            _unavailable(resp)
        resp.media = self.health.readiness_body(ready, checks, failed, self.health.now())


class HealthLiveness:
    """``GET /api/health/liveness``: never touches the database."""

    def __init__(self, health):
        self.health = health

    @spec.validate(resp=Response(HTTP_200=Liveness), tags=TAGS)
    def on_get(self, req, resp):
        """The process is alive; uptime in seconds."""
        resp.media = {"status": "alive", "timestamp": self.health.now(),
                      "uptime": self.health.uptime()}


def mount(app, health, settings, version):
    """Add the health routes to ``app``."""
    basic = Health(health)
    app.add_route("/api/health", basic)
    app.add_route("/api/health/", basic)
    app.add_route("/api/health/detailed", HealthDetailed(health, settings, version))
    app.add_route("/api/health/database", HealthDatabase(health))
    app.add_route("/api/health/readiness", HealthReadiness(health))
    app.add_route("/api/health/liveness", HealthLiveness(health))
