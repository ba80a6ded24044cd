"""``/api/v1/users/me``: the caller's own profile and password.

There is no route to another user's profile: ``me`` is always the token's
user, so nobody can even name someone else's id here.
"""

import uuid
from datetime import datetime
from typing import Literal

import falcon
from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import errors, users, verification
from ..auth import utcnow
from ..models import USER_ROLES, USER_STATUSES
from .openapi import BEARER, Problem, spec

API_PREFIX = "/api/v1"
TAGS = ["users"]


class UserOut(BaseModel):
    """A user's profile (never the password or its hash)."""

    id: uuid.UUID
    email: str
    first_name: str
    last_name: str
    phone: str | None
    country: str | None
    role: Literal[USER_ROLES]
    status: Literal[USER_STATUSES]
    email_verified: bool
    pending_email: str | None = Field(description="A new address waiting for its code; "
                                      "``email`` stays until it is verified")
    phone_verified: bool
    kyc_verified: bool
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime


def render_user(user):
    """``user`` (a model) as the ``UserOut`` dict."""
    return {name: getattr(user, name) for name in UserOut.model_fields}


class ProfilePatch(BaseModel):
    """Fields to change; omitted fields stay.

    A new ``email`` becomes ``pending_email`` and gets a code; it replaces
    ``email`` only once verified (``/auth/verify-email``).
    """

    model_config = ConfigDict(extra="forbid")

    email: str | None = Field(default=None, max_length=254)

    first_name: str | None = Field(default=None, min_length=1, max_length=100)
    last_name: str | None = Field(default=None, min_length=1, max_length=100)
    phone: str | None = Field(default=None, max_length=32, description="E.164; null clears it")
    country: str | None = Field(default=None, min_length=2, max_length=2,
                                description="ISO 3166-1 alpha-2; null clears it")


class PasswordChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)


class Me:
    """``GET``/``PATCH /api/v1/users/me``."""

    def __init__(self, *, settings=None, mailer=None, clock=utcnow):
        self.settings = settings
        self.mailer = mailer
        self.clock = clock

    @spec.validate(resp=Response(HTTP_200=UserOut, HTTP_401=Problem), security=BEARER,
                   tags=TAGS)
    def on_get(self, req, resp):
        """The caller's profile."""
        resp.media = render_user(users.get_user(req.context.user.id))

    @spec.validate(json=ProfilePatch, resp=Response(HTTP_200=UserOut, HTTP_401=Problem,
                                                    HTTP_409=Problem, HTTP_422=Problem,
                                                    HTTP_429=Problem),
                   security=BEARER, tags=TAGS)
    def on_patch(self, req, resp):
        """Change names, phone or country, or ask to change the email address.

        A new email is only pending (``pending_email``) until the code mailed
        to it is entered at ``/auth/verify-email``; payments keep going to the
        current address until then. 409 if another user has it.
        """
        body = req.context.json
        changes = {name: getattr(body, name) for name in body.model_fields_set}
        if "email" in changes and changes["email"] is None:
            raise errors.ValidationError("email cannot be null", field="email")
        user = verification.update_me(req.context.user.id, changes, settings=self.settings,
                                      mailer=self.mailer, request_id=req.context.request_id,
                                      now=self.clock())
        resp.media = render_user(user)


class Password:
    """``POST /api/v1/users/me/password``."""

    def __init__(self, *, clock=utcnow):
        self.clock = clock

    @spec.validate(json=PasswordChangeIn,
                   resp=Response("HTTP_204", HTTP_401=Problem, HTTP_422=Problem,
                                 HTTP_429=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Change the password; every other token is revoked, this one keeps working.

        A wrong current password is a 422 on ``current_password`` and counts
        towards the login lockout.
        """
        body = req.context.json
        users.change_password(req.context.user.id, body.current_password, body.new_password,
                              keep_token=req.context.token,
                              request_id=req.context.request_id, now=self.clock())
        resp.status = falcon.HTTP_204


def mount(app, *, settings, mailer, clock=utcnow):
    """Add the /users/me routes to ``app``."""
    app.add_route(f"{API_PREFIX}/users/me", Me(settings=settings, mailer=mailer, clock=clock))
    app.add_route(f"{API_PREFIX}/users/me/password", Password(clock=clock))
