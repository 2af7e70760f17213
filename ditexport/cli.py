"""`python -m ditexport`: the command-line interface (argparse sub-commands, kebab-case flags)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .errors import DitexportError

# Errors that are the user's to fix, or the file system's (full, read-only, missing): printed as one line,
# exit code 2. DITEXPORT_DEBUG=1 shows tracebacks.
USER_ERRORS = (DitexportError, ValueError, OSError)


class Labels(list):
    """Class labels parsed from --classes, keeping the text the user typed (for messages)."""

    def __init__(self, values, text: str):
        super().__init__(values)
        self.text = text


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other user error (argparse prints its usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def parse_labels(text: str) -> list[int]:
    try:
        return Labels([int(v) for v in text.replace(" ", "").split(",") if v != ""], text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"class labels must be comma-separated integers, got {text!r}") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="built-in model (default: digits) or a config name such as DiT-S/2 for random weights")
    g.add_argument("--checkpoint", default=None, help="a .pt / .safetensors checkpoint (official or train.py)")
    g.add_argument("--config", default=None, help="config name for --checkpoint when it cannot be inferred")
    g.add_argument("--image-size", type=int, default=None, choices=(256, 512),
                   help="image size of an official latent model (sets input size = size / 8)")


SAMPLERS = ("ddpm", "ddim", "dpmpp-2m")  # diffusion.SAMPLING_METHODS, spelled out so --help needs no torch
SAMPLER_HELP = "ddpm (official), ddim, or dpmpp-2m: DPM-Solver++ (2M), 20-25 steps as diffusers (default: ddpm)"


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=positive_int, default=250, help="sampling steps (default: 250, official)")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help=SAMPLER_HELP)
    g.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (default: 0)")
    g.add_argument("--cfg-scale", type=float, default=4.0,
                   help="classifier-free guidance scale; 1 disables guidance (default: 4.0, official)")
    g.add_argument("--guide-all-channels", action="store_true",
                   help="guide every latent channel (diffusers) instead of the official first 3")
    g.add_argument("--seed", type=int, default=0, help="seed of the one CPU generator behind all noise")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads of torch and ONNX Runtime (default: OMP_NUM_THREADS if set, else 1 for models "
                        "of width <= 256 such as the built-in one, else the usable cores less one)")


def set_threads(args, hidden_size: int | None) -> str:
    """Applies --torch-threads (or the default for this model width); returns the text for the run's banner."""
    from .threads import describe_threads, resolve_threads

    return describe_threads(*resolve_threads(args.torch_threads, hidden_size))


def load_cli_model(args):
    """The model of the model flags, with a line every 10 s while a big one is built (DiT-XL/2: about 25 s)."""
    from .checkpoint import load_model
    from .progress import heartbeat

    with heartbeat(print, f"model: loading {args.checkpoint or args.model or 'digits'}"):
        return load_model(args.model, args.checkpoint, args.config, args.image_size)


SAMPLER_FLAGS = {"guidance_scale": "--cfg-scale", "eta": "--eta", "num_steps": "--steps"}


def sampler_config(args):
    """The sampler settings of the flags; a setting the sampler refuses is one line naming its flag."""
    from .sampler import SamplerConfig, SamplerConfigError

    try:
        return SamplerConfig(num_steps=args.steps, method=args.sampler, guidance_scale=args.cfg_scale, eta=args.eta,
                             guide_all_channels=args.guide_all_channels)
    except SamplerConfigError as e:
        flag = SAMPLER_FLAGS.get(e.field, e.field)
        raise DitexportError(f"{flag} must be a finite number, got {getattr(args, flag[2:].replace('-', '_'))}") \
            from None


def check_seed_flag(seed: int) -> None:
    from .pipeline import SEED_RANGE

    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise DitexportError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {seed}")


def resolve_device(name: str):
    """backends.base.resolve_device, imported late so that `--help` does not import torch; a name torch does
    not know is one line naming --device."""
    from .backends.base import resolve_device as resolve

    check_device_name(name)
    return resolve(name)


def check_device_name(name: str) -> None:
    import torch

    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise DitexportError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None


def model_flags(args) -> list[str]:
    """The model flags the user typed (--model, --checkpoint, --config, --image-size), for hints."""
    flags = []
    for flag, value in (("--model", getattr(args, "model", None)), ("--checkpoint", getattr(args, "checkpoint", None)),
                        ("--config", getattr(args, "config", None)), ("--image-size", getattr(args, "image_size", None))):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def export_dir_of(args) -> Path:
    """--export-dir, or the default export directory of the model flags."""
    from .artifacts import default_export_dir

    if getattr(args, "export_dir", None):
        return Path(args.export_dir)
    return default_export_dir(args.model, args.checkpoint, image_size=getattr(args, "image_size", None))


def rebuild_hint(args, export_dir: Path) -> str | None:
    """The build command for hints about `export_dir` with the user's model flags; None when the user named
    no model, so the hint takes the flags the export was built with (from its manifest)."""
    from .artifacts import rebuild_command

    flags = model_flags(args)
    return rebuild_command(export_dir, flags) if flags else None


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Refuses, before any work, an output path that cannot become a file; creates missing directories only
    under the working directory (elsewhere a missing directory is more likely a typo)."""
    path = Path(path)
    if path.is_dir():
        raise DitexportError(f"{flag} {path} is a directory; name a file in it, e.g. {path / 'samples.png'}")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise DitexportError(f"{flag} {path}: {ancestor} is a file, not a directory")
            break
    if not parent.exists():
        inside = Path.cwd().resolve()
        resolved = parent.resolve()
        if resolved != inside and inside not in resolved.parents:
            raise DitexportError(f"{flag} {path}: directory {parent} does not exist (directories are created "
                                 "only under the working directory); create it first")
        parent.mkdir(parents=True, exist_ok=True)
    from .artifacts import write_problem

    problem = write_problem(parent)
    if problem:
        raise DitexportError(f"cannot write {flag} {path}: {problem}")
    return path


# ----------------------------------------------------------------------------------------------- info

def cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .model import DIT_CONFIGS, DiT

    print(f"ditexport {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"CUDA: {'yes, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    for module in ("onnx", "onnxruntime", "tensorrt", "polygraphy", "gradio", "diffusers"):
        try:
            mod = __import__(module)
            # tensorrt-stubs alone makes `tensorrt` importable, with no version: that is not TensorRT.
            print(f"{module}: {getattr(mod, '__version__', None) or 'not installed (only an empty namespace)'}")
        except ImportError:
            print(f"{module}: not installed")
    print()
    print(f"{'config':<12} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'params (256px)':>15}")

    for name, cfg in DIT_CONFIGS.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in DiT.from_config(cfg).parameters())
        print(f"{name:<12} {cfg.depth:>5} {cfg.hidden_size:>6} {cfg.num_heads:>5} {cfg.patch_size:>5} "
              f"{n / 1e6:>13.1f} M")
    return 0


# --------------------------------------------------------------------------------------------- sample

def make_tensorrt_backend(args, model):
    """`--backend tensorrt`: this machine's plan (and cond plan, if built) from the export directory."""
    from .backends.tensorrt_backend import TensorRTBackend
    from .build import open_export
    from .engine import EngineError, current_environment, find_plan, tensorrt_unavailable_reason
    from .locking import read_lock

    reason = tensorrt_unavailable_reason(for_build=False)
    if reason:
        raise EngineError(f"the tensorrt backend is unavailable: {reason}")
    export_dir = export_dir_of(args)
    with read_lock(export_dir):
        open_export(export_dir, model.config, [], rebuild_hint(args, export_dir))  # validated, from this model
        device = resolve_device("cuda" if args.device in ("cpu", "auto") else args.device)
        env = current_environment(device)  # the plan for the GPU asked for (cuda:N), not the current one
        plan = find_plan(export_dir, environment=env)
        try:
            cond_plan = find_plan(export_dir, stem="cond", environment=env)
        except EngineError:
            cond_plan = None  # the conditioning-vector engine is optional
        # The plans are checked against the SHA-256 in their metadata as they load.
        return TensorRTBackend(plan, model.config, cond_plan_path=cond_plan, max_batch=args.max_batch,
                               device=device)


def make_onnxruntime_backend(args, model):
    """`--backend onnxruntime`: the validated export of this model (--export-dir, or exports/<name>), its
    graphs checked against the manifest's SHA-256 before ONNX Runtime opens them."""
    from .artifacts import rebuild_command
    from .backends.onnxruntime_backend import OnnxRuntimeBackend
    from .build import open_export
    from .locking import read_lock
    from .verification import verify_export

    export_dir = export_dir_of(args)
    hint = rebuild_hint(args, export_dir)
    precision = getattr(args, "precision", "fp32")
    with read_lock(export_dir):  # a build writing the export is waited for, then its result is read
        if not (export_dir / "manifest.json").is_file():
            command = (hint or rebuild_command(export_dir)).removesuffix(" --force")
            raise DitexportError(f"no ONNX export in {export_dir}; build it first with: {command}")
        entry = open_export(export_dir, model.config, [], hint)
        onnx_path, cond_path = entry.graph_path("xty", precision), entry.graph_path("cond", precision)
        if onnx_path is None:
            raise DitexportError(f"the export in {export_dir} has no {precision} graph; rebuild it with "
                                 f"--precision fp32,{precision}")
        verify_export(export_dir, [p for p in (onnx_path, cond_path) if p is not None], rebuild=hint)
        return OnnxRuntimeBackend(onnx_path, model.config, max_batch=args.max_batch, cond_path=cond_path)


def make_backend(args, model):
    """The backend named by --backend, for `sample` and `bench`."""
    import torch

    from .backends import TorchBackend

    if args.backend == "torch":
        device = resolve_device(args.device)
        dtype = torch.float16 if (args.precision == "fp16") else torch.float32
        return TorchBackend(model, device=device, dtype=dtype, max_batch=args.max_batch,
                            cuda_graph=getattr(args, "cuda_graph", False),
                            compile_mode=getattr(args, "torch_compile", None))
    if args.backend == "tensorrt":
        return make_tensorrt_backend(args, model)
    if args.backend == "onnxruntime":
        return make_onnxruntime_backend(args, model)
    raise DitexportError(f"backend {args.backend!r} is not available in this build")


def check_backend_available(args) -> None:
    """The cheap checks of --backend, --device and --precision, made before the model is built (which takes
    DiT-XL/2 about 25 s), so that a missing runtime or GPU is refused at once."""
    if args.backend == "tensorrt":
        from .engine import EngineError, tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason(for_build=False)
        if reason:
            raise EngineError(f"the tensorrt backend is unavailable: {reason}")
    elif args.backend == "onnxruntime":
        from .backends.onnxruntime_backend import default_providers

        default_providers()  # the one-line "pip install onnxruntime" error where it is missing
    elif args.backend == "torch":
        resolve_device(args.device)  # a missing GPU is refused at once


def cmd_sample(args) -> int:
    from .images import PngGridWriter, npz_writer
    from .pipeline import CHUNK_IMAGES, Pipeline, VaeDecoder, check_request

    # Everything the flags alone can refuse is refused before the model is built or anything sampled.
    sampler_cfg = sampler_config(args)
    check_seed_flag(args.seed)
    check_device_name(args.device)
    if args.classes is not None and not args.classes:
        raise DitexportError(f"--classes {args.classes.text!r} names no class label; give e.g. --classes 3,1,4")
    out = check_output_file(args.out)
    npz = check_output_file(args.npz, "--npz") if args.npz else None
    check_backend_available(args)
    model, source = load_cli_model(args)
    cfg = model.config
    labels = args.classes or [i % cfg.num_classes for i in range(args.num_images)]
    check_request(cfg, labels, args.seed, sampler_cfg)
    threads = set_threads(args, cfg.hidden_size)
    backend = make_backend(args, model)
    decoder = None
    if args.vae is not None:
        decoder = VaeDecoder(args.vae, device=backend.device)
    pipeline = Pipeline(backend, decoder)
    if cfg.in_channels == 4 and args.vae is None:
        print("note: latent model without --vae: writing the first 3 latent channels, not decoded images")
    print(f"model: {source}; backend: {backend.describe()}, {threads}; {len(labels)} images, {args.steps} "
          f"{args.sampler} steps, guidance {args.cfg_scale}")
    upscale = max(1, 64 // cfg.input_size) if args.vae is None else 1  # 8x8 digits are too small to see unscaled
    total_s = sampler_s = 0.0
    chunks = steps = 0
    with contextlib.ExitStack() as outputs:
        # Both files are created now (an unwritable destination fails here) and published only when complete.
        grid = outputs.enter_context(PngGridWriter(out, len(labels), upscale=upscale))
        write_npz = None
        for result in pipeline.chunks(labels, seed=args.seed, sampler_cfg=sampler_cfg, progress=not args.quiet):
            images = result.images[:, :3]
            grid.add(images)
            if npz is not None:
                if write_npz is None:
                    _, c, h, w = images.shape
                    write_npz = outputs.enter_context(npz_writer(npz, len(labels), h, w, c))
                write_npz(images)
            total_s, sampler_s, steps, chunks = total_s + result.total_s, sampler_s + result.sampler_s, \
                result.steps, chunks + 1
    rows = min(len(labels), CHUNK_IMAGES) * (2 if args.cfg_scale != 1 else 1)
    in_chunks = f", {chunks} chunks of up to {CHUNK_IMAGES} images" if chunks > 1 else ""
    print(f"wrote {out}: {total_s:.2f} s in all, {1000 * sampler_s / (steps * chunks):.1f} ms per step "
          f"({steps} steps, batch {rows} per forward{in_chunks})")
    if npz is not None:
        _, c, h, w = images.shape
        print(f"wrote {npz}: arr_0 of shape ({len(labels)}, {h}, {w}, {c}) uint8")
    return 0


# ----------------------------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from .demo_app import DemoLimits, launch

    limits = DemoLimits(max_steps=args.max_steps, max_images=args.max_images, max_guidance=args.max_guidance)
    launch(host=args.host, port=args.port, share=args.share, exports_root=args.exports,
           device=str(resolve_device(args.device)),
           limits=limits, concurrency=args.concurrency, vae=args.vae, torch_threads=args.torch_threads)
    return 0


# --------------------------------------------------------------------------------------- train-digits

def train_digits_out(args) -> Path:
    """--out, else a new runs/digits-<time>; the shipped weights only with --overwrite-builtin."""
    from .zoo.digits_train import BUILTIN_DIR, is_builtin_dir, new_run_dir

    if args.overwrite_builtin:
        if args.out and not is_builtin_dir(args.out):
            raise DitexportError(f"--overwrite-builtin writes {BUILTIN_DIR}; drop it, or drop --out {args.out}")
        return BUILTIN_DIR
    if args.out and is_builtin_dir(args.out):
        raise DitexportError(f"{args.out} holds the shipped digits weights; pass --overwrite-builtin to replace them")
    return Path(args.out) if args.out else new_run_dir()


def cmd_train_digits(args) -> int:
    from .model import get_config
    from .zoo.digits_eval import LEARNED_AGREEMENT, QUICK_PER_CLASS, QUICK_STEPS, quick_class_agreement
    from .zoo.digits_train import DigitsTrainConfig, save_weights, train_digits, training_summary

    cfg = DigitsTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            **({"lr": args.lr} if args.lr is not None else {}))
    out = train_digits_out(args)
    threads = set_threads(args, get_config(cfg.model).hidden_size)
    print(f"training {cfg.model} on scikit-learn's digits: {cfg.steps} steps, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, EMA {cfg.ema_decay}, seed {cfg.seed}, {threads}; into {out}")
    result = train_digits(cfg, progress=not args.quiet)
    summary = training_summary(result)
    agreement = quick_class_agreement(result.ema)
    summary["quick_class_agreement"] = agreement
    path = save_weights(result.ema, out, summary)
    print(f"trained in {result.seconds:.1f} s; mean loss of the last {summary['final_loss_steps']} steps "
          f"{summary['final_loss_mean']}")
    print(f"check: {100 * agreement:.0f} % of {10 * QUICK_PER_CLASS} guided samples ({QUICK_PER_CLASS} per class, "
          f"{QUICK_STEPS} steps) read as the requested digit (chance: 10 %)")
    if agreement < LEARNED_AGREEMENT:
        print(f"warning: {cfg.steps} steps were too short to learn the digits (a trained model scores above "
              f"{100 * LEARNED_AGREEMENT:.0f} % here; the default recipe trains {DigitsTrainConfig().steps} steps)")
    print(f"wrote {path} (EMA weights) and {path.with_name('config.json')}")
    return 0


# ----------------------------------------------------------------------------------------------- eval

def cmd_eval(args) -> int:
    from .artifacts import atomic_write_json
    from .backends import TorchBackend
    from .checkpoint import load_model
    from .zoo.digits_eval import evaluate_digits

    device = resolve_device(args.device)  # before the model: a missing GPU is refused at once
    model, source = load_model(args.model, args.checkpoint, args.config)
    threads = set_threads(args, model.config.hidden_size)
    backend = TorchBackend(model, device=device)
    unguided = "" if args.cfg_scale == 1 else " and without"
    print(f"model: {source}; backend: {backend.describe()}, {threads}; {args.num_per_class} digits per class, "
          f"{args.steps} {args.sampler} steps, with guidance {args.cfg_scale:g}{unguided}")
    report = evaluate_digits(backend, num_per_class=args.num_per_class, num_steps=args.steps,
                             guidance_scale=args.cfg_scale, seed=args.seed, sampler=args.sampler,
                             progress=not args.quiet)
    print(report.format())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {atomic_write_json(args.json, {'model': source, **report.to_dict()})}")
    return 0


# ---------------------------------------------------------------------------------------------- bench

def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if any(b < 2 or b % 2 for b in sizes):
        raise argparse.ArgumentTypeError(f"guided batch sizes are even and at least 2 (2 rows per image), got {text!r}")
    return sizes


def bench_export(args, model) -> Path:
    """The export the bench's ONNX Runtime and TensorRT rows run: --export-dir, else the one `build` makes in
    exports/<name>, built there first when missing (never a second export of the same model)."""
    from .artifacts import default_export_dir
    from .build import describe_source, ensure_export

    export_dir = args.export_dir or default_export_dir(args.model, args.checkpoint)
    name = args.model or (Path(args.checkpoint).name if args.checkpoint else "digits")
    return ensure_export(model, describe_source(args.model, args.checkpoint), export_dir, model_name=name)[0]


def cmd_bench(args) -> int:
    from .bench import BENCH_BACKENDS, BenchSettings, format_table, run_bench, stability_warning, write_outputs

    backends = None
    if args.backends:
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        unknown = [b for b in backends if b not in BENCH_BACKENDS]
        if unknown:
            raise DitexportError(f"unknown bench backend(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(BENCH_BACKENDS)}")
    options = dict(device=args.device, backends=backends, compile_mode=args.compile_mode, out_dir=args.out,
                   export_dir=args.export_dir, unguided=not args.no_unguided,
                   builder_optimization_level=args.builder_optimization_level)
    if args.batch_sizes is not None:
        options["batch_sizes"] = args.batch_sizes
    for name in ("warmup", "iters", "sample_steps"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    settings = BenchSettings.quick_settings(**options) if args.quick else BenchSettings(**options)
    resolve_device(args.device)  # before the model: --device cuda without a GPU is refused at once
    model, source = load_cli_model(args)
    threads = set_threads(args, model.config.hidden_size)
    print(f"bench: {source}; guided batches {list(settings.batch_sizes)}"
          f"{' and 1 unguided' if settings.unguided else ''}; {settings.warmup} warm-up + {settings.iters} "
          f"timed calls each{' (quick)' if settings.quick else ''}; {threads}")
    report = run_bench(model, source, settings, export=lambda: bench_export(args, model))
    from .artifacts import export_name

    stem = f"bench-{export_name(args.model, args.checkpoint)}-{report['machine']['device']}"
    json_path, png_path, plot_note = write_outputs(report, args.out, stem)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else f" (plot skipped: {plot_note})"))
    for item in report["skipped"]:
        print(f"skipped {item['backend']}: {item['reason']}")
    if report["end_to_end"]:
        print("one guided image end to end (measured vs derived from the per-forward times):")
        for e in report["end_to_end"]:
            derived = f"{e['derived_s']:.3f} s" if e["derived_s"] is not None else "-"
            print(f"  {e['backend']:<18} {e['steps']} steps: {e['measured_s']:.3f} s measured, {derived} derived")
    where = report["machine"]["gpu"] or f"CPU ({report['machine']['cpu_threads']} torch threads)"
    peak = report["matmul_fp16_tflops"]
    if warning := stability_warning(report):
        print(f"\n{warning}")
    print(f"\n{source} on {where}" + (f"; fp16 matmul {peak:.0f} TFLOP/s measured" if peak else ""))
    print(format_table(report))  # the table comes last
    return 0


# ------------------------------------------------------------------------------------------ gpu-check

def cmd_gpu_check(args) -> int:
    from .gpu_check import gpu_check

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    return gpu_check(args.out, models=models, budget_s=args.budget,
                     builder_optimization_level=args.builder_optimization_level)


# ------------------------------------------------------------------------------------------ export-vae

def cmd_export_vae(args) -> int:
    from .vae import export_vae, load_vae, vae_scale_factor

    print(f"export-vae: {set_threads(args, None)}")

    latent_size = args.latent_size
    if latent_size is None:
        factor = vae_scale_factor(load_vae(args.vae))
        if args.image_size % factor:
            raise DitexportError(f"--image-size {args.image_size} is not a multiple of the VAE's factor {factor}")
        latent_size = args.image_size // factor
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    report = export_vae(args.vae, args.out, latent_size=latent_size, precisions=precisions, opset=args.opset)
    return 0 if report["passed"] else 1


# ------------------------------------------------------------------------------------- build, validate

def cmd_build(args) -> int:
    from .artifacts import rebuild_command
    from .build import build_export, describe_source, parse_precisions

    precisions = parse_precisions(args.precision)
    out = export_dir_of(args)
    model, source_text = load_cli_model(args)
    source = describe_source(args.model, args.checkpoint)
    print(f"model: {source_text}; {set_threads(args, model.config.hidden_size)}")
    # Hints (and engine errors) quote the command that rebuilds this export: the user's flags, forced.
    flags = model_flags(args) or ["--model", "digits"]
    for flag, value, default in (("--precision", args.precision, "fp32,fp16"), ("--max-batch", args.max_batch, 8),
                                 ("--opset", args.opset, None)):
        if value != default:
            flags += [flag, str(value)]
    return build_export(model, source, out, precisions=precisions, max_images=args.max_batch, opset=args.opset,
                        force=args.force, sample_steps=args.sample_steps, rebuild_command=rebuild_command(out, flags),
                        build_flags=flags, wait=not args.no_wait,
                        model_name=args.model or (Path(args.checkpoint).name if args.checkpoint else "digits"))


def cmd_validate(args) -> int:
    from .artifacts import read_manifest
    from .build import check_source, revalidate

    export_dir = export_dir_of(args)
    hint = rebuild_hint(args, export_dir)
    manifest = read_manifest(export_dir, hint)
    check_source(manifest, export_dir, model=args.model, checkpoint=args.checkpoint, config=args.config,
                 image_size=args.image_size)
    print(f"validate: {export_dir}; {set_threads(args, manifest['config']['hidden_size'])}")
    return revalidate(export_dir, sample_steps=args.sample_steps, rebuild=hint, wait=not args.no_wait)


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m ditexport",
                            description="Export, validate, compile and serve class-conditional DiTs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices and the model registry")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="sample an image grid", description="Sample class-conditional images "
                       "and write them as a PNG grid; prints the time per step.")
    add_model_arguments(p)
    add_sampler_arguments(p)
    p.add_argument("--classes", type=parse_labels, default=None, help="comma-separated class labels, e.g. 3,1,4")
    p.add_argument("--num-images", type=positive_int, default=8,
                   help="images when --classes is not given, cycling through the classes (default: 8)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="torch: fp16 on any device (fp16 on the CPU is slow but correct); onnxruntime/tensorrt: "
                        "the export's graph of this precision (default: fp32)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="split forwards above this batch")
    p.add_argument("--cuda-graph", action="store_true",
                   help="torch on CUDA: capture the forward in a CUDA graph per batch size and replay it")
    p.add_argument("--torch-compile", default=None, metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch: run torch.compile(model, mode=MODE) (opt-in; compiling takes a while)")
    p.add_argument("--export-dir", default=None,
                   help="export to run with --backend onnxruntime/tensorrt (default: exports/<model name>)")
    p.add_argument("--vae", default=None, help="local directory of a diffusers AutoencoderKL (latent models)")
    p.add_argument("--out", default="samples.png", help="output PNG (default: samples.png)")
    p.add_argument("--npz", default=None, metavar="PATH",
                   help="also write the samples for FID as the official sample_ddp.py: arr_0, N x H x W x C uint8")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="serve the Gradio web demo", description="Serve the Gradio demo: the "
                       "built-in digits model and every export under --exports, on the runtimes this machine has.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: 7860, or the next free one up to 7959)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--exports", default="exports", help="export root to offer models from (default: exports)")
    p.add_argument("--device", default="cpu", help="torch device for the torch backend: cpu, cuda or auto")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory, for latent models")
    p.add_argument("--max-steps", type=positive_int, default=1000, help="server limit on steps (default: 1000)")
    p.add_argument("--max-images", type=positive_int, default=16, help="server limit on images (default: 16)")
    p.add_argument("--max-guidance", type=float, default=20.0, help="server limit on guidance (default: 20)")
    p.add_argument("--concurrency", type=positive_int, default=1,
                   help="requests that run at once on each backend; others wait in the queue (default: 1)")
    add_threads_argument(p)  # the widest model served decides the default
    p.set_defaults(func=cmd_demo)

    from .serving.command import add_serve_parser  # the HTTP service; Ray is imported only when it runs

    add_serve_parser(sub, positive_int)

    p = sub.add_parser("train-digits", help="retrain the built-in digits DiT",
                       description="Train the built-in digits DiT on scikit-learn's bundled 8x8 digits with DiT's "
                       "recipe (seeded, reproducible); writes EMA weights.safetensors and config.json.")
    p.add_argument("--steps", type=positive_int, default=4000, help="optimiser steps (default: 4000)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default: 64)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches, t, noise and dropout")
    p.add_argument("--out", default=None, help="output directory (default: a new runs/digits-<date>-<time>)")
    p.add_argument("--overwrite-builtin", action="store_true",
                   help="write into the package's ditexport/zoo/digits, replacing the shipped weights")
    add_threads_argument(p)  # results are bit-identical only for the same thread count
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_digits)

    p = sub.add_parser("eval", help="measure a digits model: class agreement and Fréchet distance",
                       description="Sample N digits per class with and without guidance and score them against "
                       "the real digits: the share a real-digit classifier assigns to the requested class, and "
                       "a Fréchet distance in pixel space beside the real-vs-real floor.")
    add_model_arguments(p)
    p.add_argument("--num-per-class", type=positive_int, default=100, help="digits per class (default: 100)")
    p.add_argument("--steps", type=positive_int, default=250, help="sampling steps (default: 250)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help=SAMPLER_HELP)
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help="guidance scale; the unguided scale 1 is always measured beside it (default: 4.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default: cpu)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    add_threads_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmark every backend this machine has",
                       description="Time one model through every available backend side by side: ms per forward, "
                       "images/s for 250- and 50-step sampling, % of the fp16 matmul rate (GPU) and the ratio to "
                       "torch eager; writes JSON and a PNG plot and ends with a table.")
    add_model_arguments(p)
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of torch-eager, torch-cuda-graph, torch-compile, onnxruntime-fp32, "
                        "onnxruntime-fp16, tensorrt (default: all; those this machine cannot run are skipped)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto, the GPU when there is one)")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=None,
                   help="guided forward batch sizes, 2 rows per image (default: 2,8,32,64)")
    p.add_argument("--no-unguided", action="store_true", help="skip the unguided batch-1 row")
    p.add_argument("--quick", action="store_true",
                   help="fast run: 2 warm-up + 5 timed calls, a 20-step end-to-end sample, a smaller matmul")
    p.add_argument("--warmup", type=positive_int, default=None, help="untimed calls before timing (default: 5)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed calls per measurement (default: 30)")
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help="steps of the end-to-end guided sample (default: 250)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the torch-compile backend (default: reduce-overhead)")
    p.add_argument("--builder-optimization-level", type=int, default=3, choices=range(0, 6),
                   help="TensorRT builder optimization level for the bench engine (default: 3)")
    p.add_argument("--export-dir", default=None,
                   help="the export whose ONNX graphs and engine to run (default: exports/<model name>, the one "
                        "`build` makes, built there first when missing)")
    p.add_argument("--out", default="exports/bench", help="output directory (default: exports/bench)")
    add_threads_argument(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gpu-check", help="run every GPU path this machine has, in one table",
                       description="On a machine with an NVIDIA GPU: torch fp16 eager, CUDA graph, torch.compile, "
                       "ONNX Runtime CUDA (with onnxruntime-gpu) and TensorRT (when installed) on the digits model and "
                       "DiT-XL/2 at 256 px (random weights): relative error against fp32 torch, ms per forward at "
                       "batches 2 and 64, one 250-step guided sample each; every row isolated and time-capped, one "
                       "table last. Exit code 1 when a row failed, 2 without a GPU.")
    p.add_argument("--models", default="digits,DiT-XL/2",
                   help="comma-separated: digits and/or registry configs at 256 px (default: digits,DiT-XL/2)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole check; rows that cannot start in time say so (default: 450)")
    p.add_argument("--builder-optimization-level", type=int, default=2, choices=range(0, 6),
                   help="TensorRT builder level of the check's engines (default: 2, to fit the budget; "
                        "bench uses 3)")
    p.add_argument("--out", default="exports/gpu-check",
                   help="where the exports, engines and gpu-check.json go; reused by a rerun (default: "
                        "exports/gpu-check)")
    p.set_defaults(func=cmd_gpu_check)

    p = sub.add_parser("export-vae", help="export the VAE decoder to ONNX",
                       description="Export a diffusers AutoencoderKL decoder from a local directory to ONNX fp32/fp16 "
                       "with a dynamic batch and validate it on ONNX Runtime against torch (fp16 emulated on the CPU). "
                       "No TensorRT engine: the decoder runs once per sample (docs/gpu.md).")
    p.add_argument("--vae", required=True, help="local directory of a diffusers AutoencoderKL")
    p.add_argument("--out", default="exports/vae", help="output directory (default: exports/vae)")
    p.add_argument("--image-size", type=int, default=256,
                   help="image side the decoder produces; latent side = size / the VAE's factor (default: 256)")
    p.add_argument("--latent-size", type=positive_int, default=None, help="latent side (overrides --image-size)")
    p.add_argument("--precision", default="fp32,fp16", help="comma-separated: fp32, fp16 (default: both)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    add_threads_argument(p)
    p.set_defaults(func=cmd_export_vae)

    p = sub.add_parser("build", help="export to ONNX, validate, and build engines",
                       description="Export a DiT to ONNX (fp32 and fp16 graphs of (x, t, y) and of (x, c)), validate "
                       "them on ONNX Runtime against torch fp32, and build TensorRT engines where TensorRT and a GPU "
                       "exist. With no arguments: the built-in digits model into exports/digits. Skipped when the "
                       "export is up to date.")
    add_model_arguments(p)
    p.add_argument("--export-dir", "--out", dest="export_dir", default=None,
                   help="export directory (default: exports/<checkpoint name>, exports/digits, or "
                        "exports/<config>-<size> such as exports/DiT-S-2-256); --out is an alias")
    p.add_argument("--precision", default="fp32,fp16",
                   help="comma-separated graph precisions; fp32 is always built, as the reference (default: fp32,fp16)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="images per request the engine profile covers; guidance doubles the rows (default: 8)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: 18; 23+ exports attention as the ONNX Attention op)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="steps of the sample-level parity check, 0 to skip (default: 50 for digits, else 5)")
    p.add_argument("--force", action="store_true", help="rebuild even when the export is up to date")
    add_threads_argument(p)
    p.add_argument("--no-wait", action="store_true",
                   help="refuse instead of waiting when another build is writing the export directory")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("validate", help="re-validate an existing export",
                       description="Re-run the validation of an export against the model it was built from; "
                       "writes report.json and ends with PASSED or FAILED.")
    add_model_arguments(p)
    p.add_argument("--export-dir", default=None,
                   help="export directory (default: the model's, as for build); with model flags, the export "
                        "must have been built from that model")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="steps of the sample-level parity check, 0 to skip (default: 50 for digits, else 5)")
    add_threads_argument(p)
    p.add_argument("--no-wait", action="store_true", help="refuse instead of waiting while a build writes the export")
    p.set_defaults(func=cmd_validate)
    return parser


def one_line(error: BaseException) -> str:
    """An error as one line: OSErrors name their path and cause ("cannot write x.png: Read-only file system")."""
    if isinstance(error, OSError) and not isinstance(error, DitexportError) and error.strerror:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        return f"{paths}: {error.strerror}" if paths else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
