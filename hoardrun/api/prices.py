"""The sandbox price list: ``GET /api/v1/prices`` for everyone signed in,
``PUT /api/v1/admin/prices/{symbol}`` for admins (create or update; audited).
"""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from spectree import Response

from .. import investments
from ..models import INVESTMENT_TYPES
from .middleware import replica_reads
from .openapi import BEARER, Problem, spec

TAGS = ["prices"]


class PriceOut(BaseModel):
    symbol: str
    name: str
    type: str
    currency: str
    price: str = Field(examples=["190.00000000"], description="One unit, 8 places")
    updated_at: datetime


class PriceList(BaseModel):
    items: list[PriceOut]


class PriceIn(BaseModel):
    """A new price; a new symbol also needs name, type and currency."""

    model_config = ConfigDict(extra="forbid")

    price: str = Field(pattern=r"^[0-9]{1,16}(\.[0-9]{1,8})?$", examples=["190.25"])
    name: str | None = Field(None, min_length=1, max_length=200)
    type: Literal[INVESTMENT_TYPES] | None = None  # type: ignore[valid-type]
    currency: str | None = Field(None, min_length=3, max_length=3)


def render_price(row):
    state = investments.price_state(row)
    state["price"] = format(state["price"], "f")
    return state


class Prices:
    """``/prices``: the price list."""

    @spec.validate(resp=Response(HTTP_200=PriceList, HTTP_401=Problem), security=BEARER,
                   tags=TAGS)
    @replica_reads
    def on_get(self, req, resp):
        """The sandbox price list, by symbol."""
        resp.media = {"items": [render_price(row) for row in investments.list_prices()]}


class AdminPrice:
    """``/admin/prices/{symbol}``: set one price (admin only)."""

    auth = "admin"

    @spec.validate(json=PriceIn, resp=Response(HTTP_200=PriceOut, HTTP_201=PriceOut,
                                               HTTP_401=Problem, HTTP_403=Problem,
                                               HTTP_422=Problem),
                   security=BEARER, tags=["admin"] + TAGS)
    def on_put(self, req, resp, symbol):
        """Create (201) or update (200) a symbol's price; its holdings are revalued.

        Admins only. A new symbol needs name, type and currency; a listed
        symbol keeps its type and currency.
        """
        body = req.context.json
        row, created = investments.set_price(symbol, body.price, name=body.name,
                                             type=body.type, currency=body.currency,
                                             actor_id=req.context.user.id,
                                             request_id=req.context.request_id)
        resp.status = 201 if created else 200
        resp.media = render_price(row)


def mount(app, settings):
    """Add the price-list routes to ``app``."""
    app.add_route("/api/v1/prices", Prices())
    app.add_route("/api/v1/admin/prices/{symbol}", AdminPrice())
