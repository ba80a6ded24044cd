"""The servers' batched log handler: nothing lost, nothing doubled, warnings at once."""

import io
import logging
import os
import time

import pytest

from hoardrun.api.logs import BatchedStreamHandler


@pytest.fixture
def logger():
    """A private logger writing through a fresh handler into a StringIO."""
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=3600)  # only explicit flushes write
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(f"hoardrun.test.logs.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield log, handler, stream
    log.removeHandler(handler)
    handler.close()


def test_info_lines_wait_for_the_writer_and_keep_their_order(logger):
    log, handler, stream = logger
    for i in range(5):
        log.info("line %d", i)
    assert stream.getvalue() == ""  # queued, not written by the logging thread
    handler.flush()
    assert stream.getvalue().splitlines() == [f"INFO line {i}" for i in range(5)]


def test_a_warning_is_written_at_once_after_what_came_before_it(logger):
    log, _, stream = logger
    log.info("before")
    log.warning("trouble")
    assert stream.getvalue().splitlines() == ["INFO before", "WARNING trouble"]


def test_the_background_writer_writes_without_a_flush():
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=0.01)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    handler.handle(record)
    deadline = time.monotonic() + 5
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    handler.close()
    assert stream.getvalue() == "hello\n"


def test_close_writes_what_is_queued(logger):
    log, handler, stream = logger
    log.info("last words")
    handler.close()
    assert stream.getvalue() == "INFO last words\n"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_forked_child_writes_its_own_lines_once_and_not_the_parents(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w", encoding="utf-8") as stream:
        handler = BatchedStreamHandler(stream, interval=0.01)
        handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
        log = logging.getLogger("hoardrun.test.logs.fork")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        try:
            log.info("parent before the fork")  # still queued when the child is made
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                try:
                    log.info("child")
                    time.sleep(0.2)  # the child's own writer thread writes it
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            log.info("parent after the fork")
            handler.flush()
        finally:
            log.removeHandler(handler)
            handler.close()
    lines = [line.split(" ", 1) for line in path.read_text(encoding="utf-8").splitlines()]
    messages = [message for _, message in lines]
    assert sorted(messages) == sorted(["parent before the fork", "child",
                                       "parent after the fork"]), messages
    by_message = dict((message, int(p)) for p, message in lines)
    assert by_message["child"] == pid
    assert by_message["parent before the fork"] == os.getpid()


def test_a_broken_stream_never_raises_into_the_caller():
    class Broken(io.StringIO):
        def write(self, text):
            raise OSError("disk full")

    handler = BatchedStreamHandler(Broken(), interval=3600)
    handler.handle(logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None))
    handler.close()


def test_configure_installs_one_batched_handler_on_an_unconfigured_root(monkeypatch):
    from hoardrun.api import logs

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    logs.configure(logging.INFO)
    logs.configure(logging.INFO)  # idempotent: still one
    try:
        assert [type(h) for h in root.handlers] == [BatchedStreamHandler]
        assert root.level == logging.INFO
    finally:
        root.handlers[0].close()
