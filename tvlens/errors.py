"""The one error type tvlens raises for bad input.

Every check that guards a user's input raises :class:`TvlensError` with a message that
names the problem *and* the fix. It subclasses :class:`ValueError` so generic callers
that catch ``ValueError`` keep working; the CLI turns it into a one-line message and a
non-zero exit code instead of a traceback.
"""

from __future__ import annotations


class TvlensError(ValueError):
    """Bad input to tvlens: the message says what is wrong and how to fix it."""

