"""`build`, `validate`, `bench`, `gpu-check`, `demo`, `train-digits` and `export-vae`."""
from __future__ import annotations

from pathlib import Path

from ..errors import DitexportError
from .options import (describe_model, export_dir_of, flagged_export, load_cli_model, model_source, resolve_device,
                      set_threads)


# ----------------------------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from ..demo_app import DemoLimits, launch

    limits = DemoLimits(max_steps=args.max_steps, max_images=args.max_images, max_guidance=args.max_guidance,
                        concurrency=args.concurrency, max_queue=args.max_queue)
    launch(host=args.host, port=args.port, share=args.share, exports_root=args.exports,
           device=str(resolve_device(args.device)),
           limits=limits, vae=args.vae, torch_threads=args.torch_threads, server=args.server)
    return 0


# --------------------------------------------------------------------------------------- train-digits

def train_digits_out(args) -> Path:
    """--out, else a new runs/digits-<time>; the shipped weights only with --overwrite-builtin."""
    from ..zoo.digits_train import run_dir

    return run_dir(args.out, args.overwrite_builtin)


def cmd_train_digits(args) -> int:
    from ..model import get_config
    from ..zoo.digits_eval import LEARNED_AGREEMENT, QUICK_PER_CLASS, QUICK_STEPS
    from ..zoo.digits_train import DigitsTrainConfig, train_and_save

    cfg = DigitsTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr)
    out = train_digits_out(args)
    threads = set_threads(args, get_config(cfg.model).hidden_size)
    print(f"training {cfg.model} on scikit-learn's digits: {cfg.steps} steps, batch {cfg.batch_size}, "
          f"lr {cfg.lr}, EMA {cfg.ema_decay}, seed {cfg.seed}, {threads}; into {out}")
    path, summary = train_and_save(cfg, out, progress=not args.quiet)
    agreement = summary["quick_class_agreement"]
    print(f"trained in {summary['seconds']:.1f} s; mean loss of the last {summary['final_loss_steps']} steps "
          f"{summary['final_loss_mean']}")
    print(f"check: {100 * agreement:.0f} % of {10 * QUICK_PER_CLASS} guided samples ({QUICK_PER_CLASS} per class, "
          f"{QUICK_STEPS} steps) read as the requested digit (chance: 10 %)")
    if agreement < LEARNED_AGREEMENT:
        print(f"warning: {cfg.steps} steps were too short to learn the digits (a trained model scores above "
              f"{100 * LEARNED_AGREEMENT:.0f} % here; the default recipe trains {DigitsTrainConfig().steps} steps)")
    print(f"wrote {path} (EMA weights) and {path.with_name('config.json')}")
    return 0


def bench_export(args, model) -> Path:
    """The export the bench's ONNX Runtime and TensorRT rows run: --export-dir, else the one `build` makes for the
    same model flags, built there first when missing (never a second export of the same model)."""
    from ..building import ensure_export

    source = model_source(args)
    return ensure_export(model, source.to_manifest(), export_dir_of(args), model_name=source.name)[0]


def cmd_bench(args) -> int:
    from ..bench import BenchSettings, format_table, run_bench, stability_warning, write_outputs

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip()) if args.backends else None
    options = dict(device=args.device, backends=backends, compile_mode=args.compile_mode, out_dir=args.out,
                   export_dir=args.export_dir, unguided=not args.no_unguided, batch_sizes=args.batch_sizes,
                   builder_optimization_level=args.builder_optimization_level)
    for name in ("warmup", "iters", "sample_steps"):  # unset: the full run's or --quick's
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    settings = BenchSettings.quick_settings(**options) if args.quick else BenchSettings(**options)
    resolve_device(args.device)  # before the model: --device cuda without a GPU is refused at once
    model = load_cli_model(args)
    source = describe_model(model)
    threads = set_threads(args, model.config.hidden_size)
    print(f"bench: {source}; guided batches {list(settings.batch_sizes)}"
          f"{' and 1 unguided' if settings.unguided else ''}; {settings.warmup} warm-up + {settings.iters} "
          f"timed calls each{' (quick)' if settings.quick else ''}; {threads}")
    report = run_bench(model, source, settings, export=lambda: bench_export(args, model))
    from ..artifacts import default_export_dir

    # The model's name, not --export-dir's.
    name = default_export_dir(args.model, args.checkpoint, image_size=args.image_size).name
    stem = f"bench-{name}-{report['machine']['device']}"
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
    from ..gpu_check import gpu_check

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    return gpu_check(args.out, models=models, budget_s=args.budget,
                     builder_optimization_level=args.builder_optimization_level)


# ------------------------------------------------------------------------------------------ export-vae

def cmd_export_vae(args) -> int:
    from ..vae import export_vae

    print(f"export-vae: {set_threads(args, None)}")
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    report = export_vae(args.vae, args.out, image_size=args.image_size, latent_size=args.latent_size,
                        precisions=precisions, opset=args.opset)
    return 0 if report["passed"] else 1


# ------------------------------------------------------------------------------------- build, validate

def quantization_settings(args):
    """--calib-images, --calib-steps, --calib-amax and --quantize as the library's settings, checked before any
    work; a setting out of range is one line naming its flag."""
    from ..precisions import CalibrationSettings, QuantizationError, QuantRecipe

    calibration = CalibrationSettings(images=args.calib_images, steps=args.calib_steps)
    recipe = QuantRecipe(layers=tuple(n.strip() for n in args.quantize.split(",") if n.strip()),
                         activation_amax=args.calib_amax, smoothquant_alpha=args.smoothquant)
    flags = {"calib_images": "--calib-images", "calib_steps": "--calib-steps", "layers": "--quantize",
             "activation_amax": "--calib-amax", "smoothquant_alpha": "--smoothquant"}
    try:
        calibration.check()
        recipe.check()
    except QuantizationError as e:
        raise DitexportError(f"{flags.get(e.field, e.field)}: {e}") from None
    return calibration, recipe


def cmd_build(args) -> int:
    from ..api import ValidationFailedError, build
    from ..building import parse_precisions

    parse_precisions(args.precision)  # a bad list is refused before the model is built
    calibration, recipe = quantization_settings(args)
    out = export_dir_of(args)
    model = load_cli_model(args)
    print(f"model: {describe_model(model)}; {set_threads(args, model.config.hidden_size)}")
    try:
        export = build(model, out, precisions=args.precision, max_images=args.max_batch, opset=args.opset,
                       sample_steps=args.sample_steps, vae=args.vae, force=args.force, wait=not args.no_wait,
                       calibration=calibration, recipe=recipe)
    except ValidationFailedError:
        return 1  # the report, ending in FAILED, has been printed
    return 1 if export.engine["status"] == "failed" else 0  # its one line, with the retry, has been printed


def cmd_validate(args) -> int:
    from ..api import ValidationFailedError, open_export
    from ..artifacts import read_manifest

    export_dir, manifest = flagged_export(args, read_manifest)
    print(f"validate: {export_dir}; {set_threads(args, manifest['config']['hidden_size'])}")
    try:
        export = open_export(export_dir).validate(sample_steps=args.sample_steps, wait=not args.no_wait)
    except ValidationFailedError:
        return 1
    return 1 if export.engine["status"] == "failed" else 0
