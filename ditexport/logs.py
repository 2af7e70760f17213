"""One logger for the package, "ditexport" (children "ditexport.build", "ditexport.demo", ...).

Library code logs and never prints; the CLI installs the one handler that shows records as plain lines on the
current sys.stdout, at INFO (WARNING with -q, DEBUG with -v). Progress bars stay tqdm's, on stderr.
"""
from __future__ import annotations

import logging
import sys

ROOT = "ditexport"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def get_logger(name: str = "") -> logging.Logger:
    """The package logger, or its child `ditexport.<name>`."""
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


class CurrentStdoutHandler(logging.StreamHandler):
    """Writes each record to the sys.stdout of the moment, so capsys and redirect_stdout see the lines."""

    def __init__(self):
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the current sys.stdout is always used
        pass


def configure(verbosity: int = 0) -> None:
    """Shows the package's records on stdout at the level of `verbosity` (-1 quiet, 0 normal, 1 verbose)."""
    logger = get_logger()
    if not any(isinstance(h, CurrentStdoutHandler) for h in logger.handlers):
        logger.addHandler(CurrentStdoutHandler())
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
