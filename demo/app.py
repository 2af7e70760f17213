"""The Gradio demo, runnable from a checkout: `python demo/app.py [--host H] [--port P] [--share] ...`.

The app itself lives in the package (`ditexport/demo_app/`) so that `python -m ditexport demo` works
from an installed wheel; this file only forwards its arguments to that sub-command.
"""
import sys
from pathlib import Path

try:
    from ditexport.cli import main
except ImportError:  # a checkout that was not pip-installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ditexport.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
