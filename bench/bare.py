"""A bare WSGI app returning a fixed JSON body: the bench's floor for one request.

Served under the same server, workers and threads as HoardRun, it measures
what the HTTP server alone costs, so ``GET /api/health/`` can be compared
with it (the framework, routing and the health work on top).
"""

BODY = b'{"status":"healthy","timestamp":"2026-01-01T00:00:00.000000Z","database":true}'
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    """Answer every request with ``BODY``."""
    start_response("200 OK", HEADERS)
    return [BODY]
