"""Errors a user can fix, raised where the problem is found and reported by the command line as one line.

``UsageError`` is for a bad command-line value or combination (the message names the flag). Everything else a
user can cause is a ``ValueError`` (a bad config key, a corrupt checkpoint, an unreadable input file: the message
names the file or key and the reason) or an ``OSError`` (a missing file, a read-only destination). The CLI
(``selfforcing.cli.main``) prints these as ``selfforcing COMMAND: MESSAGE`` and exits with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line value or combination that cannot be used; the message names the flag and the reason."""


def reason(err: BaseException) -> str:
    """A one-line reason for ``err``: its message, or its type's name when the message is empty."""
    text = " ".join(str(err).split())
    return text or type(err).__name__
