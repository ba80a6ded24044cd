"""Driving a scenario with wrk (C, keep-alive, Lua-scripted requests).

The request list (methods, paths, JSON bodies, every user's bearer token)
is written into a Lua script; each request that moves money gets a fresh
``Idempotency-Key`` (run nonce, wrk thread, counter). The script's
``done()`` prints one ``HRWRK {json}`` line with the totals, the error
counters and the latency percentiles, which ``parse`` reads.
"""

import json
import os
import shutil
import subprocess
import tempfile
import uuid

MARKER = "HRWRK "

_DONE = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f}\n', MARKER, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50),
    latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
'''

_REQUEST = r'''
local counter = 0
local offset = 0
local threads = 0
setup = function(thread)
  thread:set("thread_no", threads)
  threads = threads + 1
end
init = function(args)
  offset = (thread_no or 0) * 7919
end
request = function()
  counter = counter + 1
  local r = REQUESTS[((offset + counter) % #REQUESTS) + 1]
  local headers = r.headers
  if r.key then
    headers["Idempotency-Key"] = NONCE .. "-" .. (thread_no or 0) .. "-" .. counter
  end
  return wrk.format(r.method, r.path, headers, r.body)
end
'''


def available():
    """Whether wrk is on the PATH."""
    return shutil.which("wrk") is not None


def _lua(value):
    """A Lua literal for a str/bool/None/dict/list value."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A long bracket string cannot be broken by quotes or backslashes.
        level = "=" * 4
        return f"[{level}[{value}]{level}]"
    if isinstance(value, dict):
        # NOTE: "[ " not "[": "[[" would open a long string
        return "{" + ", ".join(f"[ {_lua(k)} ] = {_lua(v)}" for k, v in value.items()) + "}"
    return "{" + ", ".join(_lua(v) for v in value) + "}"


def script(requests, nonce=None):
    """The Lua script cycling through ``requests`` (dicts as the Python generator takes)."""
    rows = []
    for spec in requests:
        headers = dict(spec.get("headers") or {})
        body = spec.get("body")
        if body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(body)
        rows.append({"method": spec["method"], "path": spec["path"], "headers": headers,
                     "body": body, "key": bool(spec.get("unique_key"))})
    return (f"MARKER = {_lua(MARKER)}\nNONCE = {_lua(nonce or uuid.uuid4().hex[:12])}\n"
            f"REQUESTS = {_lua(rows)}\n" + _REQUEST + _DONE)


def parse(output):
    """The raw results dict of one wrk run from its standard output.

    ``errors`` counts non-2xx/3xx statuses (wrk's "status", any code above
    399) plus connect/read/write errors and timeouts.
    """
    for line in output.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER):])
            break
    else:
        raise ValueError("no HRWRK line in wrk's output: " + output.strip()[-300:])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    elapsed = data["duration_us"] / 1e6
    return {"tool": "wrk", "requests": data["requests"], "errors": errors,
            "elapsed": elapsed, "p50_ms": data["p50_us"] / 1000.0,
            "p95_ms": data["p95_us"] / 1000.0, "p99_ms": data["p99_us"] / 1000.0,
            "max_ms": data["max_us"] / 1000.0, "mean_ms": data["mean_us"] / 1000.0,
            "error_kinds": {k: data[k] for k in ("connect", "read", "write", "status",
                                                 "timeout") if data[k]}}


def run(port, clients, seconds, requests, *, threads=None):
    """Drive ``requests`` at 127.0.0.1:``port``; return the parsed results."""
    threads = max(1, min(clients, threads or min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "requests.lua")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script(requests))
        done = subprocess.run(
            ["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{int(seconds)}s",
             "--timeout", "10s", "-s", path, f"http://127.0.0.1:{port}"],
            capture_output=True, text=True, check=False)
    # NOTE: wrk reports a broken script on stderr and then runs without it, exit 0
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError("wrk failed: " + (done.stderr or done.stdout).strip()[-500:])
    return parse(done.stdout)
