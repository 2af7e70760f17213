"""The backend a service replica serves, opened exactly as `python -m ditexport sample` opens it."""
from __future__ import annotations

import argparse


def open_served_backend(export_dir, backend: str = "onnxruntime", precision: str = "fp32", device: str = "cpu",
                        max_batch: int | None = None, model: str | None = None, checkpoint: str | None = None):
    """The backend of `sample --export-dir ... --backend ...`: the CLI's own path (verification on load, the
    export's read lock). The one place to swap for `backends.open.open_backend` when that exists."""
    from .. import cli

    args = argparse.Namespace(export_dir=str(export_dir), backend=backend, precision=precision, device=device,
                              max_batch=max_batch, model=model, checkpoint=checkpoint, config=None,
                              image_size=None, cuda_graph=False, torch_compile=None)
    cli.check_backend_available(args)
    model, _source = cli.load_cli_model(args)
    return cli.make_backend(args, model)
