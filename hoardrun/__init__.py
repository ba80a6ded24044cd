"""HoardRun: the backend of a personal-finance app."""

__version__ = "0.1.0"
