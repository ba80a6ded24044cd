"""HTTP fixtures: settings → database → app → client, and a real waitress server.

``app`` is the real app for this test's (clean, migrated) database;
``client`` is falcon's in-process test client over it;
``live_server`` serves ``app`` under waitress on a free loopback port.
"""

import functools
import os
import shutil
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from falcon import testing

from hoardrun import embedded
from hoardrun.api import create_app
from hoardrun.api import serve as serving


@pytest.fixture
def app(settings, database):
    """The falcon app for this test's database."""
    return create_app(settings)


@pytest.fixture
def client(app):
    """falcon's test client over ``app`` (no sockets)."""
    return testing.TestClient(app)


class LiveServer:
    """A waitress server running ``app`` in a background thread."""

    def __init__(self, app, settings, threads=4):
        self.server = serving.create_server(app, settings, host="127.0.0.1", port=0,
                                            threads=threads)
        self.host = "127.0.0.1"
        self.port = self.server.effective_port
        self.url = f"http://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.server.run, name="waitress", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        serving.stop(self.server, self.thread)
        assert not self.thread.is_alive(), "waitress did not stop"


@pytest.fixture
def live_server(app, settings):
    """``app`` under a real waitress server on 127.0.0.1:<free port>."""
    with LiveServer(app, settings) as server:
        yield server


@pytest.fixture
def make_user(client):
    """Create a user with a live bearer token: ``make_user(role="admin", via_api=False, **fields)``.

    Returns a ``helpers.Person`` (``.id``, ``.email``, ``.password``, ``.token``,
    ``.headers``); see ``tests/helpers.py``.
    """
    import helpers

    return functools.partial(helpers.make_user, client)


@pytest.fixture
def jane(make_user):
    """An ordinary user, Jane Doe."""
    return make_user(first_name="Jane", last_name="Doe")


@pytest.fixture
def admin(make_user):
    """A user with the admin role."""
    return make_user(role="admin")


@pytest.fixture
def prices(database):
    """The default sandbox price list (AAPL, MSFT, VTI, BTC in USD)."""
    from hoardrun import investments

    return investments.load_default_prices()


class Clock:
    """A clock the test moves by hand (pass it as ``create_app(clock=...)``)."""

    def __init__(self):
        self.now = datetime.now(timezone.utc)

    def __call__(self):
        return self.now

    def advance(self, **delta):
        self.now += timedelta(**delta)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def embedded_dir():
    """A folder for an embedded server of this test's own; stopped and removed after."""
    base = Path(tempfile.mkdtemp(prefix="hoardrun-embedded-"))
    os.chmod(base, 0o755)  # the server account must reach it when we are root
    yield base
    embedded.EmbeddedServer(base).stop("immediate")
    shutil.rmtree(base, ignore_errors=True)
