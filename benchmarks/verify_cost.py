"""Cost of verifying an export on load (docs/export.md, "Guarantees"): a real export and a synthetic file of
DiT-XL/2's fp32 graph size, each hashed on a first load and then remembered.

    python benchmarks/verify_cost.py exports/digits [--xl-dir /tmp/verify-xl] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

XL_DATA_BYTES = 2_700_000_000  # DiT-XL/2's fp32 weights (model.onnx.data)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="a complete export, e.g. exports/digits (its graphs are read, not changed)")
    parser.add_argument("--xl-dir", default=None, help="where to write the 2.7 GB synthetic graph (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic graph for another run")
    args = parser.parse_args()
    # A private cache, so the first load really hashes.
    os.environ["DITEXPORT_CACHE_DIR"] = tempfile.mkdtemp(prefix="verify-cost-cache-")
    from ditexport import verification
    from ditexport.artifacts import file_record, write_manifest

    export = Path(args.export_dir)
    graphs = [n for n in ("model.onnx", "cond.onnx") if (export / n).is_file()]
    size = sum((export / n).stat().st_size for n in graphs)
    for name in graphs:
        (export / name).read_bytes()  # page-cached, as right after a build
    first = timed(lambda: verification.verify_export(export, graphs))
    later = timed(lambda: verification.verify_export(export, graphs))
    print(f"{export}: {' + '.join(graphs)} ({size / 1e6:.1f} MB): first load {first * 1000:.1f} ms, "
          f"remembered {later * 1000:.1f} ms")

    xl = Path(args.xl_dir or tempfile.mkdtemp(prefix="verify-xl-"))
    xl.mkdir(parents=True, exist_ok=True)
    data = xl / "model.onnx.data"
    if not data.is_file() or data.stat().st_size != XL_DATA_BYTES:
        block = os.urandom(1 << 20)  # SHA-256 costs the same whatever the bytes
        with open(data, "wb") as f:
            for _ in range(XL_DATA_BYTES // len(block)):
                f.write(block)
            f.write(block[:XL_DATA_BYTES % len(block)])
    (xl / "model.onnx").write_bytes(os.urandom(350_000))
    recorded = timed(lambda: write_manifest(xl, {"config": {}, "validation": {"passed": True}, "files": {
        name: file_record(xl / name) for name in ("model.onnx", "model.onnx.data")}}))
    time.sleep(verification.RACY_SECONDS + 0.5)  # a real export's files have long settled when it is loaded
    first = timed(lambda: verification.verify_export(xl, ["model.onnx"]))
    later = timed(lambda: verification.verify_export(xl, ["model.onnx"]))
    print(f"synthetic DiT-XL/2 fp32 graph (model.onnx 0.35 MB + model.onnx.data {XL_DATA_BYTES / 1e9:.2f} GB, "
          f"page-cached): hashing at build time {recorded:.2f} s, first load {first:.2f} s, "
          f"remembered {later * 1000:.1f} ms")
    if not args.keep:
        shutil.rmtree(xl, ignore_errors=True)


if __name__ == "__main__":
    main()
