"""The argument parser: every sub-command, its flags, their defaults and help."""
from __future__ import annotations

import argparse

from .commands import cmd_bench, cmd_build, cmd_demo, cmd_export_vae, cmd_gpu_check, cmd_train_digits, cmd_validate
from ..precisions import (ACTIVATION_AMAX, CALIBRATION_LIMITS, PRECISIONS, QUANTIZABLE,
                          CalibrationSettings, QuantRecipe)
from .sampling import cmd_eval, cmd_info, cmd_sample
from ..limits import DemoLimits, add_limit_arguments
from ..serving.command import add_serve_parser
from ..bench.settings import BENCH_BACKENDS, BenchSettings
from ..settings import SAMPLING_METHODS, BuildSettings, DigitsTrainConfig, EvalSettings, SamplerConfig


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
    g.add_argument("--checkpoint", default=None,
                   help="a .pt / .safetensors checkpoint (official or train.py), or a diffusers model directory "
                        "(transformer/, vae/, scheduler/)")
    g.add_argument("--config", default=None, help="config name for --checkpoint when it cannot be inferred")
    g.add_argument("--image-size", type=int, default=None, choices=(256, 512),
                   help="image size of an official latent model (sets input size = size / 8)")


SAMPLERS = SAMPLING_METHODS
SAMPLER_HELP = (f"ddpm (official), ddim, or dpmpp-2m: DPM-Solver++ (2M), 20-25 steps as diffusers "
                f"(default: {SamplerConfig.method})")
SAMPLER = SamplerConfig()  # the defaults of every sampler flag


def add_sampler_arguments(p: argparse.ArgumentParser, guidance_help: str | None = None) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=positive_int, default=SAMPLER.num_steps,
                   help=f"sampling steps (default: {SAMPLER.num_steps}, official)")
    g.add_argument("--sampler", choices=SAMPLERS, default=SAMPLER.method, help=SAMPLER_HELP)
    g.add_argument("--cfg-scale", type=float, default=SAMPLER.guidance_scale,
                   help=guidance_help or f"classifier-free guidance scale; 1 disables guidance (default: "
                                         f"{SAMPLER.guidance_scale}, official)")
    g.add_argument("--seed", type=int, default=0, help="seed of the one CPU generator behind all noise (default: 0)")


def add_sampler_detail_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eta", type=float, default=SAMPLER.eta, help=f"DDIM stochasticity (default: {SAMPLER.eta:g})")
    p.add_argument("--guide-all-channels", action="store_true", default=SAMPLER.guide_all_channels,
                   help="guide every latent channel (diffusers) instead of the official first 3")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads of torch and ONNX Runtime (default: OMP_NUM_THREADS if set, else 1 for models "
                        "of width <= 256 such as the built-in one, else the usable cores less one)")


# ---------------------------------------------------------------------------------------------- bench

def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if any(b < 2 or b % 2 for b in sizes):
        raise argparse.ArgumentTypeError(f"guided batch sizes are even and at least 2 (2 rows per image), got {text!r}")
    return sizes


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m ditexport",
                            description="Export, validate, compile and serve class-conditional DiTs.")
    add_verbosity_arguments(parser, default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices and the model registry")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="sample an image grid", description="Sample class-conditional images "
                       "and write them as a PNG grid; prints the time per step.")
    add_model_arguments(p)
    add_sampler_arguments(p)
    add_sampler_detail_arguments(p)
    p.add_argument("--classes", type=parse_labels, default=None, help="comma-separated class labels, e.g. 3,1,4")
    p.add_argument("--num-images", type=positive_int, default=8,
                   help="images when --classes is not given, cycling through the classes (default: 8)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default: cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="torch: fp32 or fp16 (fp16 on the CPU is slow but correct); onnxruntime/tensorrt: the "
                        "export's graph of this precision (int8 on the CPU runs its CPU form; default: fp32)")
    p.add_argument("--max-batch", type=positive_int, default=None, help="split forwards above this batch")
    p.add_argument("--cuda-graph", action="store_true",
                   help="torch on CUDA: capture the forward in a CUDA graph per batch size and replay it")
    p.add_argument("--torch-compile", default=None, metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch: run torch.compile(model, mode=MODE) (opt-in; compiling takes a while)")
    p.add_argument("--export-dir", default=None,
                   help="export to run with --backend onnxruntime/tensorrt (default: exports/<model name>)")
    p.add_argument("--vae", default=None,
                   help="decode with this local diffusers AutoencoderKL in torch (the reference; default: the "
                        "export's VAE graphs on --backend where it has them, or a diffusers model directory's vae/)")
    p.add_argument("--out", default="samples.png", help="output PNG (default: samples.png)")
    p.add_argument("--npz", default=None, metavar="PATH",
                   help="also write the samples for FID as the official sample_ddp.py: arr_0, N x H x W x C uint8")
    add_threads_argument(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="serve the Gradio web demo", description="Serve the Gradio demo: the "
                       "built-in digits model and every export under --exports, on the runtimes this machine has.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: 7860, or the next free one up to 7959)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="send requests to a running `python -m ditexport serve` (e.g. http://127.0.0.1:8000) "
                        "instead of running models here")
    p.add_argument("--exports", default="exports", help="export root to offer models from (default: exports)")
    p.add_argument("--device", default="cpu", help="torch device for the torch backend: cpu, cuda or auto")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory, for latent models")
    add_limit_arguments(p, DemoLimits)  # --max-steps, --max-images, --max-guidance, --concurrency, --max-queue
    add_threads_argument(p)  # the widest model served decides the default
    p.set_defaults(func=cmd_demo)

    add_serve_parser(sub, positive_int, add_threads_argument)  # the HTTP service; Ray is imported only when it runs

    p = sub.add_parser("train-digits", help="retrain the built-in digits DiT",
                       description="Train the built-in digits DiT on scikit-learn's bundled 8x8 digits with DiT's "
                       "recipe (seeded, reproducible); writes EMA weights.safetensors and config.json.")
    train = DigitsTrainConfig()
    p.add_argument("--steps", type=positive_int, default=train.steps, help=f"optimiser steps (default: {train.steps})")
    p.add_argument("--batch-size", type=positive_int, default=train.batch_size,
                   help=f"images per step (default: {train.batch_size})")
    p.add_argument("--lr", type=float, default=train.lr, help=f"peak AdamW learning rate (default: {train.lr:g})")
    p.add_argument("--seed", type=int, default=train.seed,
                   help=f"seed of initialisation, batches, t, noise and dropout (default: {train.seed})")
    p.add_argument("--out", default=None, help="output directory (default: a new runs/digits-<date>-<time>)")
    p.add_argument("--overwrite-builtin", action="store_true",
                   help="write into the package's ditexport/zoo/digits, replacing the shipped weights")
    add_threads_argument(p)  # results are bit-identical only for the same thread count
    p.set_defaults(func=cmd_train_digits)

    p = sub.add_parser("eval", help="measure a digits model: class agreement and Fréchet distance",
                       description="Sample N digits per class with and without guidance and score them against "
                       "the real digits: the share a real-digit classifier assigns to the requested class, and "
                       "a Fréchet distance in pixel space beside the real-vs-real floor.")
    add_model_arguments(p)
    p.add_argument("--num-per-class", type=positive_int, default=EvalSettings.num_per_class,
                   help=f"digits per class (default: {EvalSettings.num_per_class})")
    add_sampler_arguments(p, guidance_help="guidance scale; the unguided scale 1 is always measured beside it "
                                           f"(default: {SAMPLER.guidance_scale})")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default: cpu)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="run the torch model, or the export's graphs or plans (default: torch)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the precision to run (onnxruntime/tensorrt: the export's graph of it; default: fp32)")
    p.add_argument("--export-dir", default=None,
                   help="export to run with --backend onnxruntime/tensorrt (default: exports/<model name>)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    add_threads_argument(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmark every backend this machine has",
                       description="Time one model through every available backend side by side: ms per forward, "
                       "images/s for 250- and 50-step sampling, % of the fp16 matmul rate (GPU) and the ratio to "
                       "torch eager; writes JSON and a PNG plot and ends with a table.")
    add_model_arguments(p)
    bench, quick = BenchSettings(), BenchSettings.quick_settings()
    p.add_argument("--backends", default=None,
                   help=f"comma-separated subset of {', '.join(BENCH_BACKENDS)} (default: all; those this machine "
                        "cannot run, or whose graph the export lacks, are skipped)")
    p.add_argument("--device", default=bench.device,
                   help=f"cpu, cuda or auto (default: {bench.device}; auto is the GPU when there is one)")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=bench.batch_sizes,
                   help="guided forward batch sizes, 2 rows per image (default: "
                        f"{','.join(map(str, bench.batch_sizes))})")
    p.add_argument("--no-unguided", action="store_true", default=not bench.unguided,
                   help="skip the unguided batch-1 row")
    p.add_argument("--quick", action="store_true", default=bench.quick,
                   help=f"fast run: {quick.warmup} warm-up + {quick.iters} timed calls, a {quick.sample_steps}-step "
                        "end-to-end sample, a smaller matmul")
    p.add_argument("--warmup", type=positive_int, default=None,
                   help=f"untimed calls before timing (default: {bench.warmup}; --quick: {quick.warmup})")
    p.add_argument("--iters", type=positive_int, default=None,
                   help=f"timed calls per measurement (default: {bench.iters}; --quick: {quick.iters})")
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help=f"steps of the end-to-end guided sample (default: {bench.sample_steps}; --quick: "
                        f"{quick.sample_steps})")
    p.add_argument("--compile-mode", default=bench.compile_mode,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help=f"torch.compile mode of the torch-compile backend (default: {bench.compile_mode})")
    p.add_argument("--builder-optimization-level", type=int, default=bench.builder_optimization_level,
                   choices=range(0, 6),
                   help=f"TensorRT builder optimization level for the bench engine (default: "
                        f"{bench.builder_optimization_level})")
    p.add_argument("--export-dir", default=None,
                   help="the export whose ONNX graphs and engine to run (default: exports/<model name>, the one "
                        "`build` makes, built there first when missing)")
    p.add_argument("--out", default=bench.out_dir, help=f"output directory (default: {bench.out_dir})")
    add_threads_argument(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gpu-check", help="run every GPU path this machine has, in one table",
                       description="On a machine with an NVIDIA GPU: torch fp16 eager, CUDA graph, torch.compile, "
                       "ONNX Runtime CUDA (with onnxruntime-gpu) and TensorRT (when installed) on the digits model and "
                       "DiT-XL/2 at 256 px (random weights): relative error against fp32 torch, ms per forward at "
                       "batches 2 and 64, one 250-step guided sample each; every row isolated and time-capped, one "
                       "table last. Exit code 1 when a row failed, 3 when a path present did not run (INCOMPLETE), "
                       "2 without a GPU.")
    p.add_argument("--models", default="digits,DiT-XL/2",
                   help="comma-separated: digits and/or registry configs at 256 px (default: digits,DiT-XL/2)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the rows, after set-up (models, exports); rows that cannot start in time say "
                        "so (default: 450)")
    p.add_argument("--builder-optimization-level", type=int, default=2, choices=range(0, 6),
                   help="TensorRT builder level of the check's engines (default: 2, to fit the budget; "
                        "bench uses 3)")
    p.add_argument("--out", default="exports/gpu-check",
                   help="where the exports, engines and gpu-check.json go; reused by a rerun (default: "
                        "exports/gpu-check)")
    p.set_defaults(func=cmd_gpu_check)

    p = sub.add_parser("export-vae", help="export the VAE decoder to ONNX",
                       description="Export a diffusers AutoencoderKL decoder from a local directory to ONNX fp32/fp16 "
                       "with a dynamic batch and validate it on ONNX Runtime against torch (fp16 emulated on the CPU), "
                       "on its own. `build --vae DIR` runs the same stage inside a DiT export, where sample, serve and "
                       "the demo decode with it, and compiles it with the DiT's engines.")
    p.add_argument("--vae", required=True, help="local directory of a diffusers AutoencoderKL")
    p.add_argument("--out", default="exports/vae", help="output directory (default: exports/vae)")
    p.add_argument("--image-size", type=int, default=256,
                   help="image side the decoder produces; latent side = size / the VAE's factor (default: 256)")
    p.add_argument("--latent-size", type=positive_int, default=None, help="latent side (overrides --image-size)")
    p.add_argument("--precision", default="fp32,fp16", help="comma-separated: fp32, fp16 (default: both)")
    p.add_argument("--opset", type=int, default=BuildSettings.opset,
                   help=f"ONNX opset (default: {BuildSettings.opset})")
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
    build = BuildSettings()
    p.add_argument("--precision", default=",".join(build.precisions),
                   help=f"comma-separated graph precisions of {', '.join(PRECISIONS)}; fp32 is always built, as the "
                        f"reference (default: {','.join(build.precisions)}); int8/fp8 are calibrated Q/DQ graphs "
                        "(docs/quantization.md)")
    g = p.add_argument_group("8-bit graphs (int8, fp8)")
    g.add_argument("--calib-images", type=int, default=CalibrationSettings.images, metavar="N",
                   help=f"images sampled to calibrate, {CALIBRATION_LIMITS['images'][0]} to "
                        f"{CALIBRATION_LIMITS['images'][1]} (default: {CalibrationSettings.images})")
    g.add_argument("--calib-steps", type=int, default=CalibrationSettings.steps, metavar="N",
                   help=f"sampler steps of each calibration run, {CALIBRATION_LIMITS['steps'][0]} to "
                        f"{CALIBRATION_LIMITS['steps'][1]} (default: {CalibrationSettings.steps}, "
                        f"{CalibrationSettings.method})")
    g.add_argument("--calib-amax", choices=ACTIVATION_AMAX, default=QuantRecipe.activation_amax,
                   help=f"activation range: the largest |x| seen, or the largest per-call {QuantRecipe.percentile} "
                        f"percentile (default: {QuantRecipe.activation_amax})")
    g.add_argument("--smoothquant", type=float, default=QuantRecipe.smoothquant_alpha, metavar="ALPHA",
                   help="int8: SmoothQuant's per-channel migration with this alpha, between 0 and 1 (default: off)")
    g.add_argument("--quantize", default=",".join(QuantRecipe.layers), metavar="LAYERS",
                   help=f"comma-separated GEMMs to quantize, of {', '.join(QUANTIZABLE)} (default: "
                        f"{','.join(QuantRecipe.layers)}; the rest stay in the fp16 graph's precision)")
    p.add_argument("--max-batch", type=positive_int, default=build.max_images,
                   help="images per request the engine profile covers; guidance doubles the rows "
                        f"(default: {build.max_images})")
    p.add_argument("--opset", type=int, default=build.opset,
                   help=f"ONNX opset (default: {build.opset}; 23+ exports attention as the ONNX Attention op)")
    p.add_argument("--sample-steps", type=int, default=build.sample_steps,
                   help="steps of the sample-level parity check, 0 to skip (default: 50 for digits, else 5)")
    p.add_argument("--vae", default=build.vae,
                   help="latent models: a local diffusers AutoencoderKL directory whose decoder is exported, validated "
                        "and compiled into the same export (default: a diffusers model directory's vae/)")
    p.add_argument("--force", action="store_true", default=build.force,
                   help="rebuild even when the export is up to date")
    add_threads_argument(p)
    p.add_argument("--no-wait", action="store_true", default=not build.wait,
                   help="refuse instead of waiting when another build is writing the export directory")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("validate", help="re-validate an existing export",
                       description="Re-run the validation of an export against the model it was built from; "
                       "writes report.json and ends with PASSED or FAILED.")
    add_model_arguments(p)
    p.add_argument("--export-dir", default=None,
                   help="export directory (default: the model's, as for build); with model flags, the export "
                        "must have been built from that model")
    p.add_argument("--sample-steps", type=int, default=BuildSettings.sample_steps,
                   help="steps of the sample-level parity check, 0 to skip (default: 50 for digits, else 5)")
    add_threads_argument(p)
    p.add_argument("--no-wait", action="store_true", default=not BuildSettings.wait,
                   help="refuse instead of waiting while a build writes the export")
    p.set_defaults(func=cmd_validate)
    for command in sub.choices.values():  # -v/-q also after the sub-command
        add_verbosity_arguments(command, default=argparse.SUPPRESS)
    return parser


def add_verbosity_arguments(p: argparse.ArgumentParser, default) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=default, help="more detail (debug lines)")
    g.add_argument("-q", "--quiet", action="count", default=default, help="no progress bars; warnings and errors only")
