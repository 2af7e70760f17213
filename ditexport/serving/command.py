"""`python -m ditexport serve`: its flags and its handler."""
from __future__ import annotations

import argparse
import signal
import threading

from ..precisions import PRECISIONS


def add_serve_parser(sub, positive_int, add_threads_argument) -> None:
    p = sub.add_parser("serve", help="serve an export over HTTP with Ray Serve",
                       description="Serve a validated export over HTTP (POST /v1/images, GET /v1/models, "
                                   "GET /healthz) with Ray Serve and step-level continuous batching.")
    p.add_argument("--export-dir", required=True, help="the validated export to serve")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="onnxruntime")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the export's graph (onnxruntime: int8 runs its CPU form on the CPU) or plan of this "
                        "precision; torch: fp32 or fp16 (default: fp32)")
    p.add_argument("--device", default="cpu", help="torch backend: cpu or cuda (default: cpu)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="split forwards above this batch")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1, loopback only)")
    p.add_argument("--num-replicas", type=positive_int, default=1, help="engine replicas (one per GPU)")
    p.add_argument("--address", default=None, help="an existing Ray cluster, e.g. ray://HOST:10001 "
                                                   "(default: a local Ray bound to loopback)")
    p.add_argument("--max-queue", type=positive_int, default=32, help="waiting requests per replica before 503")
    p.add_argument("--max-images", type=positive_int, default=16, help="images per request (default: 16)")
    p.add_argument("--max-steps", type=positive_int, default=1000, help="steps per request (default: 1000)")
    add_threads_argument(p)  # each replica's; as `sample`'s, so a request's images equal its lone `sample`
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..artifacts import read_manifest
    from ..threads import describe_threads, resolve_threads
    from .service import ServeSettings, deploy, shutdown

    # Decided here, where OMP_NUM_THREADS is the user's (Ray sets its own in its workers), as `sample` decides.
    hidden_size = read_manifest(args.export_dir).get("config", {}).get("hidden_size")
    threads, why = resolve_threads(args.torch_threads, hidden_size)
    settings = ServeSettings(export_dir=args.export_dir, backend=args.backend, precision=args.precision,
                             device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
                             max_images=args.max_images, max_steps=args.max_steps, threads=threads)
    seconds = deploy(settings, args.num_replicas, args.port, args.address, args.host)
    print(f"serving {args.export_dir} ({args.backend}, {args.precision}, {describe_threads(threads, why)} per "
          f"replica) on http://{args.host}:{args.port} with {args.num_replicas} replica(s); ready in {seconds:.1f} s; "
          f"Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, `docker stop`, systemd: as Ctrl-C
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return 0
