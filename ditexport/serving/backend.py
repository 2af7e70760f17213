"""The backend a service replica serves, opened as `python -m ditexport sample` opens it."""
from __future__ import annotations

from pathlib import Path


def open_served_backend(export_dir, backend: str = "onnxruntime", precision: str = "fp32", device: str = "cpu",
                        max_batch: int | None = None):
    """`backends.open.open_backend` on a validated export: its graphs or plans are checked against the manifest
    under the export's read lock; the torch backend runs the weights the export was built from (refused when
    they changed since)."""
    from ..artifacts import read_manifest
    from ..backends.open import check_available, open_backend
    from ..source import ModelSource

    check_available(backend, device, precision)
    if backend == "torch":
        manifest = read_manifest(Path(export_dir))
        model = ModelSource.from_manifest(manifest).load_recorded(manifest)
        return open_backend("torch", precision, model=model, device=device, max_batch=max_batch)
    return open_backend(backend, precision, export_dir=export_dir, device=device, max_batch=max_batch)
