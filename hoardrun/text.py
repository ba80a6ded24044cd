"""Free text a user writes and another person reads: one rule for all of it.

Names, descriptions, P2P notes and merchant names end up on someone else's
screen: a recipient's history, a statement, an admin page, a log line. A
control character (a terminal escape, a bell, a NUL), a bidi override that
reverses what follows, or another invisible format character would make that
text lie, so everything a user writes is printable text only (Python's
``str.isprintable``: no Unicode "Other" or non-space "Separator" characters),
trimmed, and of bounded length.
"""

from . import errors


def clean_text(value, field, *, max_length, required=False):
    """``value`` trimmed, if it is printable text of at most ``max_length`` characters.

    Optional text (``required=False``) that is missing or blank is None.
    Anything else is a ValidationError naming ``field``.
    """
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise errors.ValidationError(f"{field} must be text", field=field)
    text = value.strip()
    if not text and not required:
        return None
    if not 1 <= len(text) <= max_length:
        raise errors.ValidationError(
            f"{field} must be 1 to {max_length} characters" if required
            else f"{field} must be at most {max_length} characters", field=field)
    if not text.isprintable():
        raise errors.ValidationError(f"{field} must not contain control or invisible "
                                     "formatting characters", field=field)
    return text
