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

from .. import users
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
    phone_verified: bool
    kyc_verified: bool
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime


def render_user(user):
    """``user`` (a model) as the ``UserOut`` dict."""
    return {name: getattr(user, name) for name in UserOut.model_fields}


class ProfilePatch(BaseModel):
    """Fields to change; omitted fields stay. Email cannot be changed here."""

    model_config = ConfigDict(extra="forbid")

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

    def __init__(self, *, clock=utcnow):
        self.clock = clock

    @spec.validate(resp=Response(HTTP_200=UserOut, HTTP_401=Problem), security=BEARER,
                   tags=TAGS)
    def on_get(self, req, resp):
        """The caller's profile."""
        resp.media = render_user(users.get_user(req.context.user.id))

    @spec.validate(json=ProfilePatch, resp=Response(HTTP_200=UserOut, HTTP_401=Problem,
                                                    HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_patch(self, req, resp):
        """Change names, phone or country."""
        body = req.context.json
        changes = {name: getattr(body, name) for name in body.model_fields_set}
        user = users.update_profile(req.context.user.id, changes,
                                    request_id=req.context.request_id, now=self.clock())
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


def mount(app, *, clock=utcnow):
    """Add the /users/me routes to ``app``."""
    app.add_route(f"{API_PREFIX}/users/me", Me(clock=clock))
    app.add_route(f"{API_PREFIX}/users/me/password", Password(clock=clock))
