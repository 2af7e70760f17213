"""`python -m ditexport serve`: its flags and its handler."""
from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import fields

from ..limits import RequestLimits, add_limit_arguments
from .settings import ServeSettings, ServiceLimits

from ..precisions import PRECISIONS


def add_serve_parser(sub, positive_int, add_threads_argument) -> None:
    p = sub.add_parser("serve", help="serve an export over HTTP with Ray Serve",
                       description="Serve a validated export over HTTP (POST /v1/images, GET /v1/models, "
                                   "GET /healthz) with Ray Serve and step-level continuous batching.")
    p.add_argument("--export-dir", required=True, help="the validated export to serve")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default=ServeSettings.backend)
    p.add_argument("--precision", choices=PRECISIONS, default=ServeSettings.precision,
                   help="the export's graph (onnxruntime: int8 runs its CPU form on the CPU) or plan of this "
                        f"precision; torch: fp32 or fp16 (default: {ServeSettings.precision})")
    p.add_argument("--device", default=ServeSettings.device, help="torch backend: cpu or cuda (default: cpu)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="split forwards above this batch")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1, loopback only)")
    p.add_argument("--num-replicas", type=positive_int, default=1, help="engine replicas (one per GPU)")
    p.add_argument("--address", default=None, help="an existing Ray cluster, e.g. ray://HOST:10001 "
                                                   "(default: a private Ray on loopback)")
    g = p.add_argument_group("limits of one request")
    add_limit_arguments(g, RequestLimits)
    g = p.add_argument_group("queues, sizes and timeouts (docs/serve.md: Limits and failure behaviour)")
    add_limit_arguments(g, ServiceLimits)
    add_threads_argument(p)  # each replica's; as `sample`'s, so a request's images equal its lone `sample`
    p.set_defaults(func=cmd_serve)


def limits_of(args: argparse.Namespace, cls):
    """The limits dataclass `cls` from the flags `add_limit_arguments` made."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def cmd_serve(args: argparse.Namespace) -> int:
    from ..artifacts import read_manifest
    from ..threads import describe_threads, resolve_threads
    from .service import deploy, shutdown

    # Decided here, where OMP_NUM_THREADS is the user's (Ray sets its own in its workers), as `sample` decides.
    hidden_size = read_manifest(args.export_dir).get("config", {}).get("hidden_size")
    threads, why = resolve_threads(args.torch_threads, hidden_size)
    settings = ServeSettings(export_dir=args.export_dir, backend=args.backend, precision=args.precision,
                             device=args.device, max_batch=args.max_batch, threads=threads,
                             limits=limits_of(args, RequestLimits), service=limits_of(args, ServiceLimits))
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
