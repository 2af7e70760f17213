"""The build's engine stage: this machine's TensorRT plans of an export, built from its validated graphs and
compared with ONNX Runtime (Polygraphy). A TensorRT problem costs the plans only: they are discarded, the validated
ONNX export is kept, and the manifest's engine entry says what failed and how to retry."""
from __future__ import annotations

import time
from pathlib import Path

from .. import artifacts
from ..artifacts import GRAPH_STEMS, VAE_GRAPH, onnx_filename
from ..errors import summary
from ..model import DiT
from ..progress import heartbeat
from .profile import BatchProfile


def engine_stage(export_dir: Path, model: DiT, precisions, profile: BatchProfile, log,
                  rebuild_command: str | None = None) -> dict:
    """TensorRT engines from the fp16 graphs (fp32 when fp16 is not built), where TensorRT and a GPU exist, then
    compared with ONNX Runtime (Polygraphy): the manifest's engine entry, which the ONNX verdict never depends on.

    Whatever fails here (the build, the comparison, a mismatch) is the plans' failure alone: this machine's plans
    are discarded, the validated ONNX export stays usable, and the entry and one log line say what failed and
    how to retry (the plain build command, which builds the missing engines of an up-to-date export).
    """
    from .. import engine

    reason = engine.tensorrt_unavailable_reason()
    if reason:
        log(f"engine: skipped — {reason}")
        return {"status": "skipped", "reason": reason}
    plans, made = {}, []
    try:
        for stem, onnx_path, batch in engine_targets(export_dir, model, precisions, profile):
            plan_path = engine.plan_path_for(export_dir, stem)
            made.append(plan_path)
            start = time.perf_counter()
            with heartbeat(log, f"engine: building {plan_path.name} from {onnx_path.name}"):
                meta = engine.build_engine(onnx_path, plan_path, min_batch=batch.min, opt_batch=batch.opt,
                                           max_batch=batch.max, rebuild_command=rebuild_command)
            log(f"engine: {plan_path.name} from {onnx_path.name} ({time.perf_counter() - start:.1f} s)")
            plans[stem] = {"plan": plan_path.name, "onnx": onnx_path.name,
                           "tensorrt_version": meta.get("tensorrt_version"), "gpu_name": meta.get("gpu_name")}
    except Exception as e:  # a TensorRT problem must not cost the validated ONNX graphs
        return discard_engines(export_dir, made, f"building the engines failed: {summary(e)}", None, log,
                               rebuild_command)
    return compare_engines(export_dir, model, {"status": "built", "plans": plans}, made, log, rebuild_command)


def engine_targets(export_dir: Path, model: DiT, precisions, profile: BatchProfile) -> list:
    """(plan stem, ONNX graph, batch profile) of each engine: the DiT's graphs in fp16 (fp32 when fp16 is not built)
    on `profile` (rows); each 8-bit graph's TensorRT form, plans of their own (`<stem>.<precision>.<gpu>.<trt>.plan`,
    strongly typed from the Q/DQ graph); and a latent export's VAE decoder in the fp16/fp32 precision on images (half
    the guided rows)."""
    from ..precisions import QUANT_PRECISIONS

    precision = "fp16" if "fp16" in precisions else "fp32"
    targets = [(stem, export_dir / onnx_filename(graph, precision), profile) for graph, stem in GRAPH_STEMS.items()]
    targets += [(f"{stem}.{p}", export_dir / onnx_filename(graph, p), profile) for p in precisions
                if p in QUANT_PRECISIONS for graph, stem in GRAPH_STEMS.items()]
    vae = export_dir / onnx_filename(VAE_GRAPH, precision)
    if vae.is_file():
        images = profile.max // (2 if model.config.has_null_class else 1)
        targets.append((VAE_GRAPH, vae, BatchProfile.for_images(images, guided=False)))
    return targets


def compare_engines(export_dir: Path, model: DiT, entry: dict, plans: list[Path], log,
                     rebuild_command: str | None) -> dict:
    """The engine entry with its TensorRT-vs-ONNX Runtime comparison (Polygraphy), or, when the comparison fails
    or cannot run, the failed entry of `discard_engines`."""
    from ..validate import tensorrt_parity

    parity = None
    try:
        parity = tensorrt_parity(export_dir, model, log=log)
        failure = None if parity.get("passed") is True else parity_failure(parity)
    except Exception as e:  # e.g. Polygraphy's TrtRunner cannot find libcudart (pip-only CUDA)
        failure = f"comparing the engines with ONNX Runtime failed: {summary(e)}"
    if failure is None:
        return {**entry, "parity": parity}
    return discard_engines(export_dir, plans, failure, parity, log, rebuild_command)


def parity_failure(parity: dict) -> str:
    """One line: how the engines disagree with ONNX Runtime, or why they were not compared."""
    if parity.get("status") != "compared":
        return f"the engines were not compared with ONNX Runtime: {parity.get('reason')}"
    bad = [r for r in parity["rows"] if not r["passed"]]
    worst = max(bad, key=lambda r: r["rel_err"] if r["finite"] else float("inf"))
    return (f"{len(bad)} of {len(parity['rows'])} TensorRT-vs-ONNX Runtime comparisons are outside the tolerance; "
            f"worst {worst['plan']} batch {worst['batch']}: rel err {worst['rel_err']:.2e}"
            f"{'' if worst['finite'] else ', not finite'} (tolerance {worst['tolerance']:.0e})")


def discard_engines(export_dir: Path, made: list[Path], failure: str, parity: dict | None, log,
                     rebuild_command: str | None) -> dict:
    """Removes the plans of a failed engine stage (a plan that failed is never published), says so in one line,
    and returns the manifest's engine entry."""
    from . import metadata_path

    for plan in made:
        plan.unlink(missing_ok=True)
        metadata_path(plan).unlink(missing_ok=True)
    retry = (rebuild_command or artifacts.rebuild_command(export_dir)).removesuffix(" --force")
    log(f"engine: FAILED — {failure}; the TensorRT plans were discarded and the validated ONNX export is kept "
        f"(--backend onnxruntime runs it); retry the engines with: {retry}")
    return {"status": "failed", "reason": failure, "retry": retry, **({"parity": parity} if parity else {})}


def add_missing_engines(export_dir: Path, model: DiT, precisions, profile: BatchProfile, log,
                         rebuild_command: str | None) -> bool:
    """An export validated where TensorRT was missing gets this machine's engines on its next build here."""
    from .. import engine

    if engine.tensorrt_unavailable_reason() is not None:
        return True
    if all(engine.plan_path_for(export_dir, stem).is_file()
           for stem, _, _ in engine_targets(export_dir, model, precisions, profile)):
        return True
    manifest = artifacts.read_manifest(export_dir)
    log(f"engine: {export_dir} has no engine for this GPU and TensorRT version; building it")
    manifest["engine"] = engine_stage(export_dir, model, precisions, profile, log, rebuild_command)
    artifacts.write_manifest(export_dir, manifest)
    return True  # the ONNX export stays valid whatever the engines did (their entry says it)


def recheck_engines(export_dir: Path, model: DiT, entry: dict, log, rebuild_command: str) -> dict:
    """`validate` compares this machine's plans with ONNX Runtime again, where TensorRT runs; the engine entry."""
    from .. import engine

    if entry.get("status") != "built" or engine.tensorrt_unavailable_reason(for_build=False) is not None:
        return entry
    plans = [engine.plan_path_for(export_dir, stem) for _, stem in engine.plan_stems()]
    if not any(plan.is_file() for plan in plans):
        return entry  # built on another GPU or TensorRT version
    return compare_engines(export_dir, model, entry, plans, log, rebuild_command)
