"""Errors a user can fix; the CLI prints them as one line, without a traceback."""


class DitexportError(Exception):
    """Base of every error that is the user's input, not a bug."""
