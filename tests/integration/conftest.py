"""HTTP fixtures: settings → database → app → client, and a real waitress server.

``app`` is the real app for this test's (clean, migrated) database;
``client`` is falcon's in-process test client over it;
``live_server`` serves ``app`` under waitress on a free loopback port.
"""

import functools
import threading

import pytest
from falcon import testing

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
