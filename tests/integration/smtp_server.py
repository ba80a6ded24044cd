"""A real SMTP server on loopback (aiosmtpd) that keeps what it receives.

``SmtpServer(tmp_path, implicit_tls=False)`` starts aiosmtpd on a free
127.0.0.1 port with a certificate of a throwaway CA for 127.0.0.1, and:

* plain ``smtp://``: STARTTLS offered and required before anything else,
  AUTH LOGIN/PLAIN required (only after TLS) with ``USER``/``PASSWORD``;
* ``implicit_tls=True``: TLS from the first byte (``smtps://``).

``url`` is what to put in ``HOARDRUN_SMTP_URL`` and ``ca_file`` in
``HOARDRUN_SMTP_CA_FILE``; ``wait_for(to)`` returns the next message for an
address as a parsed ``email.message.EmailMessage``. ``refuse = True``
makes the server answer every message with a temporary 451 failure.
"""

import email
import email.policy
import socket
import ssl
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.integration.test_tls import make_ca, make_server_cert, write_pem

USER = "mailer"
PASSWORD = "Sm7p-p@ss word"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Handler:
    def __init__(self, server):
        self.server = server

    async def handle_DATA(self, smtp, session, envelope):
        if self.server.refuse:
            self.server.refused += 1
            return "451 try again later"
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.server.arrived:
            self.server.messages.append((session.authenticated, session.ssl is not None,
                                         list(envelope.rcpt_tos), message))
            self.server.arrived.notify_all()
        return "250 OK"


def _authenticate(server, session, envelope, mechanism, auth_data):
    if (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
            and auth_data.password == PASSWORD.encode()):
        return AuthResult(success=True)
    return AuthResult(success=False, handled=False)


class SmtpServer:
    """aiosmtpd on 127.0.0.1 with TLS; see the module docstring."""

    def __init__(self, tmp_path, *, implicit_tls=False):
        ca_key, ca_cert = make_ca("HoardRun mail test CA")
        key, cert = make_server_cert(ca_key, ca_cert)
        cert_file = write_pem(tmp_path / "smtp.crt", cert=cert)
        key_file = write_pem(tmp_path / "smtp.key", key=key)
        self.ca_file = str(write_pem(tmp_path / "smtp-ca.crt", cert=ca_cert))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        self.messages = []
        self.arrived = threading.Condition()
        self.refuse = False
        self.refused = 0
        self.port = _free_port()
        if implicit_tls:
            self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port,
                                         ssl_context=context, authenticator=_authenticate,
                                         # aiosmtpd only counts STARTTLS as TLS; this
                                         # socket is TLS from the first byte.
                                         auth_require_tls=False, auth_required=True)
            self.url = f"smtps://{USER}:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{self.port}"
        else:
            self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port,
                                         tls_context=context, require_starttls=True,
                                         authenticator=_authenticate, auth_required=True)
            self.url = f"smtp://{USER}:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{self.port}"

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()

    def environ(self):
        """The variables that point the app at this server."""
        return {"HOARDRUN_SMTP_URL": self.url, "HOARDRUN_SMTP_CA_FILE": self.ca_file,
                "HOARDRUN_SMTP_TIMEOUT": "5", "HOARDRUN_MAIL_FROM": "HoardRun <no-reply@hoardrun.test>"}

    def received(self, to):
        """Every message received so far for ``to``."""
        with self.arrived:
            return [m for _, _, rcpts, m in self.messages if to in rcpts]

    def wait_for(self, to, count=1, timeout=15):
        """The ``count``-th message for ``to`` (waiting up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = [m for _, _, rcpts, m in self.messages if to in rcpts]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                assert left > 0, f"no message #{count} for {to} within {timeout} s"
                self.arrived.wait(left)

    def sessions(self):
        """``(authenticated, over_tls)`` of each delivery."""
        with self.arrived:
            return [(auth, tls) for auth, tls, _, _ in self.messages]
