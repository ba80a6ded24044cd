"""Serving the app: ``invoke serve`` under granian (default) or waitress.

granian (Rust HTTP, WSGI) runs ``workers`` processes of ``threads`` blocking
threads each and replaces a worker that dies; waitress (pure Python, for a
platform without a granian wheel) runs one process. The parent does what
must happen once, before any worker exists: it starts the embedded server
when DATABASE_URL is unset, applies pending migrations outside production
(in production it only reports them and readiness answers 503 until
``invoke db.migrate`` runs), and sizes each worker's pool from its threads
within what the database allows. Workers get the resolved URL and pool
sizes through their environment, so none of them races to start a server
or migrate. Ctrl-C and SIGTERM stop every worker; pools are closed after.
"""

import logging
import multiprocessing.util
import os
import signal
import threading
from contextlib import contextmanager

import waitress
from waitress import wasyncore

from .. import db as dbm
from .. import embedded
from .. import schema
from ..config import load_settings
from ..health import pending_migrations, shown_database_url
from . import logs
from .app import get_app

log = logging.getLogger("hoardrun.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# PERFORMANCE.md item 5: at least as many threads as concurrent clients. With
# 8 keep-alive clients on 8 threads waitress still queued ~3% of requests (a
# worker finishing its log line as the next request lands) and logged a
# warning each time; 16 threads queued none at the same throughput.
DEFAULT_THREADS = 16
SERVERS = ("granian", "waitress")
DEFAULT_SERVER = "granian"
# Two processes use both cores of a small machine for light requests
# (PERFORMANCE.md item 8); more need more cores and connections.
DEFAULT_WORKERS = max(1, min(2, os.cpu_count() or 1))
#: The worker factory granian imports in each worker process.
WORKER_TARGET = "hoardrun.api.serve:worker_app"


def sized_for(settings, threads):
    """``settings`` with a pool at least as large as waitress's thread count."""
    if settings.pool_size < threads:
        log.info("DATABASE_POOL_SIZE=%d is below %d threads: using a pool of %d",
                 settings.pool_size, threads, threads)
        return settings.replace(pool_size=threads)
    return settings


def apply_or_report_migrations(settings):
    """Apply pending migrations outside production; in production only report them.

    Returns the names applied (empty in production or when none pend).
    """
    pending = pending_migrations()
    if not pending:
        return []
    if settings.is_production:
        log.warning("%d migration(s) pending and NOT applied in production (%s): "
                    "readiness answers 503 until `invoke db.migrate` runs",
                    len(pending), ", ".join(pending))
        return []
    applied = schema.migrate()
    log.info("applied %d migration(s): %s", len(applied), ", ".join(applied))
    return applied


def create_server(app, settings, *, host=DEFAULT_HOST, port=DEFAULT_PORT,
                  threads=DEFAULT_THREADS):
    """A waitress server for ``app`` (not started; ``port=0`` picks a free one)."""
    return waitress.create_server(
        app, host=host, port=port, threads=threads, ident="hoardrun",
        # waitress buffers a whole body before the app sees it; the app
        # answers 413 problem+json above settings.max_body_bytes, and this
        # cap only keeps a huge upload from filling memory or disk first.
        max_request_body_size=settings.max_body_bytes * 2 + 65536,
    )


def stop(server, thread=None, timeout=10):
    """Stop a server running in ``thread`` from another thread (tests, embedding).

    The sockets are closed by waitress's own loop thread (a trigger thunk):
    closing them from here while that loop sits in select() breaks it with
    EBADF instead of letting it end.
    """
    # Workers first: a worker still finishing a response must not touch a
    # channel or the trigger after they are closed.
    server.task_dispatcher.shutdown(timeout=timeout)
    try:
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
    except OSError:
        # The trigger is closed already (EBADF): the loop has ended, so
        # nothing polls the sockets any more and closing them here is safe.
        wasyncore.close_all(server._map)
    if thread is not None:
        thread.join(timeout)


def _configure_logging():
    """INFO lines with time and logger (idempotent when the caller configured logging)."""
    logs.configure(logging.INFO)
    # One line per applied migration is ours; the router would log every
    # statement of every migration (tens of kilobytes of PL/pgSQL).
    for name in ("peewee_migrate", "hoardrun.migrations"):
        logging.getLogger(name).setLevel(logging.WARNING)


def worker_app():
    """The app of one granian worker: settings from the environment the parent prepared.

    The parent has resolved DATABASE_URL (the embedded server included) and
    the pool sizes, and applied the migrations, so a worker only binds.
    """
    _configure_logging()
    if hasattr(os, "setpgid"):
        # NOTE: a terminal's Ctrl-C signals its whole process group. A granian
        # 2.8 worker hit by that SIGINT and by its parent's SIGTERM at once can
        # hang on shutdown (seen 3 times in 5), so workers leave the group
        # and stop only when the parent tells them to.
        os.setpgid(0, 0)
    app = get_app()
    # multiprocessing ends a worker with os._exit: atexit would not run, its
    # finalizers do, so PostgreSQL sees the pool's sessions end cleanly.
    multiprocessing.util.Finalize(None, dbm.close_db, exitpriority=10)
    return app


def prepare(settings, *, workers, threads):
    """Once, before any worker: migrations (outside production) and the pool plan.

    Returns ``(settings sized for one worker, PoolPlan)``.
    """
    dbm.init_db(settings)
    try:
        apply_or_report_migrations(settings)
        allowance = dbm.connection_allowance(settings)
    finally:
        dbm.close_db()
    plan = dbm.plan_pools(settings, allowance, workers=workers, threads=threads)
    return settings.replace(pool_size=plan.pool_size, max_overflow=plan.max_overflow), plan


@contextmanager
def _worker_environment(settings, environ):
    """``os.environ`` as the workers must see it while they run; restored after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ if environ is not None else saved)
    os.environ.update({"DATABASE_URL": settings.database_url,
                       "DATABASE_POOL_SIZE": str(settings.pool_size),
                       "DATABASE_MAX_OVERFLOW": str(settings.max_overflow)})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM stops waitress the way Ctrl-C does (KeyboardInterrupt in its loop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_waitress(settings, *, host, port, threads):
    app = get_app(settings=settings)
    server = create_server(app, settings, host=host, port=port, threads=threads)
    server.print_listen("Serving on http://{}:{}")
    with _sigterm_as_ctrl_c():
        server.run()  # returns after Ctrl-C (waitress catches KeyboardInterrupt)


def granian_server(target, *, host, port, workers, threads, factory=True):
    """A granian WSGI server for ``target`` ("module:callable"), not started.

    Failed workers are respawned (granian gives up when one dies again
    within ~5 s of its respawn: a crash loop). Also used by the bench, to
    serve a bare WSGI app under exactly the same server settings.
    """
    from granian.constants import Interfaces
    from granian.server import Server

    return Server(target, address=host, port=port, interface=Interfaces.WSGI,
                  workers=workers, blocking_threads=threads, factory=factory,
                  respawn_failed_workers=True, log_access=False, websockets=False)


def _serve_granian(settings, *, host, port, workers, threads, environ):
    server = granian_server(WORKER_TARGET, host=host, port=port, workers=workers,
                            threads=threads)
    log.info("Serving on http://%s:%d", host, port)
    with _worker_environment(settings, environ):
        # granian stops every worker on SIGINT/SIGTERM (SIGBREAK on Windows)
        server.serve()


def serve(*, server=DEFAULT_SERVER, host=DEFAULT_HOST, port=DEFAULT_PORT, workers=None,
          threads=DEFAULT_THREADS, environ=None, settings=None):
    """Load settings, prepare the database once, serve until Ctrl-C or SIGTERM.

    ``settings`` (else read from ``environ``/the environment) lets the task
    report a configuration error in its own words before anything starts.
    ``workers`` defaults to ``DEFAULT_WORKERS`` under granian; waitress runs
    one process.
    """
    if server not in SERVERS:
        raise ValueError(f"server={server!r} is not valid: expected one of {', '.join(SERVERS)}")
    if threads < 1:
        raise ValueError(f"threads={threads} is not valid: expected an integer >= 1")
    if workers is None:
        workers = DEFAULT_WORKERS if server == "granian" else 1
    if workers < 1:
        raise ValueError(f"workers={workers} is not valid: expected an integer >= 1")
    if server == "waitress" and workers != 1:
        raise ValueError(f"workers={workers} is not valid with waitress, which runs one "
                         "process: use --server granian for several workers")
    _configure_logging()
    settings = embedded.with_server(settings or load_settings(environ))
    settings, plan = prepare(settings, workers=workers, threads=threads)
    log.info("HoardRun %s on %s: %s; database %s", settings.env, server, plan.describe(),
             shown_database_url(settings))
    try:
        if server == "waitress":
            _serve_waitress(settings, host=host, port=port, threads=threads)
        else:
            _serve_granian(settings, host=host, port=port, workers=workers, threads=threads,
                           environ=environ)
    finally:
        dbm.close_db()
        log.info("stopped")
