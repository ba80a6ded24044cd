"""CPU time per request, from the operating system's accounting (psutil).

``CpuMeter`` sums user + system CPU seconds over two groups of processes
while a scenario runs: the app server (its main process and every worker)
and the PostgreSQL backends serving the bench database (found as children
of the postmaster whose process title names that database). A sampler
thread polls every ``interval`` seconds so that a process born during the
run (a pgbench session) is counted from zero and one that ends is counted
up to its last sample.
"""

import threading

import psutil


def cpu_seconds(process):
    """User + system CPU seconds of one process (0.0 once it is gone)."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def server_processes(pid):
    """The server's main process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def postgres_backends(postmaster_pid, dbname):
    """Backends of ``dbname``: children of the postmaster titled ``postgres: user db ...``."""
    try:
        children = psutil.Process(postmaster_pid).children()
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            words = child.cmdline()
        except psutil.Error:
            continue
        title = " ".join(w for w in words if w)
        # "postgres: [<cluster_name>: ]<user> <database> <client> <state>"
        if title.startswith("postgres:") and f" {dbname} " in f"{title} ":
            out.append(child)
    return out


class CpuMeter:
    """CPU seconds used by groups of processes between ``start()`` and ``stop()``."""

    def __init__(self, groups, interval=0.2):
        #: name -> zero-argument callable returning the group's current processes
        self.groups = groups
        self.interval = interval
        self._first, self._last = {}, {}
        self._stop = threading.Event()
        self._thread = None

    def _sample(self, baseline):
        for name, find in self.groups.items():
            for proc in find():
                key = (name, proc.pid, _created(proc))
                used = cpu_seconds(proc)
                if used is None:
                    continue
                if key not in self._first:
                    # Present at start: count from now. Born later: from zero.
                    self._first[key] = used if baseline else 0.0
                self._last[key] = used

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._sample(False)

    def start(self):
        self._sample(True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """``{group: CPU seconds}`` used since ``start()``."""
        self._stop.set()
        self._thread.join()
        self._sample(False)
        totals = {name: 0.0 for name in self.groups}
        for key, last in self._last.items():
            totals[key[0]] += max(0.0, last - self._first[key])
        return totals


def _created(proc):
    try:
        return proc.create_time()
    except psutil.Error:
        return 0.0


def per_request_us(seconds, requests):
    """CPU microseconds per request (None when nothing was measured)."""
    if seconds is None or not requests:
        return None
    return round(seconds * 1e6 / requests, 1)
