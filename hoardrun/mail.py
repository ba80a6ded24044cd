"""Outbound mail: one interface (``Mailer``), two transports, one outbox table.

A domain change that must send mail calls ``mailer.send(to, subject, body)``
inside its own transaction: that only INSERTs a row into ``mail_outbox``
(the body encrypted under the card-encryption keys), so the message exists
exactly when the change does. After the commit the caller calls
``mailer.wake()``: a background thread claims due rows, hands them to the
transport, and marks them sent, or schedules a retry with backoff, or after
``MAX_ATTEMPTS`` gives up and logs an error. A request therefore never
waits for SMTP and never fails because mail is down.

Transports:

* ``SmtpTransport`` for ``HOARDRUN_SMTP_URL``: ``smtp://user:pass@host:587``
  upgrades with STARTTLS (and refuses to go on in the clear), ``smtps://``
  speaks TLS from the first byte; certificates are verified (system CAs, or
  ``HOARDRUN_SMTP_CA_FILE``); every socket operation has
  ``HOARDRUN_SMTP_TIMEOUT``.
* ``DevOutbox`` outside production when no SMTP URL is set: it logs the
  message (logger ``hoardrun.mail``) and the row keeps its body, so
  ``invoke mail.outbox`` shows what would have been sent. In production a
  sent message's body is erased: it may hold a code.

Several processes may run senders: rows are claimed with ``FOR UPDATE SKIP
LOCKED`` and a lease (``next_attempt_at`` moved forward), so each message goes
out once, and a sender that dies mid-send leaves its rows to be retried when
the lease runs out.
"""

import logging
import smtplib
import ssl
import threading
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import unquote, urlsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .db import db, release_connection

log = logging.getLogger("hoardrun.mail")

MAX_ATTEMPTS = 8
BATCH = 20
FIRST_RETRY = 30       # seconds; doubled per attempt ...
MAX_RETRY = 3600       # ... up to an hour (8 attempts span about 1.5 hours)
IDLE_POLL = 60         # seconds between looks while retries are pending
ERROR_MAX = 500


@dataclass(frozen=True)
class Message:
    """One email: plain text, one recipient."""

    recipient: str
    subject: str
    body: str


class PermanentFailure(Exception):
    """The server refused the message for good (a 5xx reply): no retry helps."""


class SmtpTransport:
    """Delivers over SMTP: STARTTLS for ``smtp://``, implicit TLS for ``smtps://``."""

    def __init__(self, url, *, sender, timeout, ca_file=None):
        parts = urlsplit(url)
        self.implicit_tls = parts.scheme == "smtps"
        self.host = parts.hostname
        self.port = parts.port or (465 if self.implicit_tls else 587)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.sender = sender
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file)

    def __repr__(self):
        scheme = "smtps" if self.implicit_tls else "smtp"
        return f"<SmtpTransport {scheme}://{self.host}:{self.port}>"

    def send(self, message):
        """Send ``message`` or raise (smtplib/OSError: retry; PermanentFailure: give up)."""
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = message.recipient
        mail["Subject"] = message.subject
        mail["Date"] = formatdate(usegmt=True)
        domain = parseaddr(self.sender)[1].rpartition("@")[2] or None
        mail["Message-ID"] = make_msgid(domain=domain)
        mail.set_content(message.body)
        if self.implicit_tls:
            client = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout,
                                      context=self.context)
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            if not self.implicit_tls:
                client.ehlo()
                if not client.has_extn("starttls"):
                    # Credentials and codes must not cross the network in the clear.
                    raise smtplib.SMTPNotSupportedError(
                        "the server does not offer STARTTLS; refusing to send in the clear")
                client.starttls(context=self.context)
                client.ehlo()
            if self.username:
                client.login(self.username, self.password or "")
            client.send_message(mail)
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                raise PermanentFailure(f"SMTP {exc.smtp_code}: {_text(exc.smtp_error)}") from exc
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            raise PermanentFailure(f"recipient refused: {exc.recipients!r}") from exc
        finally:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()


class DevOutbox:
    """Development transport: log the message; the outbox row keeps its body."""

    def __repr__(self):
        return "<DevOutbox>"

    def send(self, message):
        log.info("development outbox (nothing is sent; `invoke mail.outbox` lists these):\n"
                 "To: %s\nSubject: %s\n\n%s", message.recipient, message.subject, message.body)


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)


def transport_for(settings):
    """The transport ``settings`` ask for: SMTP if a URL is set, else the dev outbox."""
    if settings.smtp_url:
        return SmtpTransport(settings.smtp_url, sender=settings.mail_from,
                             timeout=settings.smtp_timeout, ca_file=settings.smtp_ca_file)
    return DevOutbox()


def _cipher(keys):
    return MultiFernet([Fernet(k) for k in keys])


class Mailer:
    """Queue mail in the caller's transaction; deliver it from a background thread."""

    def __init__(self, transport, *, card_keys, keep_sent_bodies=False, lease=None):
        self.transport = transport
        self._cipher = _cipher(card_keys)
        self.keep_sent_bodies = keep_sent_bodies
        # Longer than one send can take, so no second sender claims a row in flight.
        timeout = getattr(transport, "timeout", 10)
        self.lease = lease or int(4 * timeout) + 30
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._thread = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings):
        """The mailer for ``settings`` (bodies of sent mail kept outside production)."""
        return cls(transport_for(settings), card_keys=settings.card_keys,
                   keep_sent_bodies=not settings.is_production)

    def __repr__(self):
        return f"<Mailer {self.transport!r}>"

    # ---- queueing (inside the caller's transaction)

    def seal(self, body):
        """``body`` encrypted as the outbox stores it."""
        return self._cipher.encrypt(body.encode("utf-8")).decode("ascii")

    def open(self, sealed):
        """The body of an outbox row; None if no configured key opens it."""
        try:
            return self._cipher.decrypt(sealed.encode("ascii")).decode("utf-8")
        except (InvalidToken, AttributeError, UnicodeError):
            return None

    def send(self, recipient, subject, body):
        """Queue one message (an INSERT in the current transaction); return its id.

        Call ``wake()`` after the transaction commits.
        """
        message_id = uuid.uuid4()
        db.execute_sql("INSERT INTO mail_outbox (id, recipient, subject, body) "
                       "VALUES (%s, %s, %s, %s)",
                       (message_id.hex, recipient, subject, self.seal(body)))
        return message_id

    @staticmethod
    def insert_from(source, column):
        """SQL that queues one message per row of CTE ``source`` to its ``column``.

        Parameters: id, subject, sealed body. For statements that must cost
        the same whether or not a row exists (forgot-password).
        """
        return (f"INSERT INTO mail_outbox (id, recipient, subject, body) "
                f"SELECT %s, {source}.{column}, %s, %s FROM {source}")

    # ---- delivery

    def wake(self):
        """Have the background sender look for due mail now (starts it if idle)."""
        with self._lock:
            if self._closed:
                return
            self._due.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="hoardrun-mail",
                                                daemon=True)
                self._thread.start()

    def close(self, timeout=10):
        """Stop the sender thread (after its current message)."""
        with self._lock:
            self._closed = True
            self._due.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self):
        while True:
            self._due.clear()
            try:
                wait = self.deliver_due()
            except Exception:  # noqa: BLE001 - the sender must outlive any one failure
                log.exception("mail sender pass failed; retrying in %s s", IDLE_POLL)
                wait = IDLE_POLL
            finally:
                release_connection()
            with self._lock:
                if self._closed or (wait is None and not self._due.is_set()):
                    # Nothing left to retry: the thread ends; wake() starts another.
                    self._thread = None
                    return
            self._due.wait(IDLE_POLL if wait is None else min(max(wait, 0.05), IDLE_POLL))

    def deliver_due(self):
        """Send every due message once; return seconds until the next retry, or None."""
        while not self._closed:
            claimed = db.execute_sql(
                "UPDATE mail_outbox SET attempts = attempts + 1, "
                "next_attempt_at = now() + %s * interval '1 second' "
                "WHERE id IN (SELECT id FROM mail_outbox "
                "WHERE status = 'pending' AND next_attempt_at <= now() "
                "ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING id, recipient, subject, body, attempts",
                (self.lease, BATCH)).fetchall()
            if not claimed:
                break
            for row in claimed:
                self._deliver(*row)
        row = db.execute_sql(
            "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now()) FROM mail_outbox "
            "WHERE status = 'pending'").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def _deliver(self, message_id, recipient, subject, sealed, attempts):
        body = self.open(sealed) if sealed is not None else None
        if body is None:
            self._fail(message_id, attempts, "the body cannot be decrypted with the "
                       "configured HOARDRUN_CARD_ENCRYPTION_KEYS", permanent=True)
            return
        try:
            self.transport.send(Message(recipient, subject, body))
        except PermanentFailure as exc:
            self._fail(message_id, attempts, str(exc), permanent=True)
            return
        except (smtplib.SMTPException, OSError) as exc:  # OSError: refused, TLS, timeouts
            self._fail(message_id, attempts, f"{type(exc).__name__}: {exc}")
            return
        db.execute_sql(
            "UPDATE mail_outbox SET status = 'sent', sent_at = now(), last_error = NULL"
            + ("" if self.keep_sent_bodies else ", body = NULL") + " WHERE id = %s",
            (str(message_id),))
        log.info("mail %s sent (%s, attempt %s)", message_id, subject, attempts)

    def _fail(self, message_id, attempts, error, permanent=False):
        error = error[:ERROR_MAX]
        if permanent or attempts >= MAX_ATTEMPTS:
            db.execute_sql("UPDATE mail_outbox SET status = 'failed', last_error = %s "
                           "WHERE id = %s", (error, str(message_id)))
            log.error("mail %s failed for good after %s attempt(s): %s", message_id,
                      attempts, error)
            return
        delay = min(MAX_RETRY, FIRST_RETRY * 2 ** (attempts - 1))
        db.execute_sql("UPDATE mail_outbox SET last_error = %s, "
                       "next_attempt_at = now() + %s * interval '1 second' WHERE id = %s",
                       (error, delay, str(message_id)))
        log.warning("mail %s not sent (attempt %s of %s), retrying in %s s: %s", message_id,
                    attempts, MAX_ATTEMPTS, delay, error)


def outbox(limit=20):
    """The latest ``limit`` outbox rows, newest first, as dicts (body still sealed)."""
    cursor = db.execute_sql(
        "SELECT id, created_at, status, attempts, recipient, subject, body, last_error, sent_at "
        "FROM mail_outbox ORDER BY created_at DESC, id LIMIT %s", (limit,))
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
