"""Development sample data: an admin, a demo user, two accounts and some history.

Idempotent: every piece is looked up before it is made, so a second run
changes nothing (and a run interrupted half-way is finished by the next one).
All money moves through the ledger, so ``invoke db.verify`` stays clean.
The passwords are fixed, documented development values; ``invoke db.sample``
refuses to run in production.
"""

from . import ledger
from .accounts import open_account
from .investments import load_default_prices
from .models import Account, Transaction, User
from .security import hash_password

ADMIN_EMAIL = "admin@hoardrun.com"
ADMIN_PASSWORD = "Vault-keeper-2718"
DEMO_EMAIL = "demo@hoardrun.com"
DEMO_PASSWORD = "Piggy-bank-3141"
CURRENCY = "USD"

# (kind, description, amount in cents). Each description marks its movement,
# which is how a second run knows it was already posted.
HISTORY = (
    ("deposit_checking", "Sample: salary", 250_000),
    ("deposit_savings", "Sample: opening savings deposit", 100_000),
    ("transfer_to_savings", "Sample: monthly savings", 50_000),
    ("withdraw_checking", "Sample: ATM withdrawal", 12_000),
)


def _user(label, email, password, first_name, last_name, role, report):
    user = User.get_or_none(User.email == email)
    if user is not None:
        report.append(f"{label} user {email}: already present (password unchanged)")
        return user
    user = User.create(email=email, first_name=first_name, last_name=last_name,
                       password_hash=hash_password(password), role=role, status="active",
                       country="US", email_verified=True)
    report.append(f"{label} user {email}: created (role {role})")
    report.append(f"{label} password: {password}")
    return user


def _account(user, type, name, is_primary, report):
    account = (Account.select()
               .where((Account.user == user.id)
                      & (Account.type == type)
                      & (Account.currency == CURRENCY))
               .order_by(Account.created_at)
               .first())
    if account is not None:
        return account
    account = open_account(user.id, type, CURRENCY, name, is_primary=is_primary)
    report.append(f"{type} account {account.account_number} ({CURRENCY}): opened")
    return account


def _posted(accounts, description):
    return (Transaction.select(Transaction.id)
            .where(Transaction.account.in_([a.id for a in accounts])
                   & (Transaction.description == description))
            .exists())


def load_sample_data():
    """Create the sample users, accounts and history that are missing.

    Returns the lines to show the operator, including the password of each
    user created by this call.
    """
    report = []
    _user("admin", ADMIN_EMAIL, ADMIN_PASSWORD, "Ada", "Admin", "admin", report)
    demo = _user("demo", DEMO_EMAIL, DEMO_PASSWORD, "Dana", "Demo", "user", report)
    checking = _account(demo, "checking", "Everyday checking", True, report)
    savings = _account(demo, "savings", "Savings", False, report)
    moves = {
        "deposit_checking": lambda d, a: ledger.deposit(checking.id, a, description=d),
        "deposit_savings": lambda d, a: ledger.deposit(savings.id, a, description=d),
        "transfer_to_savings": lambda d, a: ledger.transfer(demo.id, checking.id, savings.id, a,
                                                            description=d),
        "withdraw_checking": lambda d, a: ledger.withdraw(checking.id, a, description=d),
    }
    posted = 0
    for kind, description, amount in HISTORY:
        if not _posted((checking, savings), description):
            moves[kind](description, amount)
            posted += 1
    report.append(f"history: {posted} movement(s) posted through the ledger"
                  if posted else "history: already present")
    # Without a price list a new user could open an investment account and buy nothing.
    added = load_default_prices()
    report.append(f"prices: added {', '.join(added)}" if added else "prices: already listed")
    return report
