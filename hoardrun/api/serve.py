"""Serving the app under waitress (what ``invoke serve`` runs).

Portable on purpose: no fork, no POSIX signals. Ctrl-C raises
KeyboardInterrupt in waitress's loop, which stops its workers; the pool is
closed after. Migrations: applied at start in development and test; in
production a pending one is reported (one warning line) and the server
starts anyway, answering readiness 503 until an operator runs
``invoke db.migrate``.
"""

import logging

import waitress
from waitress import wasyncore

from .. import db as dbm
from .. import embedded
from .. import schema
from ..config import load_settings
from ..health import pending_migrations, shown_database_url
from .app import get_app

log = logging.getLogger("hoardrun.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# PERFORMANCE.md item 5: at least as many threads as concurrent clients. With
# 8 keep-alive clients on 8 threads waitress still queued ~3% of requests (a
# worker finishing its log line as the next request lands) and logged a
# warning each time; 16 threads queued none at the same throughput.
DEFAULT_THREADS = 16


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


def serve(*, host=DEFAULT_HOST, port=DEFAULT_PORT, threads=DEFAULT_THREADS, environ=None,
          settings=None):
    """Load settings, prepare the database, serve until Ctrl-C, close the pool.

    ``settings`` (else read from ``environ``/the environment) lets the task
    report a configuration error in its own words before anything starts.
    """
    if threads < 1:
        raise ValueError(f"threads={threads} is not valid: expected an integer >= 1")
    # idempotent when the caller has configured logging already
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One line per applied migration is ours; the router would log every
    # statement of every migration (tens of kilobytes of PL/pgSQL).
    for name in ("peewee_migrate", "hoardrun.migrations"):
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = sized_for(embedded.with_server(settings or load_settings(environ)), threads)
    # Migrations before the app exists: building it starts the mail sender,
    # which must not poll a table a pending migration has yet to create.
    dbm.init_db(settings)
    try:
        apply_or_report_migrations(settings)
    finally:
        dbm.close_db()
    app = get_app(settings=settings)
    try:
        server = create_server(app, settings, host=host, port=port, threads=threads)
        log.info("HoardRun %s: %d threads, database %s", settings.env, threads,
                 shown_database_url(settings))
        server.print_listen("Serving on http://{}:{}")
        server.run()  # returns after Ctrl-C (waitress catches KeyboardInterrupt)
    finally:
        dbm.close_db()
        log.info("stopped")
