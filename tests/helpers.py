"""Users and bearer tokens for HTTP tests (shared by every API test module).

``make_user`` (a fixture in ``tests/integration/conftest.py``) is the usual
entry point::

    def test_something(client, make_user):
        jane = make_user()                  # an active user with a live token
        boss = make_user(role="admin")
        client.simulate_get("/api/v1/users/me", headers=jane.headers)

By default the user row is written directly with a password hash made once
per session and the token comes from ``hoardrun.auth.issue_token``: the same
rows the API would write, without ~40 ms of argon2 per user. Pass
``via_api=True`` to go through ``POST /auth/register`` and ``/auth/login``.
Users are email-verified unless ``verified=False`` (the flag is set in the
database: driving the mailed code is what tests/integration/test_email_ownership.py
does), so they can pay and be paid by email.
"""

import uuid
from dataclasses import dataclass, field

from hoardrun import auth
from hoardrun.models import User
from hoardrun.security import hash_password

API = "/api/v1"
PASSWORD = "Zebra-Lantern-73"
_HASHES = {}


def password_hash(password=PASSWORD):
    """The argon2 hash of ``password``, made once per session."""
    if password not in _HASHES:
        _HASHES[password] = hash_password(password)
    return _HASHES[password]


def bearer(token):
    """The Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


def unique_email(prefix="user"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


@dataclass
class Person:
    """A user as a test drives it: id, email, password and a live token."""

    id: uuid.UUID
    email: str
    password: str
    token: str
    role: str = "user"
    profile: dict = field(default_factory=dict)

    @property
    def headers(self):
        return bearer(self.token)


def register(client, email=None, *, password=PASSWORD, first_name="Jane", last_name="Doe",
             headers=None, **fields):
    """``POST /auth/register``; returns the falcon test result (assert on it yourself)."""
    body = {"email": email or unique_email(), "password": password,
            "first_name": first_name, "last_name": last_name, **fields}
    return client.simulate_post(f"{API}/auth/register", json=body, headers=headers)


def login(client, email, password=PASSWORD, *, headers=None):
    """``POST /auth/login``; returns the falcon test result."""
    return client.simulate_post(f"{API}/auth/login",
                                json={"email": email, "password": password}, headers=headers)


def login_token(client, email, password=PASSWORD):
    """Log in through the API and return the token (asserts the login worked)."""
    result = login(client, email, password)
    assert result.status_code == 200, result.text
    return result.json["token"]


def make_user(client=None, *, role="user", status="active", email=None, password=PASSWORD,
              via_api=False, verified=True, **fields):
    """Create a user with a live token and return a ``Person``."""
    email = email or unique_email(role)
    if via_api:
        result = register(client, email, password=password, **fields)
        assert result.status_code == 201, result.text
        user_id = uuid.UUID(result.json["id"])
        if verified:
            User.update(email_verified=True).where(User.id == user_id).execute()
        if role != "user" or status != "active":
            # There is no API for granting roles; a test does it in the database.
            User.update(role=role, status=status).where(User.id == user_id).execute()
        token = login_token(client, email, password) if status == "active" else \
            auth.issue_token(user_id)[0]
        profile = {**result.json, "email_verified": verified}
    else:
        values = {"first_name": "Jane", "last_name": "Doe", **fields}
        user = User.create(email=email, password_hash=password_hash(password), role=role,
                           status=status, created_at=auth.utcnow(), updated_at=auth.utcnow(),
                           email_verified=verified, **values)
        user_id = user.id
        token, _ = auth.issue_token(user_id)
        profile = {}
    return Person(id=user_id, email=email, password=password, token=token, role=role,
                  profile=profile)
