"""Domain errors: one root, one-line classes, mapped to HTTP problems once.

Each class carries a stable ``code`` (the tail of the problem ``type`` URI)
and the HTTP status it maps to, so the API layer never needs an if-chain and
the tasks can print ``str(error)`` as their one line.
"""


class HoardRunError(Exception):
    """Root of every error the domain raises on purpose."""

    code = "error"
    status = 400
    title = "Request failed"

    def __init__(self, detail=None, *, field=None, **extra):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.field = field
        self.extra = extra


class ConfigError(HoardRunError):
    code, status, title = "config-error", 500, "Invalid configuration"


class ValidationError(HoardRunError):
    code, status, title = "validation-error", 422, "Invalid input"


class AmountError(ValidationError):
    code, title = "invalid-amount", "Invalid amount"


class UnknownCurrency(ValidationError):
    code, title = "unknown-currency", "Unknown currency"


class NotFound(HoardRunError):
    code, status, title = "not-found", 404, "Not found"


class Conflict(HoardRunError):
    code, status, title = "conflict", 409, "Conflict"


class LedgerError(HoardRunError):
    """A money movement the rules refuse; nothing was written."""

    code, status, title = "ledger-error", 422, "Money movement refused"


class InsufficientFunds(LedgerError):
    code, title = "insufficient-funds", "Insufficient funds"


class AccountNotActive(LedgerError):
    code, title = "account-not-active", "Account is closed, frozen or not active"


class CurrencyMismatch(LedgerError):
    code, title = "currency-mismatch", "Currency mismatch"


class SameAccount(LedgerError):
    code, title = "same-account", "Source and destination are the same"


class ReversalNotAllowed(LedgerError):
    code, title = "reversal-not-allowed", "Entry cannot be reversed"


class DatabaseUnavailable(HoardRunError):
    code, status, title = "database-unavailable", 503, "Database unavailable"


class DecryptionError(HoardRunError):
    code, status, title = "decryption-error", 500, "Stored data could not be decrypted"
