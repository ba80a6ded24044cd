"""The load generator: a separate process driving the API over keep-alive HTTP.

Run as ``python -m bench.loadgen`` with a JSON job on stdin::

    {"host": "127.0.0.1", "port": 8123, "clients": 8, "seconds": 10,
     "requests": [{"method": "GET", "path": "/api/health/", "headers": {...},
                   "body": null, "unique_key": false}, ...]}

Each client thread owns one persistent connection and cycles through the
requests from its own offset (``unique_key`` adds a fresh Idempotency-Key
per request). It prints one JSON object: completed count, error count with
a few samples, and every latency in milliseconds, so the parent computes
percentiles. Only the standard library is used, so the generator costs as
little CPU as Python allows on a machine the server shares.
"""

import http.client
import json
import sys
import threading
import time
import uuid

MAX_ERROR_SAMPLES = 5


def _client(job, offset, stop_at, out, lock):
    conn = http.client.HTTPConnection(job["host"], job["port"], timeout=30)
    requests = job["requests"]
    latencies, errors, samples = [], 0, []
    i = offset
    while True:
        spec = requests[i % len(requests)]
        i += 1
        headers = dict(spec.get("headers") or {})
        if spec.get("unique_key"):
            headers["Idempotency-Key"] = uuid.uuid4().hex
        body = spec.get("body")
        payload = json.dumps(body).encode() if body is not None else None
        if payload is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        if started >= stop_at:
            break
        try:
            conn.request(spec["method"], spec["path"], body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            status, data = 0, repr(exc).encode()
            conn.close()
            conn = http.client.HTTPConnection(job["host"], job["port"], timeout=30)
        latencies.append((time.perf_counter() - started) * 1000.0)
        if not 200 <= status < 300:
            errors += 1
            if len(samples) < MAX_ERROR_SAMPLES:
                samples.append(f"{status} {spec['method']} {spec['path']}: {data[:300]!r}")
    conn.close()
    with lock:
        out["latencies"].extend(latencies)
        out["errors"] += errors
        out["error_samples"].extend(samples[:MAX_ERROR_SAMPLES - len(out["error_samples"])])


def run(job):
    """Drive ``job``; return the raw results."""
    out = {"latencies": [], "errors": 0, "error_samples": []}
    lock = threading.Lock()
    started = time.perf_counter()
    stop_at = started + float(job["seconds"])
    per_client = max(1, len(job["requests"]) // max(1, job["clients"]))
    threads = [threading.Thread(target=_client, args=(job, n * per_client, stop_at, out, lock))
               for n in range(job["clients"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["elapsed"] = time.perf_counter() - started
    return out


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
