"""`python -m ditexport serve`: its flags and its handler."""
from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import fields

from ..errors import UsageError
from ..limits import RequestLimits, add_limit_arguments
from ..precisions import PRECISIONS
from .settings import BACKENDS, ClusterLimits, Replicas, ServeSettings, ServiceLimits, builder_arguments


def add_serve_parser(sub, positive_int, add_threads_argument) -> None:
    p = sub.add_parser("serve", help="serve an export over HTTP with Ray Serve",
                       description="Serve a validated export over HTTP (POST /v1/images, GET /v1/models, "
                                   "GET /healthz) with Ray Serve and step-level continuous batching: on a private "
                                   "Ray on loopback, or as one named application on an existing Ray cluster "
                                   "(--address).")
    p.add_argument("--export-dir", default=None, help="the validated export to serve (required, but with --stop)")
    p.add_argument("--backend", choices=BACKENDS, default=ServeSettings.backend)
    p.add_argument("--precision", choices=PRECISIONS, default=ServeSettings.precision,
                   help="the export's graph (onnxruntime: int8 runs its CPU form on the CPU) or plan of this "
                        f"precision; torch: fp32 or fp16 (default: {ServeSettings.precision})")
    p.add_argument("--device", default=ServeSettings.device, help="torch backend: cpu or cuda (default: cpu)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="split forwards above this batch")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default: 8000; on a cluster, only "
                                                                   "where Serve is not running yet)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1, loopback only)")
    g = p.add_argument_group("an existing Ray cluster (docs/serve.md: On a Ray cluster)")
    g.add_argument("--address", default=None, help="the cluster, e.g. HOST:6379 or ray://HOST:10001 (default: a "
                                                   "private Ray on loopback)")
    g.add_argument("--name", default=None, help="the application's name, which requests give as `model` (default: "
                                                "the export directory's name)")
    g.add_argument("--route-prefix", default=None, help="its route on Serve's proxies (default: /NAME on a "
                                                        "cluster, / on the private Ray)")
    g.add_argument("--replace", action="store_true", help="replace an application of the same name already there")
    g.add_argument("--detach", action="store_true", help="deploy, leave it running and exit (remove it later with "
                                                         "--stop)")
    g.add_argument("--stop", action="store_true", help="remove the application --name from --address and exit")
    add_limit_arguments(g, ClusterLimits)
    g = p.add_argument_group("replicas: a fixed count, or autoscaled on the images waiting or running per replica")
    add_limit_arguments(g, Replicas)
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
    from .service import deploy, remove_from_cluster, shutdown
    from .settings import settings_from_arguments

    if args.stop:
        if not (args.name and args.address):
            raise UsageError("--stop needs --name NAME and --address ADDRESS: the application to remove, and where")
        remove_from_cluster(args.name, args.address, limits_of(args, ClusterLimits))
        print(f"removed application {args.name!r} from {args.address}", flush=True)
        return 0
    if not args.export_dir:
        raise UsageError("serve needs --export-dir DIR, the validated export to serve")
    if (args.detach or args.replace) and not args.address:
        raise UsageError(f"--{'detach' if args.detach else 'replace'} needs --address: the private Ray on loopback "
                         "ends with this process")
    threads, why = decide_threads(args)
    arguments = {key: getattr(args, key) for key in builder_arguments() if getattr(args, key, None) is not None}
    settings, replicas = settings_from_arguments({**arguments, "torch_threads": threads})  # as the builder's
    what = f"{args.export_dir} ({settings.backend}, {settings.precision}, {why} per replica)"
    # `kill`, `docker stop`, systemd: as Ctrl-C. Set again once deployed: ray.init sets its own (exit 15).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.address:
        return serve_on_cluster(args, settings, replicas, what)
    seconds = deploy(settings, replicas, args.port, args.host, args.name, args.deploy_timeout_s)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"serving {what} on http://{args.host}:{args.port} with {describe_replicas(replicas, settings.service)}; ready in "
          f"{seconds:.1f} s; Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return 0


def serve_on_cluster(args: argparse.Namespace, settings: ServeSettings, replicas: Replicas, what: str) -> int:
    """Deploys one named application on the cluster at --address; removes exactly it on Ctrl-C or SIGTERM (unless
    --detach), leaving Serve and every other application running."""
    from .service import deploy_on_cluster, remove_from_cluster

    done = deploy_on_cluster(settings, replicas, args.address, args.name, args.route_prefix, args.replace,
                             limits_of(args, ClusterLimits), args.host, args.port)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    placement = ", ".join(f"{n} on {node}" for node, n in sorted(done.replicas_per_node.items()))
    print(f"serving {what} as application {done.name!r} at {done.url} on the Ray cluster at {args.address} with "
          f"{describe_replicas(replicas, settings.service)} ({placement}); ready in {done.seconds:.1f} s; "
          + ("left running (--detach)" if args.detach else "Ctrl-C removes it"), flush=True)
    if args.detach:
        print(f"remove it with: python -m ditexport serve --stop --name {done.name} --address {args.address}",
              flush=True)
        return 0
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    remove_from_cluster(done.name, args.address)
    print(f"removed application {done.name!r} from {args.address}", flush=True)
    return 0


def decide_threads(args: argparse.Namespace) -> tuple[int | None, str]:
    """Each replica's CPU threads, decided here where the export is readable and OMP_NUM_THREADS is the user's
    (Ray sets its own in its workers), as `sample` decides; else (an export only the cluster's nodes hold) by
    --torch-threads, or by the replica from the model's width."""
    from ..artifacts import read_manifest
    from ..errors import DitexportError
    from ..threads import describe_threads, resolve_threads

    try:
        hidden_size = read_manifest(args.export_dir).get("config", {}).get("hidden_size")
    except DitexportError:
        if not args.address:
            raise
        if args.torch_threads:
            return args.torch_threads, describe_threads(args.torch_threads, "--torch-threads")
        return None, "CPU threads: the default for the model's width"
    threads, why = resolve_threads(args.torch_threads, hidden_size)
    return threads, describe_threads(threads, why)


def describe_replicas(replicas: Replicas, service: ServiceLimits) -> str:
    config = replicas.autoscaling_config(service)
    if config:
        return (f"{config['min_replicas']}-{config['max_replicas']} replicas (autoscaled, target "
                f"{config['target_ongoing_requests']:g} images waiting or running per replica)")
    return f"{replicas.num_replicas} replica(s)"
