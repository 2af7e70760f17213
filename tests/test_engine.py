"""TensorRT engines: profile, naming, metadata, compatibility and integrity checks on CPU; the build on a GPU."""
import json
from pathlib import Path

import pytest
import torch

from ditexport.artifacts import atomic_write_json
from ditexport.engine import (EngineError, batch_profiles, build_engine, check_engine_compatibility,
                              check_onnx_unchanged, engine_metadata, engine_profile, find_plan, load_engine,
                              metadata_path, onnx_input_shapes, onnx_precision, plan_bytes_from_onnx,
                              plan_filename, plan_precision, profile_for_batch, profile_shapes,
                              read_engine_metadata, sanitize_gpu_name, tensorrt_unavailable_reason,
                              tensorrt_version_problem, verify_plan_file)
from ditexport.errors import DitexportError

H100 = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
TRT_REASON = tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def tiny_fp16_onnx(tmp_path_factory):
    pytest.importorskip("onnx_graphsurgeon", reason="the export needs onnx-graphsurgeon: pip install 'ditexport[trt]'")
    from ditexport.export import export_onnx
    from ditexport.model import create_model

    path = tmp_path_factory.mktemp("onnx") / "model.fp16.onnx"
    return export_onnx(create_model("DiT-tiny/2", seed=0), path, precision="fp16")


@pytest.fixture(scope="module")
def tiny_fp32_onnx(tmp_path_factory):
    pytest.importorskip("onnx_graphsurgeon", reason="the export needs onnx-graphsurgeon: pip install 'ditexport[trt]'")
    from ditexport.export import export_onnx
    from ditexport.model import create_model

    path = tmp_path_factory.mktemp("onnx32") / "model.onnx"
    return export_onnx(create_model("DiT-tiny/2", seed=0), path)


def write_plan(directory, plan_bytes: bytes, onnx_path, environment=H100, stem="model", rebuild_command=None):
    """A plan file and its metadata as build_engine writes them (the bytes stand in for TensorRT's output:
    what is under test is the bookkeeping around them)."""
    plan = directory / plan_filename(environment["gpu_name"], environment["tensorrt_version"], stem)
    plan.write_bytes(plan_bytes)
    meta = engine_metadata(plan_path=plan, plan_bytes=plan_bytes, onnx_path=onnx_path, environment=environment,
                           profile={}, batch=(1, 16, 16), builder_optimization_level=3, build_seconds=1.0,
                           timing_cache_path=None, rebuild_command=rebuild_command)
    atomic_write_json(metadata_path(plan), meta)
    return plan, meta


# ------------------------------------------------------------------------------------ profile and names

def test_engine_profile_doubles_for_guidance():
    assert engine_profile(8) == (1, 16, 16)
    assert engine_profile(8, guided=False) == (1, 8, 8)
    assert engine_profile(32, opt_batch_images=1) == (1, 2, 64)
    with pytest.raises(ValueError, match="max batch must be at least 1 image, got 0"):
        engine_profile(0)
    with pytest.raises(ValueError, match="opt batch must be between 1 and 4 images, got 5"):
        engine_profile(4, opt_batch_images=5)


def test_profile_shapes_from_a_real_export(tiny_fp16_onnx):
    shapes = onnx_input_shapes(tiny_fp16_onnx)
    assert list(shapes) == ["x", "t", "y"]
    assert isinstance(shapes["x"][0], str) and shapes["x"][1:] == [4, 8, 8]
    profile = profile_shapes(shapes, *engine_profile(8))
    assert profile["x"] == {"min": [1, 4, 8, 8], "opt": [16, 4, 8, 8], "max": [16, 4, 8, 8]}
    assert profile["t"] == {"min": [1], "opt": [16], "max": [16]}
    with pytest.raises(ValueError, match=r"1 <= min <= opt <= max, got 4, 2, 8"):
        profile_shapes(shapes, 4, 2, 8)


def test_one_profile_per_timed_batch_covers_every_batch_once():
    ranges = batch_profiles([64, 2, 8, 32, 1, 8])
    assert ranges == [(1, 1, 1), (2, 2, 2), (3, 8, 8), (9, 32, 32), (33, 64, 64)]
    # Every batch runs on the profile timed nearest above it: 1 -> 1, 2 -> 2, 3..8 -> 8, 9..32 -> 32, 33..64 -> 64.
    expected = [0] * 1 + [1] * 1 + [2] * 6 + [3] * 24 + [4] * 32
    assert [profile_for_batch(ranges, batch) for batch in range(1, 65)] == expected
    assert [ranges[profile_for_batch(ranges, b)][1] for b in (1, 2, 8, 32, 64)] == [1, 2, 8, 32, 64]
    assert batch_profiles([16]) == [(1, 16, 16)]
    with pytest.raises(EngineError, match="no optimization profile .* batch 65"):
        profile_for_batch(ranges, 65)
    with pytest.raises(ValueError, match=r"profile batches must be at least 1, got \[0, 2\]"):
        batch_profiles([0, 2])


def test_overlapping_profiles_prefer_the_nearest_opt():
    ranges = [(1, 64, 64), (1, 2, 8)]  # e.g. a plan built elsewhere with a wide profile first
    assert profile_for_batch(ranges, 2) == 1 and profile_for_batch(ranges, 8) == 1
    assert profile_for_batch(ranges, 40) == 0


def test_profile_refuses_fixed_batch_and_other_dynamic_axes():
    with pytest.raises(EngineError, match="fixed batch"):
        profile_shapes({"x": [2, 4, 8, 8]}, 1, 2, 4)
    with pytest.raises(EngineError, match="besides the batch"):
        profile_shapes({"x": ["batch", 4, "h", "w"]}, 1, 2, 4)


def test_plan_names_carry_gpu_and_tensorrt_version():
    assert sanitize_gpu_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert sanitize_gpu_name("  NVIDIA GeForce RTX 4090 (laptop) ") == "nvidia-geforce-rtx-4090-laptop"
    assert plan_filename("NVIDIA H100 80GB HBM3", "10.13.0.35") == "model.nvidia-h100-80gb-hbm3.trt10.13.0.35.plan"
    assert plan_filename("NVIDIA A10G", "11.1.0", stem="vae") == "vae.nvidia-a10g.trt11.1.0.plan"


# ------------------------------------------------------------------------------------ compatibility

PLAN = Path("exports/digits/model.nvidia-h100-80gb-hbm3.trt10.13.0.35.plan")
# A plan whose build recorded no command is rebuilt by its export directory's command (artifacts.rebuild_command).
REBUILD = "python -m ditexport build --export-dir exports/digits --force"


def test_same_machine_is_compatible():
    assert check_engine_compatibility(dict(H100), dict(H100), PLAN) == []


def test_other_tensorrt_version_is_refused_with_the_rebuild_command():
    with pytest.raises(EngineError) as info:
        check_engine_compatibility(dict(H100), {**H100, "tensorrt_version": "10.14.1.48"}, PLAN)
    message = str(info.value)
    assert "10.13.0.35" in message and "10.14.1.48" in message and REBUILD in message


def test_other_architecture_is_refused():
    a100 = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    with pytest.raises(EngineError, match="architecture") as info:
        check_engine_compatibility(dict(H100), a100, PLAN)
    assert "A100" in str(info.value) and "H100" in str(info.value)


def test_same_architecture_other_model_only_warns():
    h100_pcie = {**H100, "gpu_name": "NVIDIA H100 PCIe"}
    warnings = check_engine_compatibility(dict(H100), h100_pcie, PLAN)
    assert len(warnings) == 1 and "H100 PCIe" in warnings[0]


def test_recorded_rebuild_command_is_the_one_suggested():
    meta = {**H100, "rebuild_command": "python -m ditexport build --force --model DiT-XL/2"}
    with pytest.raises(EngineError, match="--model DiT-XL/2"):
        check_engine_compatibility(meta, {**H100, "tensorrt_version": "11.0.0"}, PLAN)


# ------------------------------------------------------------------------------------ files and integrity

def test_metadata_round_trip_and_intact_plan(tmp_path, tiny_fp16_onnx):
    plan, meta = write_plan(tmp_path, b"\x01plan-bytes" * 100, tiny_fp16_onnx)
    read = read_engine_metadata(plan)
    assert read == json.loads(json.dumps(meta))
    assert read["plan_bytes"] == 1100 and read["onnx_file"] == "model.fp16.onnx"
    assert read["strongly_typed"] is True and read["batch"] == {"min": 1, "opt": 16, "max": 16}
    verify_plan_file(plan, read)  # no error
    check_onnx_unchanged(read, tiny_fp16_onnx)


def test_plan_precision_is_the_graphs(tmp_path, tiny_fp16_onnx, tiny_fp32_onnx):
    assert onnx_precision(tiny_fp16_onnx) == "fp16" and onnx_precision(tiny_fp32_onnx) == "fp32"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, meta16 = write_plan(tmp_path / "a", b"plan", tiny_fp16_onnx)
    _, meta32 = write_plan(tmp_path / "b", b"plan", tiny_fp32_onnx)
    assert (meta16["precision"], meta32["precision"]) == ("fp16", "fp32")
    assert (plan_precision(meta16), plan_precision(meta32)) == ("fp16", "fp32")
    # Metadata written before the field existed: the ONNX file name says it.
    assert plan_precision({"onnx_file": "model.onnx"}) == "fp32"
    assert plan_precision({"onnx_file": "cond.fp16.onnx"}) == "fp16"


def test_metadata_of_several_profiles(tmp_path, tiny_fp16_onnx):
    ranges = batch_profiles([1, 2, 8])
    profiles = [profile_shapes(onnx_input_shapes(tiny_fp16_onnx), *r) for r in ranges]
    meta = engine_metadata(plan_path=tmp_path / "model.plan", plan_bytes=b"plan", onnx_path=tiny_fp16_onnx,
                           environment=H100, profile=profiles[0], batch=ranges[0], profiles=profiles,
                           batch_ranges=ranges, builder_optimization_level=3, build_seconds=1.0,
                           timing_cache_path=None)
    assert meta["batch_profiles"] == [[1, 1, 1], [2, 2, 2], [3, 8, 8]]
    assert meta["batch"] == {"min": 1, "opt": 1, "max": 8}
    assert [p["x"]["opt"][0] for p in meta["profiles"]] == [1, 2, 8] and meta["profile"] == profiles[0]


def test_truncated_plan_is_refused(tmp_path, tiny_fp16_onnx):
    plan, meta = write_plan(tmp_path, b"x" * 1000, tiny_fp16_onnx)
    plan.write_bytes(b"x" * 600)
    with pytest.raises(EngineError, match="corrupt: 600 bytes") as info:
        verify_plan_file(plan, read_engine_metadata(plan))
    assert f"python -m ditexport build --export-dir {tmp_path} --force" in str(info.value)


def test_altered_plan_of_the_same_size_is_refused(tmp_path, tiny_fp16_onnx):
    plan, _ = write_plan(tmp_path, bytes(range(256)) * 4, tiny_fp16_onnx)
    data = bytearray(plan.read_bytes())
    data[100] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="SHA-256"):
        verify_plan_file(plan, read_engine_metadata(plan))


def test_stale_plan_is_refused_when_the_onnx_changed(tmp_path, tiny_fp16_onnx):
    onnx_copy = tmp_path / "model.fp16.onnx"
    onnx_copy.write_bytes(tiny_fp16_onnx.read_bytes())
    plan, meta = write_plan(tmp_path, b"plan", onnx_copy)
    onnx_copy.write_bytes(onnx_copy.read_bytes() + b"\0")
    with pytest.raises(EngineError, match="stale"):
        check_onnx_unchanged(meta, onnx_copy)


def test_missing_or_broken_metadata(tmp_path, tiny_fp16_onnx):
    with pytest.raises(EngineError, match="not found"):
        read_engine_metadata(tmp_path / "model.x.plan")
    plan, _ = write_plan(tmp_path, b"plan", tiny_fp16_onnx)
    metadata_path(plan).write_text("{not json")
    with pytest.raises(EngineError, match="cannot read engine metadata"):
        read_engine_metadata(plan)
    metadata_path(plan).write_text(json.dumps({"gpu_name": "x"}))
    with pytest.raises(EngineError, match="lacks"):
        read_engine_metadata(plan)
    metadata_path(plan).unlink()
    with pytest.raises(EngineError, match="no metadata"):
        read_engine_metadata(plan)


def test_find_plan_picks_this_machines_plan(tmp_path, tiny_fp16_onnx):
    with pytest.raises(EngineError, match="no TensorRT engine"):
        find_plan(tmp_path, environment=H100)
    a100 = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    other, _ = write_plan(tmp_path, b"plan", tiny_fp16_onnx, environment=a100)
    with pytest.raises(EngineError, match="built elsewhere") as info:
        find_plan(tmp_path, environment=H100)
    assert other.name in str(info.value)
    mine, _ = write_plan(tmp_path, b"plan", tiny_fp16_onnx, environment=H100)
    assert find_plan(tmp_path, environment=H100) == mine
    with pytest.raises(EngineError, match="not found"):
        find_plan(tmp_path / "nope", environment=H100)


# ------------------------------------------------------------------------------------ without TensorRT

@pytest.mark.parametrize("version", ["10.0.1.6", "10.0.0", "8.6.1.6", "9.3.0"])
def test_tensorrt_before_10_1_is_refused_naming_both_versions(version):
    problem = tensorrt_version_problem(version)
    assert problem is not None and version in problem and "10.1 or newer" in problem


@pytest.mark.parametrize("version", ["10.1.0", "10.13.0.35", "11.1.0", "10.10.0.31"])
def test_tensorrt_10_1_and_newer_is_accepted(version):
    assert tensorrt_version_problem(version) is None


def test_tensorrt_without_a_version_is_not_tensorrt():
    # tensorrt-stubs alone leaves an importable `tensorrt` namespace with no __version__.
    assert "tensorrt is not installed" in tensorrt_version_problem(None)
    assert "cannot read the TensorRT version 'dev'" in tensorrt_version_problem("dev")


def test_unavailable_reason_names_what_is_missing():
    try:
        import tensorrt
        has_trt = getattr(tensorrt, "__version__", None) is not None  # not the stubs' empty namespace
    except Exception:
        has_trt = False
    reason = tensorrt_unavailable_reason(for_build=False)
    if has_trt and torch.cuda.is_available():
        assert reason is None
    else:
        assert isinstance(reason, str)
        assert ("tensorrt is not installed" in reason) == (not has_trt)
        assert ("no CUDA GPU" in reason) == (not torch.cuda.is_available())


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a GPU are present: the error path does not apply")
def test_build_and_load_say_why_they_cannot_run(tmp_path, tiny_fp16_onnx):
    with pytest.raises(DitexportError, match="cannot build a TensorRT engine: .*"):
        build_engine(tiny_fp16_onnx, tmp_path / "model.plan", min_batch=1, opt_batch=2, max_batch=2)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(DitexportError, match="cannot load a TensorRT engine"):
        load_engine(tmp_path / "model.plan")


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a GPU are present: the build succeeds there")
def test_a_failing_tensorrt_build_is_an_engine_error(tmp_path, tiny_fp16_onnx):
    # Past the availability check, the Polygraphy/TensorRT calls themselves fail here for real (no usable
    # TensorRT or no GPU); whatever they raise must reach the caller as one EngineError naming the file.
    profiles = [profile_shapes(onnx_input_shapes(tiny_fp16_onnx), 1, 2, 2)]
    with pytest.raises(EngineError, match=r"TensorRT could not build .*model\.fp16\.onnx: \w+"):
        plan_bytes_from_onnx(tiny_fp16_onnx, profiles, 1, tmp_path / "timing.cache")


# ------------------------------------------------------------------------------------ with TensorRT

@pytest.mark.tensorrt
@pytest.mark.skipif(TRT_REASON is not None, reason=f"needs TensorRT and a GPU: {TRT_REASON}")
def test_build_writes_plan_metadata_and_timing_cache(tmp_path, tiny_fp16_onnx):
    from ditexport.engine import current_environment, plan_path_for

    export_dir = tmp_path / "exports" / "tiny"
    plan = plan_path_for(export_dir)
    meta = build_engine(tiny_fp16_onnx, plan, min_batch=1, opt_batch=4, max_batch=8, builder_optimization_level=1)
    env = current_environment()
    assert plan.is_file() and metadata_path(plan).is_file()
    assert {k: meta[k] for k in env} == env
    assert meta["profile"]["x"]["max"] == [8, 4, 8, 8] and meta["batch"] == {"min": 1, "opt": 4, "max": 8}
    cache = tmp_path / "exports" / next(p.name for p in (tmp_path / "exports").glob("timing-cache.*.cache"))
    assert cache.stat().st_size > 0
    runtime, engine, loaded = load_engine(plan, onnx_path=tiny_fp16_onnx)
    assert loaded == meta and engine.num_io_tensors == 4
    # A second build reads the cache the first one wrote, and still produces a loadable plan.
    build_engine(tiny_fp16_onnx, plan, min_batch=1, opt_batch=4, max_batch=8, builder_optimization_level=1)
    load_engine(plan)
    plan.write_bytes(plan.read_bytes()[:-16])
    with pytest.raises(EngineError, match="corrupt"):
        load_engine(plan)


@pytest.mark.tensorrt
@pytest.mark.skipif(TRT_REASON is not None, reason=f"needs TensorRT and a GPU: {TRT_REASON}")
def test_unparsable_onnx_is_an_engine_error_not_a_polygraphy_exception(tmp_path, tiny_fp16_onnx):
    broken = tmp_path / "model.fp16.onnx"
    broken.write_bytes(tiny_fp16_onnx.read_bytes()[: tiny_fp16_onnx.stat().st_size // 3])
    with pytest.raises(EngineError):
        build_engine(broken, tmp_path / "exports" / "x" / "model.plan", min_batch=1, opt_batch=2, max_batch=2,
                     builder_optimization_level=1)
    assert not list((tmp_path / "exports").rglob("*.plan"))


@pytest.mark.tensorrt
@pytest.mark.skipif(TRT_REASON is not None, reason=f"needs TensorRT and a GPU: {TRT_REASON}")
def test_build_with_several_profiles(tmp_path, tiny_fp16_onnx):
    plan = tmp_path / "exports" / "tiny" / "model.plan"
    meta = build_engine(tiny_fp16_onnx, plan, batch_ranges=batch_profiles([1, 2, 8]), builder_optimization_level=1)
    _, engine, _ = load_engine(plan)
    assert engine.num_optimization_profiles == 3 and meta["precision"] == "fp16"
    assert [engine.get_tensor_profile_shape("x", i)[1][0] for i in range(3)] == [1, 2, 8]
