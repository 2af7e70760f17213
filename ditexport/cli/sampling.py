"""`info`, `sample` and `eval`."""
from __future__ import annotations

from pathlib import Path

from ..errors import DitexportError
from .options import (check_device_name, check_output_file, check_seed_flag, describe_model, export_dir_of,
                      flagged_export, load_cli_model, rebuild_hint, resolve_device, sampler_config, set_threads)


# ----------------------------------------------------------------------------------------------- info

def cmd_info(args) -> int:
    import platform

    import torch

    from .. import __version__
    from ..model import DIT_CONFIGS, DiT

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

def sample_pipeline(args):
    """The `Pipeline` of sample's flags and the banner's thread text: the torch model itself, or the validated export
    (--export-dir, or the model flags' default one), whose config comes from its manifest (no torch model built)."""
    from ..backends.open import check_available
    from ..pipeline import Pipeline
    from ..source import source_of

    check_available(args.backend, args.device, args.precision)
    if args.backend == "torch":
        model = load_cli_model(args)
        threads = set_threads(args, model.config.hidden_size)
        decoder = args.vae or source_of(model).default_vae()
        return Pipeline.from_model(model, device=args.device, precision=args.precision, decoder=decoder,
                                   max_batch=args.max_batch, cuda_graph=args.cuda_graph,
                                   compile_mode=args.torch_compile), describe_model(model), threads
    from ..backends.open import export_manifest

    export_dir, manifest = flagged_export(args, export_manifest)
    threads = set_threads(args, manifest["config"]["hidden_size"])
    pipeline = Pipeline.from_export(export_dir, args.backend, args.precision, decoder=args.vae or "auto",
                                    device=args.device, max_batch=args.max_batch)
    return pipeline, f"export {export_dir}", threads


def cmd_sample(args) -> int:
    from ..images import write_samples
    from ..pipeline import CHUNK_IMAGES, IdentityDecoder

    # Everything the flags alone can refuse is refused before the model is built or anything sampled.
    sampler_cfg = sampler_config(args)
    check_seed_flag(args.seed)
    check_device_name(args.device)
    if args.classes is not None and not args.classes:
        raise DitexportError(f"--classes {args.classes.text!r} names no class label; give e.g. --classes 3,1,4")
    out = check_output_file(args.out)
    npz = check_output_file(args.npz, "--npz") if args.npz else None
    pipeline, where, threads = sample_pipeline(args)
    cfg = pipeline.config
    labels = args.classes or [i % cfg.num_classes for i in range(args.num_images)]
    chunks = pipeline.chunks(labels, seed=args.seed, sampler_cfg=sampler_cfg, progress=not args.quiet)  # checks
    undecoded = isinstance(pipeline.decoder, IdentityDecoder)
    if cfg.in_channels == 4 and undecoded:
        print("note: latent model without a VAE: writing the first 3 latent channels, not decoded images")
    print(f"model: {where}; backend: {pipeline.backend.describe()}, decoder: {pipeline.decoder.name}, {threads}; "
          f"{len(labels)} images, {args.steps} {args.sampler} steps, guidance {args.cfg_scale}")
    upscale = max(1, 64 // cfg.input_size) if undecoded else 1  # 8x8 digits are too small to see unscaled
    written = write_samples(chunks, out, len(labels), npz_path=npz, upscale=upscale)
    rows = min(len(labels), CHUNK_IMAGES) * (2 if args.cfg_scale != 1 else 1)
    chunks_text = f", {written['chunks']} chunks of up to {CHUNK_IMAGES} images" if written["chunks"] > 1 else ""
    print(f"wrote {out}: {written['total_s']:.2f} s in all, "
          f"{1000 * written['sampler_s'] / (written['steps'] * written['chunks']):.1f} ms per step "
          f"({written['steps']} steps, batch {rows} per forward{chunks_text})")
    if npz is not None:
        print(f"wrote {npz}: arr_0 of shape {written['shape']} uint8")
    return 0


# ----------------------------------------------------------------------------------------------- eval

def cmd_eval(args) -> int:
    from ..artifacts import atomic_write_json
    from ..backends.open import check_available, open_backend
    from ..zoo.digits_eval import evaluate_digits

    device = resolve_device(args.device)  # before the model: a missing GPU is refused at once
    check_available(args.backend, args.device, args.precision)
    model = load_cli_model(args)
    source = describe_model(model)
    threads = set_threads(args, model.config.hidden_size)
    if args.backend == "torch":
        backend = open_backend("torch", args.precision, model=model, device=device)
    else:
        export_dir = export_dir_of(args)
        backend = open_backend(args.backend, args.precision, model=model, export_dir=export_dir, device=args.device,
                               rebuild_hint=rebuild_hint(args, export_dir))
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
