"""``/api/v1/accounts``: open, list, read, rename, make primary, close.

Balances are decimal strings in the account's currency: ``balance``,
``pending_holds`` (what active card authorizations reserve),
``available_balance`` (balance - pending holds) and ``available`` (what can
be spent: available balance + overdraft limit). An account that exists but is someone else's
answers 404, exactly like one that does not exist. Money moves through
``hoardrun.api.movements``; history is in ``hoardrun.api.history``.
"""

import uuid
from datetime import datetime
from typing import Literal

import falcon
from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import accounts
from ..auth import utcnow
from ..models import ACCOUNT_STATUSES, ACCOUNT_TYPES
from ..money import format_amount
from .middleware import replica_reads
from .openapi import BEARER, Problem, spec

API_PREFIX = "/api/v1"
PREFIX = f"{API_PREFIX}/accounts"
TAGS = ["accounts"]


class AccountIn(BaseModel):
    """A new account. The first account a user opens becomes their primary account."""

    model_config = ConfigDict(extra="forbid")

    type: Literal[ACCOUNT_TYPES]
    currency: str = Field(min_length=3, max_length=3, examples=["USD"],
                          description="ISO 4217 code, upper case")
    name: str = Field(min_length=1, max_length=100, examples=["Everyday"])


class AccountRename(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["Holiday fund"])


class AccountOut(BaseModel):
    """One of my accounts; amounts are decimal strings in its currency."""

    id: uuid.UUID
    account_number: str = Field(description="11 digits, the last a Luhn check digit")
    name: str
    type: Literal[ACCOUNT_TYPES]
    status: Literal[ACCOUNT_STATUSES]
    currency: str
    balance: str = Field(examples=["1250.00"])
    available_balance: str = Field(description="balance - pending_holds: what is mine once "
                                               "pending card authorizations are paid",
                                   examples=["1130.00"])
    pending_holds: str = Field(description="What active card authorizations reserve",
                               examples=["120.00"])
    available: str = Field(description="What can be spent now: available_balance + "
                                       "overdraft_limit", examples=["1630.00"])
    overdraft_limit: str
    is_primary: bool
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None


class AccountList(BaseModel):
    items: list[AccountOut]


def render_account(account):
    """``account`` (a model) as the ``AccountOut`` dict."""
    currency = account.currency
    held = int(getattr(account, "held", 0) or 0)
    return {
        "id": account.id, "account_number": account.account_number, "name": account.name,
        "type": account.type, "status": account.status, "currency": currency,
        "balance": format_amount(account.balance, currency),
        "available_balance": format_amount(account.balance - held, currency),
        "pending_holds": format_amount(held, currency),
        "available": format_amount(account.balance - held + account.overdraft_limit,
                                   currency),
        "overdraft_limit": format_amount(account.overdraft_limit, currency),
        "is_primary": bool(account.is_primary), "created_at": account.created_at,
        "updated_at": account.updated_at, "closed_at": account.closed_at,
    }


def location(account_id):
    """The URL of one account."""
    return f"{PREFIX}/{account_id}"


_ERRORS = dict(HTTP_401=Problem, HTTP_404=Problem)


class Accounts:
    """``/accounts``: my accounts; open a new one."""

    def __init__(self, clock):
        self.clock = clock

    @spec.validate(resp=Response(HTTP_200=AccountList, HTTP_401=Problem), security=BEARER,
                   tags=TAGS)
    @replica_reads
    def on_get(self, req, resp):
        """List my accounts, oldest first (closed ones too, by status)."""
        resp.media = {"items": [render_account(a)
                                for a in accounts.list_accounts(req.context.user.id,
                                                                now=self.clock())]}

    @spec.validate(json=AccountIn,
                   resp=Response(HTTP_201=AccountOut, HTTP_401=Problem, HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp):
        """Open an account; its number is generated (11 digits with a check digit)."""
        body = req.context.json
        account = accounts.open_account(req.context.user.id, body.type, body.currency,
                                        body.name, request_id=req.context.request_id)
        resp.status = falcon.HTTP_201
        resp.location = location(account.id)
        resp.media = render_account(account)


class Account:
    """``/accounts/{account_id}``: read or rename one of my accounts."""

    def __init__(self, clock):
        self.clock = clock

    @spec.validate(resp=Response(HTTP_200=AccountOut, **_ERRORS), security=BEARER, tags=TAGS)
    def on_get(self, req, resp, account_id):
        """One of my accounts with its balance and available funds."""
        resp.media = render_account(accounts.get_account(req.context.user.id, account_id,
                                                         now=self.clock()))

    @spec.validate(json=AccountRename,
                   resp=Response(HTTP_200=AccountOut, HTTP_422=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    def on_patch(self, req, resp, account_id):
        """Rename one of my accounts (closed accounts cannot be renamed)."""
        account = accounts.rename(req.context.user.id, account_id, req.context.json.name,
                                  request_id=req.context.request_id)
        resp.media = render_account(account)


class Primary:
    """``POST /accounts/{account_id}/primary``."""

    @spec.validate(resp=Response(HTTP_200=AccountOut, HTTP_422=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, account_id):
        """Make this active account my primary one (P2P payments land there).

        The previous primary account is demoted in the same transaction.
        """
        account = accounts.set_primary(req.context.user.id, account_id,
                                       request_id=req.context.request_id)
        resp.media = render_account(account)


class Close:
    """``POST /accounts/{account_id}/close``."""

    @spec.validate(resp=Response(HTTP_200=AccountOut, HTTP_422=Problem, **_ERRORS),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, account_id):
        """Close one of my accounts; only at a zero balance (else ``account-not-empty``)."""
        account = accounts.close(req.context.user.id, account_id,
                                 request_id=req.context.request_id)
        resp.media = render_account(account)


def mount(app, *, clock=utcnow):
    """Add the /accounts routes to ``app``; ``clock`` judges which holds have expired."""
    app.add_route(PREFIX, Accounts(clock))
    app.add_route(f"{PREFIX}/{{account_id:uuid}}", Account(clock))
    app.add_route(f"{PREFIX}/{{account_id:uuid}}/primary", Primary())
    app.add_route(f"{PREFIX}/{{account_id:uuid}}/close", Close())
