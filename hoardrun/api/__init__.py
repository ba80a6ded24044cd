"""The HTTP API: a falcon WSGI app built by ``create_app``."""

from .app import create_app, get_app

__all__ = ["create_app", "get_app"]
