"""Errors a user can fix; the CLI prints them as one line, without a traceback."""
from __future__ import annotations


class DitexportError(Exception):
    """Base of every error that is the user's input, not a bug."""


class UsageError(DitexportError, ValueError):
    """A setting out of range or inconsistent with the model (a ValueError too, for callers that catch those);
    `field` names the setting where one is at fault (a SamplerConfig field, "labels", "seed")."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def one_line(error: BaseException) -> str:
    """An error as one line: OSErrors name their path and cause ("cannot write x.png: Read-only file system")."""
    if isinstance(error, OSError) and not isinstance(error, DitexportError) and error.strerror:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        return f"{paths}: {error.strerror}" if paths else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def shown(value, limit: int = 60) -> str:
    """A value a client sent, for an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summary(error: BaseException) -> str:
    """A foreign exception (TensorRT's, Polygraphy's) as its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
