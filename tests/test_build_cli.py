"""`python -m ditexport build` / `validate` / `sample --backend onnxruntime`: the whole chain, its skip and its errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ditexport.artifacts import list_exports, read_manifest
from ditexport.cli import main

TINY = ["--model", "DiT-tiny/2", "--sample-steps", "3"]


# These models are tiny: one torch thread is faster than two, and immune to a busy second core.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(capsys, *args) -> tuple[int, str, str]:
    code = main(["build", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A complete tiny export, built once through the CLI; tests read it, or change a copy (`built_copy`)."""
    out = tmp_path_factory.mktemp("build") / "tiny"
    assert main(["build", *TINY, "--out", str(out), "--max-batch", "4"]) == 0
    return out


def test_build_writes_a_validated_export_with_its_manifest(built):
    out = built
    manifest = read_manifest(out)
    assert set(manifest["files"]) == {"model.onnx", "model.fp16.onnx", "cond.onnx", "cond.fp16.onnx"}
    assert manifest["config"]["hidden_size"] == 64 and manifest["model"] == "DiT-tiny/2"
    assert manifest["source"] == {"kind": "random", "model": "DiT-tiny/2", "checkpoint": None, "seed": 0}
    assert manifest["validation"]["passed"] is True
    assert manifest["io_spec"]["batch_profile"] == {"min": 1, "opt": 8, "max": 8}
    assert manifest["io_spec"]["opset"] == 18
    assert manifest["inputs"]["tools"]["onnxruntime"] and manifest["inputs"]["tools"]["torch"]
    assert manifest["engine"]["status"] == "skipped" and manifest["engine"]["reason"]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert {(c["file"], c["batch"]) for c in report["checks"]} == \
        {(f, b) for f in manifest["files"] for b in (1, 2, 5)}
    assert report["stress"]["passed"] and report["stress"]["all_fp16"]["finite"] is False
    assert [s["file"] for s in report["samples"]] == ["model.onnx", "model.fp16.onnx"]
    assert [e.path for e in list_exports(out.parent)] == [out]


@pytest.fixture
def built_copy(built, tmp_path):
    """A copy of the shared tiny export, for a test that rebuilds or damages it (the shared one stays intact)."""
    out = tmp_path / "tiny"
    shutil.copytree(built, out, copy_function=shutil.copy2)  # copy2 keeps the times the up-to-date check reads
    return out


@pytest.fixture
def heavy_work(monkeypatch):
    """Counts, without changing them, the graphs traced (torch.onnx.export) and the ONNX Runtime sessions opened."""
    import onnxruntime

    counts = {"traced": 0, "sessions": 0}
    trace, session = torch.onnx.export, onnxruntime.InferenceSession

    def counted_trace(*args, **kwargs):
        counts["traced"] += 1
        return trace(*args, **kwargs)

    class CountedSession(session):
        def __init__(self, *args, **kwargs):
            counts["sessions"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counted_trace)
    monkeypatch.setattr(onnxruntime, "InferenceSession", CountedSession)
    return counts


def test_second_build_is_up_to_date_and_force_rebuilds(built_copy, heavy_work, capsys):
    out = built_copy
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, text, _ = build(capsys, *TINY, "--out", str(out), "--max-batch", "4")
    assert code == 0 and "up to date" in text and "export:" not in text
    # Up to date means no work, observed: nothing traced, no graph run, no file rewritten.
    assert heavy_work == {"traced": 0, "sessions": 0}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    code, text, _ = build(capsys, *TINY, "--out", str(out), "--max-batch", "4", "--force")
    assert code == 0 and "export: model.onnx" in text and "PASSED" in text
    assert heavy_work["traced"] == 2 and heavy_work["sessions"] > 4  # both graphs traced, every file validated
    rewritten = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert all(rewritten[name] != stamps[name] for name in stamps)  # every file, manifest included
    # Another input (the engine profile's max batch) is another export: rebuilt without --force.
    code, text, _ = build(capsys, *TINY, "--out", str(out), "--max-batch", "2")
    assert code == 0 and "up to date" not in text and "export: model.onnx" in text
    assert read_manifest(out)["io_spec"]["batch_profile"]["max"] == 4
    assert read_manifest(built_copy)["validation"]["passed"] is True


def test_a_modified_file_is_not_up_to_date(built_copy, capsys):
    out = built_copy
    with open(out / "cond.fp16.onnx", "ab") as f:
        f.write(b"\0")
    code, text, _ = build(capsys, *TINY, "--out", str(out), "--max-batch", "4")
    assert code == 0 and "up to date" not in text and "export: cond.fp16.onnx" in text
    assert read_manifest(out)["validation"]["passed"]


def test_validate_command_and_a_truncated_graph(built, tmp_path, capsys):
    out = built
    assert main(["validate", "--export-dir", str(out), "--sample-steps", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("PASSED")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    graph = copy / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    assert main(["validate", "--export-dir", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.onnx" in err and "truncated" in err


def test_sample_with_the_onnxruntime_backend(built, tmp_path, capsys):
    out = built
    png = tmp_path / "grid.png"
    code = main(["sample", "--backend", "onnxruntime", "--model", "DiT-tiny/2", "--export-dir", str(out),
                 "--steps", "3", "--num-images", "2", "--quiet", "--out", str(png)])
    assert code == 0 and png.stat().st_size > 0
    assert "onnxruntime (fp32, CPU, model.onnx)" in capsys.readouterr().out
    code = main(["sample", "--backend", "onnxruntime", "--model", "DiT-tiny/2", "--precision", "fp16",
                 "--export-dir", str(out), "--steps", "3", "--num-images", "2", "--quiet", "--out", str(png)])
    assert code == 0 and "onnxruntime (fp16, CPU, model.fp16.onnx)" in capsys.readouterr().out
    code = main(["sample", "--backend", "onnxruntime", "--model", "DiT-tiny/2", "--export-dir",
                 str(tmp_path / "none"), "--quiet", "--out", str(png)])
    assert code == 2 and "build it first" in capsys.readouterr().err
    code = main(["sample", "--backend", "onnxruntime", "--model", "DiT-digits", "--export-dir", str(out),
                 "--quiet", "--out", str(png)])
    err = capsys.readouterr().err
    assert code == 2 and "another model config" in err
    # In words (issue 14, item 6), not raw JSON.
    assert "DiT-tiny/2 at 64 px" in err and "DiT-digits at 8 px" in err and "{" not in err


def test_onnxruntime_sessions_take_the_threads_of_the_flag(built, tmp_path, capsys, monkeypatch):
    """The intra-op threads of the session `sample` opens, observed on the real InferenceSession."""
    import onnxruntime

    threads = []

    class RecordingSession(onnxruntime.InferenceSession):
        def __init__(self, path, sess_options=None, *args, **kwargs):
            threads.append(sess_options.intra_op_num_threads)
            super().__init__(path, sess_options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", RecordingSession)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = built
    for flag, expected in ((["--torch-threads", "2"], 2), ([], 1)):  # DiT-tiny/2 is small: 1 by default
        assert main(["sample", "--backend", "onnxruntime", "--model", "DiT-tiny/2", "--export-dir", str(out),
                     "--steps", "2", "--num-images", "1", "--quiet", "--out", str(tmp_path / "x.png"), *flag]) == 0
        assert threads and set(threads) == {expected} and torch.get_num_threads() == expected
        threads.clear()
    capsys.readouterr()


def test_an_interrupted_rebuild_is_never_complete(built_copy, tmp_path, capsys, monkeypatch):
    """A forced rebuild of a complete export dies while exporting the cond graph: the old manifest is gone
    and no new one is written, so nothing treats the directory as an export."""
    import ditexport.export as export

    out = built_copy
    assert read_manifest(out)
    finish = export._finish

    def dies_on_cond(proto, config, graph, precision, opset, *quantization):
        if graph == "cond":
            raise KeyboardInterrupt
        return finish(proto, config, graph, precision, opset, *quantization)

    monkeypatch.setattr(export, "_finish", dies_on_cond)
    assert main(["build", *TINY, "--out", str(out), "--force"]) == 130
    assert (out / "model.onnx").is_file() and not (out / "manifest.json").exists()
    assert not (out / "cond.onnx").exists() and not (out / "report.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries either
    assert list_exports(tmp_path) == []
    capsys.readouterr()
    code = main(["sample", "--backend", "onnxruntime", "--model", "DiT-tiny/2", "--export-dir", str(out),
                 "--quiet", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "build it first" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "DiT-nope"], "unknown model 'DiT-nope'"),
    (["--precision", "int4"], "--precision"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    code, _, err = build(capsys, *args, "--out", str(tmp_path / "x"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "x").exists()


def test_checkpoint_config_mismatch_and_unwritable_output(tmp_path, capsys):
    from ditexport.model import create_model

    ckpt = tmp_path / "tiny.pt"
    torch.save(create_model("DiT-tiny/2", seed=0).state_dict(), ckpt)
    code, _, err = build(capsys, "--checkpoint", str(ckpt), "--config", "DiT-digits", "--out", str(tmp_path / "x"))
    assert code == 2 and "does not fit the model" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = build(capsys, "--checkpoint", str(ckpt), "--out", str(blocker / "export"))
    assert code == 2 and "cannot write to output directory" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_build_with_no_model_builds_the_builtin_digits_end_to_end(tmp_path, capsys, monkeypatch):
    from ditexport.errors import DitexportError
    from ditexport.zoo import builtin_weights

    try:
        builtin_weights("digits")
    except DitexportError as e:
        pytest.skip(f"built-in digits weights are missing: {e}")
    monkeypatch.chdir(tmp_path)  # the default output is exports/digits under the working directory
    code, text, _ = build(capsys, "--sample-steps", "10")
    assert code == 0, text
    manifest = read_manifest(tmp_path / "exports" / "digits")
    assert manifest["source"]["kind"] == "builtin" and len(manifest["source"]["weights_sha256"]) == 64
    report = json.loads((tmp_path / "exports" / "digits" / "report.json").read_text())
    assert [s["class_agreement"] for s in report["samples"]] == [1.0, 1.0]
    assert "engine: skipped —" in text and text.rstrip().splitlines()[-1].startswith("build: done")


# ------------------------------------------------------------------ the engine stage (issue 21, defect 1)

ENGINE_BUILD = ["--model", "DiT-tiny/2", "--precision", "fp32", "--sample-steps", "0", "--max-batch", "2"]
H100 = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


class TensorRTHere:
    """TensorRT and a GPU as the build sees them, on a machine with neither: the availability check passes, the
    engine build writes plan bytes with their real metadata (the bytes stand in for TensorRT's output), and
    `compare` stands in for the Polygraphy comparison, the call that fails."""

    def __init__(self, monkeypatch):
        # Imported before the patches: a module importing these names under them would keep the stand-ins.
        import ditexport.backends.tensorrt_backend  # noqa: F401
        from ditexport import engine
        from ditexport.engine import plans

        self.compared = []
        self.compare = self.agreeing
        monkeypatch.setattr(engine, "tensorrt_unavailable_reason", lambda for_build=True: None)
        for module in (engine, plans):
            monkeypatch.setattr(module, "current_environment", lambda device=None: dict(H100))
        monkeypatch.setattr(engine, "build_engine", self.build_engine)
        monkeypatch.setattr(engine, "compare_with_onnxruntime",
                            lambda onnx_path, plan_path, feeds, tolerance: self.compare(plan_path, feeds, tolerance))

    @staticmethod
    def build_engine(onnx_path, plan_path, *, min_batch, opt_batch, max_batch, rebuild_command=None, **_):
        from ditexport.artifacts import atomic_write_json
        from ditexport.engine import engine_metadata, metadata_path

        plan_bytes = b"plan of " + onnx_path.read_bytes()[:64]
        meta = engine_metadata(plan_path=plan_path, plan_bytes=plan_bytes, onnx_path=onnx_path, environment=H100,
                               profile={}, batch=(min_batch, opt_batch, max_batch), builder_optimization_level=3,
                               build_seconds=0.0, timing_cache_path=None, rebuild_command=rebuild_command)
        plan_path.write_bytes(plan_bytes)
        atomic_write_json(metadata_path(plan_path), meta)
        return meta

    def rows(self, plan_path, feeds, tolerance, rel_err):
        self.compared.append(plan_path.name)
        return [{"iteration": i, "output": "out", "batch": int(next(iter(feed.values())).shape[0]), "rel_err": rel_err,
                 "max_abs": 10 * rel_err, "finite": True, "passed": rel_err <= tolerance}
                for i, feed in enumerate(feeds)]

    def agreeing(self, plan_path, feeds, tolerance):
        return self.rows(plan_path, feeds, tolerance, 2e-7)


@pytest.fixture
def tensorrt_here(monkeypatch):
    return TensorRTHere(monkeypatch)


def engine_failed_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("engine: FAILED")]
    return line


def assert_onnx_export_intact(out):
    """The ONNX verdict stands: the manifest and report say PASSED, and ONNX Runtime opens and runs the graph."""
    from ditexport.backends.open import open_backend
    from ditexport.bench import forward_inputs

    manifest = read_manifest(out)
    report = json.loads((out / "report.json").read_text())
    assert manifest["validation"]["passed"] is True and report["passed"] is True and "tensorrt" not in report
    assert not list(out.glob("*.plan")) and not list(out.glob("*.plan.json"))  # the failed plans are discarded
    with open_backend("onnxruntime", "fp32", export_dir=out, device="cpu") as backend:
        assert torch.isfinite(backend(*forward_inputs(backend.config, 2, True, torch.device("cpu")))).all()
    return manifest


@pytest.mark.slow
def test_a_tensorrt_comparison_that_cannot_run_costs_the_plans_not_the_export(tensorrt_here, tmp_path, capsys):
    """Polygraphy's TrtRunner cannot start (e.g. it finds no libcudart with pip-only CUDA): before issue 21 the
    build aborted and deleted the directory it had created."""
    from ditexport.backends.open import _open_tensorrt
    from ditexport.engine import EngineError

    def cannot_start(plan_path, feeds, tolerance):
        raise EngineError(f"Polygraphy could not compare {plan_path.name} with ONNX Runtime: OSError: libcudart.so: "
                          "cannot open shared object file: No such file or directory")

    tensorrt_here.compare = cannot_start
    out = tmp_path / "tiny"
    code, text, _ = build(capsys, *ENGINE_BUILD, "--out", str(out))
    assert code == 1
    manifest = assert_onnx_export_intact(out)
    engine = manifest["engine"]
    assert engine["status"] == "failed" and "parity" not in engine
    assert engine["reason"].startswith("comparing the engines with ONNX Runtime failed: EngineError: Polygraphy")
    assert "libcudart.so" in engine["reason"]
    line, retry = engine_failed_line(text), engine["retry"]
    assert retry == f"python -m ditexport build --model DiT-tiny/2 --precision fp32 --max-batch 2 --export-dir {out}"
    assert engine["reason"] in line and line.endswith(f"retry the engines with: {retry}")
    assert "build: done, without TensorRT engines" in text
    # The tensorrt backend says why the export has no engine, and how to retry.
    with pytest.raises(EngineError, match="the last engine build of this export failed: comparing the engines"):
        _open_tensorrt(out, None, torch.device("cuda"), None, None)
    # The retry: the plain build command builds only the engines (the export is up to date) and records them.
    tensorrt_here.compare = tensorrt_here.agreeing
    code, text, _ = build(capsys, *retry.split()[4:])
    assert code == 0 and "up to date" in text and "export: model.onnx" not in text
    engine = read_manifest(out)["engine"]
    assert engine["status"] == "built" and engine["parity"]["passed"] is True
    assert sorted(p.name for p in out.glob("*.plan")) == ["cond.nvidia-h100-80gb-hbm3.trt10.13.0.35.plan",
                                                          "model.nvidia-h100-80gb-hbm3.trt10.13.0.35.plan"]


@pytest.mark.slow
def test_engines_that_disagree_with_onnxruntime_are_discarded_and_the_export_stays_valid(tensorrt_here, tmp_path,
                                                                                         capsys):
    """A TensorRT mismatch: before issue 21 it made the ONNX validation fail, so every consumer refused the export."""
    from ditexport.building import ensure_export
    from ditexport.model import create_model

    tensorrt_here.compare = lambda plan_path, feeds, tolerance: tensorrt_here.rows(plan_path, feeds, tolerance, 2.4e-2)
    out = tmp_path / "tiny"
    code, text, _ = build(capsys, *ENGINE_BUILD, "--out", str(out))
    assert code == 1 and tensorrt_here.compared == ["model.nvidia-h100-80gb-hbm3.trt10.13.0.35.plan",
                                                    "cond.nvidia-h100-80gb-hbm3.trt10.13.0.35.plan"]
    manifest = assert_onnx_export_intact(out)
    engine = manifest["engine"]
    assert engine["status"] == "failed" and engine["parity"]["passed"] is False
    assert len(engine["parity"]["rows"]) == 4  # 2 plans x batches 1 and 2 (5 is above the profile's max, 4)
    assert engine["reason"].startswith("4 of 4 TensorRT-vs-ONNX Runtime comparisons are outside the tolerance")
    assert "rel err 2.40e-02 (tolerance 1e-05)" in engine_failed_line(text)
    # Every consumer still takes the ONNX export (bench and gpu-check go through ensure_export).
    model = create_model("DiT-tiny/2", seed=0)
    assert ensure_export(model, manifest["source"], out, log=lambda m: None)[0] == out
