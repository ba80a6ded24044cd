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


class AccountNotEmpty(ValidationError):
    code, title = "account-not-empty", "Account balance is not zero"


class IdempotencyKeyReused(ValidationError):
    code, title = "idempotency-key-reused", "Idempotency key already used for another request"


class InvalidCursor(ValidationError):
    code, title = "invalid-cursor", "Invalid or tampered pagination cursor"


class DatabaseUnavailable(HoardRunError):
    code, status, title = "database-unavailable", 503, "Database unavailable"


class DecryptionError(HoardRunError):
    code, status, title = "decryption-error", 500, "Stored data could not be decrypted"


class CardNotActive(LedgerError):
    code, title = "card-not-active", "Card is frozen, inactive or cancelled"


class CardExpired(LedgerError):
    code, title = "card-expired", "Card has expired"


class ChannelDisabled(LedgerError):
    code, title = "channel-disabled", "Card channel is disabled"


class DailyLimitExceeded(LedgerError):
    code, title = "daily-limit-exceeded", "Card daily limit exceeded"


class MonthlyLimitExceeded(LedgerError):
    code, title = "monthly-limit-exceeded", "Card monthly limit exceeded"


class RefundExceedsPayment(LedgerError):
    code, title = "refund-exceeds-payment", "Refund exceeds the original payment"


class PaymentReversed(LedgerError):
    code, title = "payment-reversed", "Payment was reversed"


class InsufficientHolding(LedgerError):
    code, title = "insufficient-holding", "Not enough of the instrument held"


class Unauthorized(HoardRunError):
    """No valid credentials: a missing/expired/revoked token, or a wrong email or password."""

    code, status, title = "unauthorized", 401, "Authentication required"


class InvalidCredentials(Unauthorized):
    code, title = "invalid-credentials", "Email or password is incorrect"


class Forbidden(HoardRunError):
    code, status, title = "forbidden", 403, "Not allowed"


class UserNotActive(Forbidden):
    code, title = "user-not-active", "User is suspended or deactivated"


class TooManyAttempts(HoardRunError):
    """Locked after repeated failures; ``retry_after`` (seconds) says for how long."""

    code, status, title = "too-many-attempts", 429, "Too many failed attempts"


class NotInvestmentAccount(LedgerError):
    code, title = "not-investment-account", "Not an investment account"


class OrderTooSmall(LedgerError):
    code, title = "order-too-small", "Order is worth less than one minor unit"


class BackupError(HoardRunError):
    code, status, title = "backup-error", 500, "Backup or restore failed"


class InvalidCode(ValidationError):
    """A verification code or reset token that is wrong, expired, used or spent."""

    code, title = "invalid-code", "Invalid or expired code"


class EmailNotVerified(Forbidden):
    code, title = "email-not-verified", "Email address not verified"


class AuthorizationResolved(Conflict):
    code, title = "authorization-resolved", "Authorization already captured, voided or expired"


class AuthorizationExpired(Conflict):
    code, title = "authorization-expired", "Authorization has expired"


class CaptureExceedsAuthorization(LedgerError):
    code, title = "capture-exceeds-authorization", "Capture exceeds the authorized amount"


class BatchRefused(LedgerError):
    """A batch none of whose legs moved: ``legs`` names each failing leg (index, type, detail)."""

    code, title = "batch-refused", "Batch refused: no leg was made"
