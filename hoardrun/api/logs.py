"""The servers' log output: written in batches by one background thread.

A served request logs one access line. Written by the request's own thread,
each line was a formatted record, a handler lock shared by every thread and a
``write`` + ``flush``; on this 2-core machine that synchronous write was half
the CPU of ``GET /api/health/`` under granian (the threads queue on the lock,
and each blocking write hands the GIL over). Here a request thread only
appends the record to a deque (atomic under the GIL: no lock, no system call)
and a background thread formats and writes what has gathered every
``interval`` seconds, in one ``write``.

What is not lost or reordered for it:

* a WARNING or worse is written at once, by the thread that logged it, after
  everything queued before it (a traceback must not wait, nor overtake the
  lines that led to it);
* the queue is drained at exit (``atexit``) and on ``flush()``/``close()``;
* after a fork (granian's workers) the child starts its own writer thread
  on its first record: the parent's thread does not exist in the child.

Only a process killed outright can lose the last ``interval`` of INFO lines.
"""

import atexit
import collections
import logging
import os
import sys
import threading
import time
import weakref

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: Seconds between background writes: how late an INFO line may appear.
INTERVAL = 0.1


_HANDLERS = weakref.WeakSet()


def _before_fork():
    # Write what is queued (or the child, which inherits the queue, writes the
    # parent's lines a second time), and hold each writer's lock through the
    # fork: no thread of ours is then inside the stream's write, whose own
    # lock a child would inherit held.
    for handler in list(_HANDLERS):
        handler._write_lock.acquire()
        handler._drain()


def _after_fork_in_parent():
    for handler in list(_HANDLERS):
        handler._write_lock.release()


def _after_fork_in_child():
    for handler in list(_HANDLERS):
        handler._forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


class BatchedStreamHandler(logging.Handler):
    """A ``StreamHandler`` whose INFO lines are written in batches off the request path."""

    def __init__(self, stream=None, *, interval=INTERVAL):
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._pending = collections.deque()
        self._write_lock = threading.Lock()  # one writer at a time, in queue order
        self._stopping = threading.Event()
        self._pid = None  # the process whose writer thread runs
        _HANDLERS.add(self)

    def handle(self, record):
        """Filter and emit ``record`` without ``logging.Handler``'s per-record lock.

        That lock is what every request thread queued on; ``emit`` needs
        none (a deque append is atomic, and writing takes its own lock).
        """
        passed = self.filter(record)
        if passed:
            self.emit(record)
        return passed

    def emit(self, record):
        """Queue ``record``; write the queue now if it is a warning or worse."""
        if self._pid != os.getpid():
            self._start()
        self._pending.append(record)
        if record.levelno >= logging.WARNING:
            self.flush()

    def flush(self):
        """Write every queued record, oldest first, in one write."""
        with self._write_lock:
            self._drain()

    def _drain(self):
        # Under _write_lock.
        lines = []
        while True:
            try:
                record = self._pending.popleft()
            except IndexError:
                break
            try:
                lines.append(self.format(record))
            except Exception:  # noqa: BLE001 - logging's own rule: never raise
                self.handleError(record)
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001
            # A closed or broken stream must not take a request down with it.
            pass

    def close(self):
        """Write what is queued and stop the writer thread."""
        self._stopping.set()
        self.flush()
        super().close()

    def _forked(self):
        # In a new child: the parent's writer thread is not here, and a lock
        # one of its threads held at the fork would stay held for good.
        self._write_lock = threading.Lock()
        self._stopping = threading.Event()
        self._pid = None

    def _start(self):
        # Under the handler's own lock: two first records must not start two threads.
        with self.lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="hoardrun-log-writer",
                             daemon=True).start()

    def _run(self):
        while not self._stopping.wait(self.interval):
            self.flush()


class LineFormatter(logging.Formatter):
    """``FORMAT``, with the time's text made once per second instead of once per line."""

    def __init__(self, fmt=FORMAT):
        super().__init__(fmt)
        self._second = None
        self._second_text = ""

    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
        """``2026-12-01 23:45:01,123`` (local time, as ``logging.Formatter``)."""
        second = int(record.created)
        if second != self._second:
            # One writer thread formats, so a stale pair is at worst recomputed.
            self._second_text = time.strftime(self.default_time_format,
                                              self.converter(second))
            self._second = second
        return self.default_msec_format % (self._second_text, record.msecs)


def configure(level=logging.INFO):
    """Send the root logger's records to stderr through one ``BatchedStreamHandler``.

    Idempotent, and a no-op when the caller configured logging already (as
    ``logging.basicConfig`` is). Returns the root logger.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = BatchedStreamHandler()
        handler.setFormatter(LineFormatter())
        root.addHandler(handler)
        root.setLevel(level)
        atexit.register(handler.flush)
        # The logging HOWTO's "Optimization": FORMAT shows no caller, thread
        # or process, so no record collects them (finding the caller walks
        # the stack, on every access line).
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    return root
