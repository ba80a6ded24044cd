"""``/api/v1/admin``: users, account freezes, ledger reversals and the audit log.

Every resource here has ``auth = "admin"``: the authentication middleware
answers 401 without a valid token and 403 for a user who is not an admin,
before any responder runs. Admins see every user's data; each action is
audited with the admin as actor.
"""

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import admin, audit, users
from ..auth import utcnow
from ..models import ACCOUNT_STATUSES, DIRECTIONS, USER_ROLES, USER_STATUSES
from ..money import format_amount
from ..cursors import DEFAULT_LIMIT, MAX_LIMIT
from .openapi import BEARER, Problem, spec
from .users import UserOut, render_user

API_PREFIX = "/api/v1/admin"
TAGS = ["admin"]


# --------------------------------------------------------------------------
# Schemas

class AdminUserOut(UserOut):
    """A user as an admin sees it: the profile plus the login lockout state."""

    failed_logins: int
    locked_until: datetime | None


class AdminUserList(BaseModel):
    items: list[AdminUserOut]
    next_cursor: str | None = None


class AdminUsersQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str | None = Field(default=None, max_length=254,
                              description="Part of the email address, any case")
    status: Literal[USER_STATUSES] | None = None
    role: Literal[USER_ROLES] | None = None
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(default=None, max_length=512)


class ReasonIn(BaseModel):
    """Why (kept in the audit row)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


class AdminAccountOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID | None
    account_number: str
    name: str
    type: str
    status: Literal[ACCOUNT_STATUSES]
    currency: str
    balance: str = Field(description="Decimal string in the account's currency")
    updated_at: datetime


class ReverseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(default=None, min_length=1, max_length=500)


class ReversalEntryOut(BaseModel):
    """One new ledger entry of a reversal."""

    id: uuid.UUID
    account_id: uuid.UUID
    movement_id: uuid.UUID
    type: str
    direction: Literal[DIRECTIONS]
    amount: str = Field(description="Decimal string in the entry's currency")
    currency: str
    balance_after: str
    description: str | None
    reference: str
    reverses_id: uuid.UUID | None
    status: str
    created_at: datetime


class ReversalOut(BaseModel):
    movement_id: uuid.UUID
    entries: list[ReversalEntryOut]


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entity_type: str | None = Field(default=None, max_length=32)
    entity_id: str | None = Field(default=None, max_length=64)
    actor_id: uuid.UUID | None = None
    action: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(default=None, max_length=512)


class AuditEntryOut(BaseModel):
    id: uuid.UUID
    actor_id: uuid.UUID | None
    action: str
    entity_type: str
    entity_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str | None
    created_at: datetime


class AuditList(BaseModel):
    items: list[AuditEntryOut]
    next_cursor: str | None = None


# --------------------------------------------------------------------------
# Rendering

def render_admin_user(user):
    return {**render_user(user), "failed_logins": user.failed_logins,
            "locked_until": user.locked_until}


def render_account(account):
    return {"id": account.id, "user_id": account.user_id,
            "account_number": account.account_number, "name": account.name,
            "type": account.type, "status": account.status, "currency": account.currency,
            "balance": format_amount(account.balance, account.currency),
            "updated_at": account.updated_at}


def render_entry(entry):
    return {"id": entry.id, "account_id": entry.account_id, "movement_id": entry.movement_id,
            "type": entry.type, "direction": entry.direction,
            "amount": format_amount(entry.amount, entry.currency), "currency": entry.currency,
            "balance_after": format_amount(entry.balance_after, entry.currency),
            "description": entry.description, "reference": entry.reference,
            "reverses_id": entry.reverses_id, "status": entry.status,
            "created_at": entry.created_at}


def render_audit(row):
    return {"id": row.id, "actor_id": row.actor_id, "action": row.action,
            "entity_type": row.entity_type, "entity_id": row.entity_id,
            "before": None if row.before is None else audit.shown(json.loads(row.before)),
            "after": None if row.after is None else audit.shown(json.loads(row.after)),
            "request_id": row.request_id, "created_at": row.created_at}


def _reason(req):
    body = req.context.json
    return body.reason if body is not None else None


# --------------------------------------------------------------------------
# Resources

class AdminResource:
    """Base: admin only, with the clock tests can pin."""

    auth = "admin"

    def __init__(self, *, secret, clock=utcnow):
        self.secret = secret  # signs the list cursors
        self.clock = clock


class Users(AdminResource):
    """``GET /api/v1/admin/users``."""

    @spec.validate(query=AdminUsersQuery,
                   resp=Response(HTTP_200=AdminUserList, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_get(self, req, resp):
        """Users newest first; filter by email substring, status and role."""
        q = req.context.query
        page = users.list_users(secret=self.secret, email=q.email, status=q.status, role=q.role,
                                limit=q.limit, cursor=q.cursor)
        resp.media = {"items": [render_admin_user(u) for u in page.items],
                      "next_cursor": page.next_cursor}


class User(AdminResource):
    """``GET /api/v1/admin/users/{user_id}``."""

    @spec.validate(resp=Response(HTTP_200=AdminUserOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_404=Problem),
                   security=BEARER, tags=TAGS)
    def on_get(self, req, resp, user_id):
        """One user."""
        resp.media = render_admin_user(users.get_user(user_id))


class UserSuspension(AdminResource):
    """``POST /api/v1/admin/users/{user_id}/suspend``."""

    @spec.validate(json=ReasonIn,
                   resp=Response(HTTP_200=AdminUserOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_404=Problem, HTTP_409=Problem, HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, user_id):
        """Suspend a user: login refused (403) and every token stops working at once."""
        user = users.suspend(user_id, actor_id=req.context.user.id, reason=_reason(req),
                             request_id=req.context.request_id, now=self.clock())
        resp.media = render_admin_user(user)


class UserReactivation(AdminResource):
    """``POST /api/v1/admin/users/{user_id}/reactivate``."""

    @spec.validate(json=ReasonIn,
                   resp=Response(HTTP_200=AdminUserOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_404=Problem, HTTP_409=Problem, HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, user_id):
        """Reactivate a suspended user (old tokens stay revoked; they log in again)."""
        user = users.reactivate(user_id, actor_id=req.context.user.id, reason=_reason(req),
                                request_id=req.context.request_id, now=self.clock())
        resp.media = render_admin_user(user)


class AccountFreeze(AdminResource):
    """``POST /api/v1/admin/accounts/{account_id}/freeze``."""

    @spec.validate(json=ReasonIn,
                   resp=Response(HTTP_200=AdminAccountOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_404=Problem, HTTP_409=Problem, HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, account_id):
        """Freeze an active account: no money moves in or out until unfrozen."""
        account = admin.freeze_account(account_id, actor_id=req.context.user.id,
                                       reason=_reason(req), request_id=req.context.request_id,
                                       now=self.clock())
        resp.media = render_account(account)


class AccountUnfreeze(AdminResource):
    """``POST /api/v1/admin/accounts/{account_id}/unfreeze``."""

    @spec.validate(json=ReasonIn,
                   resp=Response(HTTP_200=AdminAccountOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_404=Problem, HTTP_409=Problem, HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, account_id):
        """Unfreeze a frozen account."""
        account = admin.unfreeze_account(account_id, actor_id=req.context.user.id,
                                         reason=_reason(req),
                                         request_id=req.context.request_id, now=self.clock())
        resp.media = render_account(account)


class Reversal(AdminResource):
    """``POST /api/v1/admin/transactions/{entry_id}/reverse``."""

    @spec.validate(json=ReverseIn,
                   resp=Response(HTTP_200=ReversalOut, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_404=Problem, HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_post(self, req, resp, entry_id):
        """Reverse a ledger entry's movement with a new, opposite pair of entries.

        The original entries are never edited. An entry can be reversed once;
        a reversal cannot be reversed (422 ``reversal-not-allowed``).
        """
        body = req.context.json
        entries = admin.reverse_entry(entry_id, actor_id=req.context.user.id,
                                      description=body.description if body else None,
                                      request_id=req.context.request_id)
        resp.media = {"movement_id": entries[0].movement_id,
                      "entries": [render_entry(e) for e in entries]}


class Audit(AdminResource):
    """``GET /api/v1/admin/audit``."""

    @spec.validate(query=AuditQuery,
                   resp=Response(HTTP_200=AuditList, HTTP_401=Problem, HTTP_403=Problem,
                                 HTTP_422=Problem),
                   security=BEARER, tags=TAGS)
    def on_get(self, req, resp):
        """The audit log newest first; filter by entity, actor and action."""
        q = req.context.query
        page = admin.list_audit(secret=self.secret, entity_type=q.entity_type,
                                entity_id=q.entity_id, actor_id=q.actor_id, action=q.action,
                                limit=q.limit, cursor=q.cursor)
        resp.media = {"items": [render_audit(r) for r in page.items],
                      "next_cursor": page.next_cursor}


def mount(app, settings, *, clock=utcnow):
    """Add the /admin routes to ``app``."""
    routes = {
        "/users": Users, "/users/{user_id:uuid}": User,
        "/users/{user_id:uuid}/suspend": UserSuspension,
        "/users/{user_id:uuid}/reactivate": UserReactivation,
        "/accounts/{account_id:uuid}/freeze": AccountFreeze,
        "/accounts/{account_id:uuid}/unfreeze": AccountUnfreeze,
        "/transactions/{entry_id:uuid}/reverse": Reversal,
        "/audit": Audit,
    }
    for path, resource in routes.items():
        app.add_route(API_PREFIX + path, resource(secret=settings.secret_key, clock=clock))
