"""`python -m ditexport`: the command-line interface (argparse sub-commands, kebab-case flags).

`parser` declares the commands and flags, `options` turns flags into library objects, `sampling` and
`commands` run the commands by calling library functions.
"""
from __future__ import annotations

import os
import sys

from ..errors import DitexportError, one_line
from ..logs import configure as configure_logging
from .commands import train_digits_out
from .parser import SAMPLERS, build_parser

__all__ = ["SAMPLERS", "USER_ERRORS", "build_parser", "main", "train_digits_out"]


# Errors that are the user's to fix, or the file system's (full, read-only, missing: any write can meet them):
# printed as one line, exit code 2. Anything else is a bug and shows its traceback. DITEXPORT_DEBUG=1 shows
# tracebacks for these too.
USER_ERRORS = (DitexportError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        if os.environ.get("DITEXPORT_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
