"""`python -m ditexport bench`: the FLOP count, the sampler-overhead measure and a quick CPU run end to end."""
import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch

from ditexport.artifacts import read_manifest
from ditexport.bench import (UNSTABLE_SPREAD, BenchSettings, dit_forward_flops, run_bench, sampler_step_ms,
                             stability_warning, time_calls, timing_spread)
from ditexport.cli import main
from ditexport.engine import tensorrt_unavailable_reason
from ditexport.model import create_model, get_config


@pytest.mark.parametrize("name", ["DiT-tiny/2", "DiT-digits"])
def test_flop_count_matches_torch_flop_counter(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name, seed=0)
    cfg = model.config
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    # The math attention kernel is made of bmm's, which the counter sees (the fused CPU kernel it does not).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2]))
    assert dit_forward_flops(cfg, batch=3) == counter.get_total_flops()


def test_flop_count_of_dit_xl_agrees_with_the_paper():
    # DiT-XL/2 at 256 px: 118.6 Gflops in the paper (multiply-adds), so about 237 GFLOP counted as 2 per MAC;
    # at 742 TFLOP/s that is the 0.64 ms compute floor at batch 2.
    flops = dit_forward_flops(get_config("DiT-XL/2"))
    assert abs(flops / 2e9 - 118.6) / 118.6 < 0.005
    assert abs(2 * flops / 742e12 * 1e3 - 0.64) < 0.01


def test_sampler_overhead_is_measured_on_the_real_clock():
    cfg = get_config("DiT-tiny/2")
    ms = sampler_step_ms(cfg, 4, True, torch.device("cpu"), (3, 9))
    # 0 is a real outcome: a negative slope (the longer run happened to be disturbed less) is reported as 0.
    assert math.isfinite(ms) and 0 <= ms < 50


@pytest.mark.parametrize("guided", [True, False])
def test_sampler_overhead_is_the_time_per_step_of_the_real_loop(guided, monkeypatch):
    # A clock that advances exactly 1 ms per network call turns the measurement into a count: the slope
    # between the 3- and 9-step runs must be exactly 1 ms per step, whatever else the machine does.
    network = sampler_step_ms.__globals__["_ConstantNetwork"]  # the bench's stand-in network, wherever it lives
    real_call, batches = network.__call__, []

    def counted(self, x, t, y):
        batches.append(x.shape[0])
        return real_call(self, x, t, y)

    monkeypatch.setattr(network, "__call__", counted)
    monkeypatch.setattr(time, "perf_counter", lambda: 1e-3 * len(batches))
    assert sampler_step_ms(get_config("DiT-tiny/2"), 4, guided, torch.device("cpu"), (3, 9)) == pytest.approx(1.0, rel=1e-12)
    # A warm-up and three timed runs at each step count, each step one forward of the whole batch of 4.
    assert batches == [4] * (4 * 3 + 4 * 9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory of its own, so that the default exports/ lands there and not in the checkout."""
    path = tmp_path_factory.mktemp("workdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        yield path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, workdir):
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["bench", "--model", "DiT-tiny/2", "--quick", "--device", "cpu", "--batch-sizes", "2,8",
                     "--out", str(out)])
    return code, out, printed.getvalue()


def test_quick_cpu_bench_writes_json_plot_and_ends_with_the_table(quick_run):
    code, out, printed = quick_run
    assert code == 0
    report = json.loads((out / "bench-DiT-tiny-2-64-cpu.json").read_text())
    assert (out / "bench-DiT-tiny-2-64-cpu.png").stat().st_size > 1000
    backends = {r["backend"] for r in report["results"]}
    assert {"torch-eager", "onnxruntime-fp32", "onnxruntime-fp16"} <= backends
    sampler_ms = report["sampler_ms_per_step"]
    # A measured 0 is possible (a negative slope is clamped); its exact value is pinned by the test above.
    assert set(sampler_ms) == {"1u", "2", "8"} and all(0 <= v < 50 for v in sampler_ms.values())
    eager_ms = {(r["batch"], r["guided"]): r["ms_per_forward"] for r in report["results"]
                if r["backend"] == "torch-eager"}
    assert set(eager_ms) == {(1, False), (2, True), (8, True)}
    tiny = get_config("DiT-tiny/2")
    for row in report["results"]:
        assert row["ms_per_forward"] > 0 and row["iters"] == 5
        assert row["ms_min"] <= row["ms_per_forward"] <= row["ms_max"]  # the median of the timed calls
        assert (row["batch"], row["guided"]) in {(1, False), (2, True), (8, True)}
        assert row["images_per_forward"] == (row["batch"] // 2 if row["guided"] else row["batch"])
        # Throughput from the row's own measurements: one forward plus the sampler's own work per step.
        step_s = (row["ms_per_forward"] + sampler_ms[f"{row['batch']}" + ("" if row["guided"] else "u")]) / 1000
        for name, steps in [("250", 250), ("50", 50), ("dpmpp_2m_10", 10)]:
            assert row[f"images_per_s_{name}"] == pytest.approx(row["images_per_forward"] / (steps * step_s))
        assert row["tflops"] == pytest.approx(dit_forward_flops(tiny, row["batch"]) / row["ms_per_forward"] / 1e9)
        assert row["pct_fp16_matmul_peak"] is None  # no GPU, no fp16 peak
        assert row["speedup_vs_torch_eager"] == pytest.approx(eager_ms[row["batch"], row["guided"]]
                                                              / row["ms_per_forward"])
        if row["backend"] == "torch-eager":
            assert row["speedup_vs_torch_eager"] == 1.0
    assert report["matmul_fp16_tflops"] is None and report["machine"]["device"] == "cpu"
    assert report["model"]["gflops_per_image"] == pytest.approx(dit_forward_flops(get_config("DiT-tiny/2")) / 1e9)
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert "GPU" in skipped["torch-cuda-graph"] and "torch-compile" in skipped
    if tensorrt_unavailable_reason() is not None:
        assert skipped["tensorrt"]
    e2e = {e["backend"]: e for e in report["end_to_end"]}
    assert e2e["torch-eager"]["steps"] == 20 and e2e["torch-eager"]["measured_s"] > 0
    for name, run in e2e.items():  # what the per-forward numbers predict for one guided image (batch 2)
        forward_ms = next(r["ms_per_forward"] for r in report["results"]
                          if r["backend"] == name and (r["batch"], r["guided"]) == (2, True))
        assert run["derived_s"] == pytest.approx(20 * (forward_ms + sampler_ms["2"]) / 1000)
        assert run["sampler_share"] == pytest.approx(sampler_ms["2"] / (forward_ms + sampler_ms["2"]))
        assert 0 <= run["sampler_share"] < 1
    # The table comes last: its header, then one line per result.
    lines = printed.strip().splitlines()
    assert lines[-len(report["results"]) - 1].startswith("backend")
    assert lines[-1].split()[0] == report["results"][-1]["backend"]


def test_second_run_reuses_the_exported_onnx(quick_run, tmp_path, capsys):
    # Its own output directory: the first run's report stays as it was for the tests that read it.
    code = main(["bench", "--model", "DiT-tiny/2", "--quick", "--device", "cpu", "--batch-sizes", "2",
                 "--no-unguided", "--backends", "onnxruntime-fp16", "--out", str(tmp_path)])
    assert code == 0 and "found cached ONNX" in capsys.readouterr().out


def test_a_failing_backend_is_a_row_and_the_bench_goes_on(quick_run, workdir, tmp_path, capsys):
    # A real fault, not a stand-in: a copy of build's export whose fp16 graph is truncated.
    import shutil

    export_dir = tmp_path / "export"
    shutil.copytree(workdir / "exports" / "DiT-tiny-2-64", export_dir)
    fp16 = export_dir / "model.fp16.onnx"
    fp16.write_bytes(fp16.read_bytes()[: fp16.stat().st_size // 2])
    code = main(["bench", "--model", "DiT-tiny/2", "--quick", "--device", "cpu", "--batch-sizes", "2",
                 "--backends", "onnxruntime-fp16,onnxruntime-fp32", "--export-dir", str(export_dir),
                 "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "out" / "bench-DiT-tiny-2-64-cpu.json").read_text())
    (failed,) = report["failed"]
    assert failed["backend"] == "onnxruntime-fp16" and "model.fp16.onnx" in failed["error"]
    assert "\n" not in failed["error"]
    # The backends after the failing one were still measured, and the table still comes last.
    assert {r["backend"] for r in report["results"]} == {"torch-eager", "onnxruntime-fp32"}
    lines = printed.strip().splitlines()
    assert lines[-1] == f"{'onnxruntime-fp16':<18} FAILED: {failed['error']}"
    assert lines[-len(report["results"]) - 2].startswith("backend")


def test_bad_bench_options_are_one_line_errors(capsys, tmp_path):
    assert main(["bench", "--model", "DiT-tiny/2", "--backends", "torch-eager,fastest", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown bench backend(s) fastest; choose from torch-eager, "
                                               "torch-cuda-graph, torch-compile, onnxruntime-fp32, onnxruntime-fp16, "
                                               "onnxruntime-int8, onnxruntime-fp8, tensorrt, tensorrt-int8, tensorrt-fp8")
    with pytest.raises(SystemExit):
        main(["bench", "--batch-sizes", "3"])


def test_bench_runs_the_export_that_build_makes_and_never_a_second_one(quick_run, workdir, tmp_path, capsys):
    _, out, printed = quick_run
    export = workdir / "exports" / "DiT-tiny-2-64"
    assert f"{Path('exports') / 'DiT-tiny-2-64'}: no complete export yet; building it" in printed
    assert read_manifest(export)["validation"]["passed"] is True
    assert not list(out.rglob("*.onnx"))  # nothing exported into the bench's own output
    # It is build's export: build finds it up to date.
    assert main(["build", "--model", "DiT-tiny/2"]) == 0
    assert f"{Path('exports') / 'DiT-tiny-2-64'}: up to date" in capsys.readouterr().out
    # An export of another model in the way is refused, not overwritten.
    code = main(["bench", "--model", "DiT-digits", "--quick", "--device", "cpu", "--batch-sizes", "2",
                 "--backends", "onnxruntime-fp32", "--export-dir", str(export), "--out", str(tmp_path)])
    assert code == 2 and "was built for another model config" in capsys.readouterr().err
    assert read_manifest(export)["model"] == "DiT-tiny/2"


def test_every_row_reports_the_spread_of_its_timed_calls(quick_run):
    _, out, printed = quick_run
    report = json.loads((out / "bench-DiT-tiny-2-64-cpu.json").read_text())
    for row in report["results"]:
        assert row["spread"] == pytest.approx((row["ms_max"] - row["ms_min"]) / row["ms_per_forward"])
    assert (stability_warning(report) is None) == all(r["spread"] <= UNSTABLE_SPREAD for r in report["results"])
    # The run's own output: per-row notes, marks in the table, warning.
    table = printed.strip().splitlines()[-9:]
    flagged = [line for line in table if line.endswith("%!")]
    assert printed.count("%: unstable)") == len(flagged)
    assert ("warning: " in printed) == bool(flagged)


def test_uneven_timings_are_flagged_as_unstable():
    small, large = torch.randn(8, 8), torch.randn(384, 384)
    calls = iter(range(1000))
    # Every fourth call multiplies 384x384 matrices, the others 8x8: a disturbed measurement, made for real.
    times = time_calls(lambda: large @ large if next(calls) % 4 == 0 else small @ small, torch.device("cpu"),
                       warmup=0, iters=8)
    spread = timing_spread(times)
    assert spread == pytest.approx((max(times) - min(times)) / statistics.median(times)) and spread > UNSTABLE_SPREAD
    report = {"results": [{"backend": "torch-eager", "batch": 2, "guided": True, "spread": spread}],
              "machine": {"gpu": None}}
    warning = stability_warning(report)
    assert warning.startswith("warning: 1 of 1 measurements are unstable") and "torch-eager batch 2" in warning
    assert f"{100 * spread:.0f} %" in warning


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA: torch sees none")
def test_quick_gpu_bench_reports_the_fp16_peak_share(tmp_path):
    model = create_model("DiT-tiny/2", seed=0)
    settings = BenchSettings.quick_settings(batch_sizes=(2, 8), backends=("torch-eager", "torch-cuda-graph"),
                                            device="cuda", out_dir=str(tmp_path), matmul_size=2048)
    report = run_bench(model, "DiT-tiny/2", settings, log=lambda m: None)
    assert report["matmul_fp16_tflops"] > 1
    graph_rows = [r for r in report["results"] if r["backend"] == "torch-cuda-graph"]
    assert len(graph_rows) == 3 and all(0 < r["pct_fp16_matmul_peak"] < 100 for r in graph_rows)


def test_a_run_without_batch_2_still_measures_every_row(tmp_path, capsys):
    """The end-to-end sample is derived from the batch-2 row; without one it is reported as not derived (it used to
    fail every backend with a TypeError)."""
    assert main(["bench", "--model", "DiT-tiny/2", "--quick", "--device", "cpu", "--batch-sizes", "4",
                 "--no-unguided", "--backends", "torch-eager", "--sample-steps", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench-DiT-tiny-2-64-cpu.json").read_text())
    assert report["failed"] == [] and [r["batch"] for r in report["results"]] == [4]
    assert report["end_to_end"][0]["derived_s"] is None and "not derived" in capsys.readouterr().out
