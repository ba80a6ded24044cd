"""Bearer authentication for ``/api/v1`` and the ``/api/v1/auth`` routes.

How a resource says who may call it: a class attribute ``auth``.

* absent or ``"user"``: any active user with a valid token (the default, so
  a new resource is never public by accident);
* ``"admin"``: an active user whose role is ``admin`` (others get 403);
* ``None``: public (register, login, forgot-password and reset-password only).

``Authentication`` (middleware, installed by ``create_app``) enforces it for
every resource under ``/api/v1`` before the responder runs: it reads
``Authorization: Bearer <token>``, calls ``hoardrun.auth.authenticate`` (one
SQL statement) and sets ``req.context.user`` (a ``CurrentUser``) and
``req.context.token``. A missing, malformed, unknown, expired or revoked
token, or one of a suspended user, is a 401 problem with
``WWW-Authenticate: Bearer``. CORS preflight (``OPTIONS``) is never asked for
a token. Declare ``security=BEARER`` in ``spec.validate`` of a protected
responder so the OpenAPI document says so too.
"""

from datetime import datetime
from typing import Literal

import falcon
from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import auth as authn
from .. import errors, verification
from .openapi import BEARER, Problem, spec
from .users import UserOut, render_user

API_PREFIX = "/api/v1"
TAGS = ["auth"]


def bearer_token(req):
    """The token in ``Authorization: Bearer <token>``, or None."""
    header = req.get_header("Authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authentication:
    """Middleware: see the module docstring. One instance serves every thread."""

    def __init__(self, *, clock=authn.utcnow, prefix=API_PREFIX):
        self.clock = clock
        self.prefix = prefix

    def process_resource(self, req, resp, resource, params):
        if resource is None or req.method == "OPTIONS":
            return
        if not (req.path == self.prefix or req.path.startswith(self.prefix + "/")):
            return
        policy = getattr(resource, "auth", "user")
        if policy is None:
            return
        token = bearer_token(req)
        if token is None:
            raise errors.Unauthorized("a bearer token is required: log in at "
                                      f"{self.prefix}/auth/login")
        user = authn.authenticate(token, now=self.clock())
        if user is None:
            raise errors.Unauthorized("the token is invalid, expired or revoked")
        req.context.user = user
        req.context.token = token
        if policy == "admin" and not user.is_admin:
            raise errors.Forbidden("this route is for administrators only")


# --------------------------------------------------------------------------
# Schemas

class RegisterIn(BaseModel):
    """A new user. The password policy and field rules are checked by the server."""

    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=254, examples=["jane@example.com"])
    password: str = Field(max_length=1024, description="10-128 characters, a letter and a "
                          "digit or symbol, not a common password, not the email")
    first_name: str = Field(min_length=1, max_length=100)
    last_name: str = Field(min_length=1, max_length=100)
    phone: str | None = Field(default=None, max_length=32, examples=["+14155550123"],
                              description="E.164 (spaces and dashes are dropped)")
    country: str | None = Field(default=None, min_length=2, max_length=2, examples=["GB"],
                                description="ISO 3166-1 alpha-2")


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=254)
    password: str = Field(max_length=1024)


class VerifyEmailIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(max_length=16, examples=["042917"],
                      description="The 6-digit code from the verification email")


class ForgotPasswordIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=254, examples=["jane@example.com"])


class ResetPasswordIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=128, description="The token from the reset email")
    new_password: str = Field(max_length=1024)


class Accepted(BaseModel):
    """The request was taken; what happens next arrives by email."""

    detail: str


class VerificationSentOut(Accepted):
    email: str = Field(description="Where the code was sent")


FORGOT_ACCEPTED = ("If a verified account uses this address, a reset token is on its way "
                   "to it.")


class TokenOut(BaseModel):
    """An opaque bearer token: send it as ``Authorization: Bearer <token>``."""

    token: str
    token_type: Literal["Bearer"]
    expires_at: datetime


# --------------------------------------------------------------------------
# Resources

class Register:
    """``POST /api/v1/auth/register``."""

    auth = None

    def __init__(self, *, settings, mailer, clock=authn.utcnow):
        self.settings = settings
        self.mailer = mailer
        self.clock = clock

    @spec.validate(json=RegisterIn,
                   resp=Response(HTTP_201=UserOut, HTTP_409=Problem, HTTP_422=Problem),
                   tags=TAGS)
    def on_post(self, req, resp):
        """Sign up; the email must not be taken (in any letter case).

        The user can log in at once, with an unverified email: a 6-digit code
        is mailed to it, to be entered at ``/auth/verify-email``.
        """
        body = req.context.json
        user = verification.register(body.email, body.password, body.first_name,
                                     body.last_name, phone=body.phone, country=body.country,
                                     settings=self.settings, mailer=self.mailer,
                                     request_id=req.context.request_id, now=self.clock())
        resp.status = falcon.HTTP_201
        resp.location = f"{API_PREFIX}/users/me"
        resp.media = render_user(user)


class Login:
    """``POST /api/v1/auth/login``."""

    auth = None

    def __init__(self, *, token_ttl, clock=authn.utcnow):
        self.token_ttl = token_ttl
        self.clock = clock

    @spec.validate(json=LoginIn,
                   resp=Response(HTTP_200=TokenOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_422=Problem, HTTP_429=Problem),
                   tags=TAGS)
    def on_post(self, req, resp):
        """Exchange email and password for a bearer token.

        A wrong password and an unknown email give the same 401. Five failures
        in a row lock the email for 15 minutes (429 with Retry-After). A
        suspended or deactivated user gets 403.
        """
        body = req.context.json
        _, token, expires_at = authn.login(body.email, body.password, ttl=self.token_ttl,
                                          request_id=req.context.request_id,
                                          now=self.clock())
        resp.media = {"token": token, "token_type": "Bearer", "expires_at": expires_at}
        # A token must not sit in a shared or browser cache.
        resp.cache_control = ["no-store"]


class Logout:
    """``POST /api/v1/auth/logout``."""

    def __init__(self, *, clock=authn.utcnow):
        self.clock = clock

    @spec.validate(resp=Response("HTTP_204", HTTP_401=Problem), security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Revoke the token this request carries; other sessions stay logged in."""
        authn.logout(req.context.user.id, req.context.token,
                     request_id=req.context.request_id, now=self.clock())
        resp.status = falcon.HTTP_204


class _Mailing:
    def __init__(self, *, settings, mailer, clock=authn.utcnow):
        self.settings = settings
        self.mailer = mailer
        self.clock = clock


class VerifyEmail(_Mailing):
    """``POST /api/v1/auth/verify-email``."""

    @spec.validate(json=VerifyEmailIn,
                   resp=Response(HTTP_200=UserOut, HTTP_401=Problem, HTTP_409=Problem,
                                 HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Confirm my email address (or the new one I asked for) with the mailed code.

        Codes last 24 hours, work once, and only the newest counts; five wrong
        tries spend a code (422 ``invalid-code``). 409 if nothing is waiting
        to be verified.
        """
        user = verification.verify_email(req.context.user.id, req.context.json.code,
                                         settings=self.settings, mailer=self.mailer,
                                         request_id=req.context.request_id, now=self.clock())
        resp.media = render_user(user)


class ResendVerification(_Mailing):
    """``POST /api/v1/auth/resend-verification``."""

    @spec.validate(resp=Response(HTTP_202=VerificationSentOut, HTTP_401=Problem,
                                 HTTP_409=Problem, HTTP_429=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Mail a new code to my unverified (or pending) address; older codes stop working.

        At most one a minute and five an hour (429 with Retry-After).
        """
        email = verification.resend_verification(
            req.context.user.id, settings=self.settings, mailer=self.mailer,
            request_id=req.context.request_id, now=self.clock())
        resp.status = falcon.HTTP_202
        resp.media = {"detail": "a new verification code is on its way", "email": email}


class ForgotPassword(_Mailing):
    """``POST /api/v1/auth/forgot-password``."""

    auth = None

    @spec.validate(json=ForgotPasswordIn, resp=Response(HTTP_202=Accepted, HTTP_422=Problem),
                   tags=TAGS)
    def on_post(self, req, resp):
        """Ask for a password-reset token by email.

        Always the same 202, in the same time, whether or not the address
        has an account: the token goes only to a verified address of an
        active user (at most five an hour; earlier tokens keep working).
        """
        verification.forgot_password(req.context.json.email, settings=self.settings,
                                     mailer=self.mailer, now=self.clock())
        resp.status = falcon.HTTP_202
        resp.media = {"detail": FORGOT_ACCEPTED}


class ResetPassword(_Mailing):
    """``POST /api/v1/auth/reset-password``."""

    auth = None

    @spec.validate(json=ResetPasswordIn, resp=Response("HTTP_204", HTTP_422=Problem),
                   tags=TAGS)
    def on_post(self, req, resp):
        """Set a new password with the mailed token; every session is logged out.

        The token works once (all other reset tokens of the user die with it)
        and clears a login lockout. A weak password is a 422 on
        ``new_password`` and leaves the token usable.
        """
        body = req.context.json
        verification.reset_password(body.token, body.new_password, settings=self.settings,
                                    mailer=self.mailer, request_id=req.context.request_id,
                                    now=self.clock())
        resp.status = falcon.HTTP_204


def mount(app, settings, *, mailer, clock=authn.utcnow):
    """Add the /auth routes to ``app``."""
    mailing = dict(settings=settings, mailer=mailer, clock=clock)
    app.add_route(f"{API_PREFIX}/auth/register", Register(**mailing))
    app.add_route(f"{API_PREFIX}/auth/login", Login(token_ttl=settings.token_ttl, clock=clock))
    app.add_route(f"{API_PREFIX}/auth/logout", Logout(clock=clock))
    app.add_route(f"{API_PREFIX}/auth/verify-email", VerifyEmail(**mailing))
    app.add_route(f"{API_PREFIX}/auth/resend-verification", ResendVerification(**mailing))
    app.add_route(f"{API_PREFIX}/auth/forgot-password", ForgotPassword(**mailing))
    app.add_route(f"{API_PREFIX}/auth/reset-password", ResetPassword(**mailing))
