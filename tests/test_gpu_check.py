"""`gpu-check`: its rows, isolation, time caps and table run on the CPU with the paths a CPU has; the command
itself refuses in one line without a GPU."""
import subprocess
import sys

import pytest
import torch

from ditexport.export import TOLERANCE
from ditexport.gpu_check import INCOMPLETE_EXIT, PATHS, format_table, run_rows, verdict


@pytest.fixture(scope="module")
def cpu_rows(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("gpu-check")
    logs = []
    rows = run_rows("cpu", models=("digits",), out_dir=out, sample_steps=50, log=logs.append)
    return out, rows, logs


def test_every_path_is_a_row_measured_or_skipped_with_its_reason(cpu_rows):
    _, rows, logs = cpu_rows
    by_path = {r.path: r for r in rows}
    assert list(by_path) == list(PATHS) and {r.model for r in rows} == {"digits"}
    for path, precision in (("torch-eager", "fp16"), ("onnxruntime-fp32", "fp32"), ("onnxruntime-fp16", "fp16")):
        row = by_path[path]
        assert row.status == "ok" and row.precision == precision and row.tolerance == TOLERANCE[precision]
        assert 0 < row.rel_err <= TOLERANCE[precision]
        assert 0 < row.ms[2] < row.ms[64]  # 32 times the rows cost more on a CPU
        assert row.sample_finite is True and row.sample_s > 0 and not row.notes
    assert by_path["torch-eager"].rel_err > 10 * by_path["onnxruntime-fp32"].rel_err  # fp16 really ran
    for path in ("torch-cuda-graph", "torch-compile", "tensorrt", "tensorrt-int8", "tensorrt-fp8"):
        assert by_path[path].status == "skipped" and by_path[path].skipped
    assert "GPU" in by_path["torch-cuda-graph"].skipped
    table = format_table(rows, 50).splitlines()
    assert table[0].split()[:3] == ["model", "path", "prec"] and "sample 50" in table[0]
    assert len(table) == len(rows) + 2 and table[-1] == "PASSED: 3 ok, 0 failed, 0 not run, 5 skipped"
    assert verdict(rows) == (table[-1], 0)
    assert table[1].split()[:3] == ["digits", "torch-eager", "fp16"] and table[1].endswith("ok")
    assert any("torch-eager: ok" in line for line in logs)


def test_a_failing_path_is_its_row_and_the_others_still_run(cpu_rows):
    # A real fault: the check's cached fp16 export is truncated.
    out, _, _ = cpu_rows
    fp16 = out / "digits" / "model.fp16.onnx"
    fp16.write_bytes(fp16.read_bytes()[: fp16.stat().st_size // 2])
    rows = run_rows("cpu", models=("digits",), paths=("onnxruntime-fp16", "onnxruntime-fp32"), out_dir=out,
                    sample_steps=5, log=lambda m: None)
    failed, fine = rows
    assert failed.status == "FAILED" and "model.fp16.onnx" in failed.error and "\n" not in failed.error
    assert fine.status == "ok" and fine.rel_err <= TOLERANCE["fp32"]
    table = format_table(rows, 5).splitlines()
    # Refused by the check against the manifest before ONNX Runtime reads it (issue 10).
    assert "FAILED: ArtifactError:" in table[1] and "model.fp16.onnx has" in table[1]
    assert table[-1] == "FAILED: 1 ok, 1 failed, 0 not run, 0 skipped" and verdict(rows)[1] == 1


def test_the_budget_and_the_row_cap_hold(cpu_rows):
    out, _, _ = cpu_rows
    (row,) = run_rows("cpu", models=("digits",), paths=("torch-eager",), out_dir=out, budget_s=0, log=lambda m: None)
    assert row.status == "INCOMPLETE" and row.not_run.startswith("not started: the run's time budget")
    assert row.rel_err is None
    # A sample that cannot fit the row's cap is not started; what fits is still measured.
    (row,) = run_rows("cpu", models=("digits",), paths=("torch-eager",), out_dir=out, sample_steps=10 ** 6,
                      log=lambda m: None)
    assert row.rel_err is not None and row.ms[2] > 0 and row.sample_s is None
    assert row.notes and row.notes[-1].startswith("sample: time cap")
    assert row.status == "ok"  # measured what fitted, and nothing measured failed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the refusal does not apply")
def test_without_a_gpu_the_command_says_so_in_one_line():
    done = subprocess.run([sys.executable, "-m", "ditexport", "gpu-check"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: gpu-check needs an NVIDIA GPU")


def test_the_rows_import_no_optional_package(cpu_rows):
    out, _, _ = cpu_rows
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from ditexport.gpu_check import run_rows\n"
        f"rows = run_rows('cpu', models=('digits',), paths=('torch-eager', 'onnxruntime-fp32'), out_dir={str(out)!r},"
        " sample_steps=2, log=lambda m: None)\n"
        "assert [r.status for r in rows] == ['ok', 'ok'], rows\n"
        "print(sorted(m for m in ('gradio', 'diffusers', 'matplotlib', 'polygraphy', 'tensorrt', 'sklearn',"
        " 'safetensors', 'onnxscript') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # safetensors reads the built-in weights; nothing optional (demo, VAE, plots, TensorRT) is imported.
    assert done.stdout.strip().splitlines()[-1] == "['safetensors']"


# ------------------------------------------------------------------ the budget and the verdict (issue 21, defect 2)

def test_a_path_that_is_here_but_did_not_run_is_incomplete_never_passed(cpu_rows):
    """Before issue 21 a run whose budget ran out before any row printed "PASSED: 0 ok, 0 failed, 6 skipped"."""
    out, _, _ = cpu_rows
    rows = run_rows("cpu", models=("digits",), out_dir=out, budget_s=0, log=lambda m: None)
    by_path = {r.path: r for r in rows}
    for path in ("torch-eager", "onnxruntime-fp32", "onnxruntime-fp16"):  # the paths a CPU has
        assert by_path[path].status == "INCOMPLETE" and by_path[path].rel_err is None
    for path in ("torch-cuda-graph", "tensorrt", "torch-compile"):  # the paths it lacks, each with its reason
        assert by_path[path].status == "skipped" and by_path[path].skipped
    assert "no CUDA GPU" in by_path["tensorrt"].skipped and "GPU" in by_path["torch-cuda-graph"].skipped
    line, code = verdict(rows)
    assert line == "INCOMPLETE: 0 ok, 0 failed, 3 not run, 5 skipped" and code == INCOMPLETE_EXIT != 0
    assert format_table(rows).splitlines()[-1] == line


def test_the_export_is_built_before_the_clock_without_engines_and_the_plan_comes_first(cpu_rows):
    """Before issue 21 the first ONNX Runtime row built the whole export (with its engine stage) inside its own
    time and the budget's."""
    from ditexport.artifacts import read_manifest

    out, rows, logs = cpu_rows
    building = next(i for i, m in enumerate(logs) if "no complete export yet; building it" in m)
    plan = next(i for i, m in enumerate(logs)
                if m.startswith(f"plan: {len(PATHS)} rows in this order, within a budget of 450 s"))
    first_row = next(i for i, m in enumerate(logs) if m.startswith("  torch-eager: "))
    assert building < plan < first_row
    # The plan names every row with its time, or why it will not run.
    assert logs[plan + 1: plan + 9] == [
        "  digits    torch-eager       set-up up to 10 s, then measured for up to 60 s",
        f"  digits    torch-cuda-graph  skipped: {rows[1].skipped}",
        "  digits    onnxruntime-fp32  set-up up to 10 s, then measured for up to 60 s",
        "  digits    onnxruntime-fp16  set-up up to 10 s, then measured for up to 60 s",
        f"  digits    tensorrt          skipped: {rows[4].skipped}",
        f"  digits    tensorrt-int8     skipped: {rows[5].skipped}",
        f"  digits    tensorrt-fp8      skipped: {rows[6].skipped}",
        f"  digits    torch-compile     skipped: {rows[7].skipped}"]
    assert read_manifest(out / "digits")["engine"] == {"status": "skipped", "reason": "not asked for"}


def test_a_failed_export_is_made_once_and_fails_the_rows_that_run_it(tmp_path):
    """Before issue 21 every row that needed the export tried to build it again."""
    (tmp_path / "digits").write_text("a file where the export directory would go")
    logs = []
    rows = run_rows("cpu", models=("digits",), paths=("onnxruntime-fp32", "torch-eager", "onnxruntime-fp16"),
                    out_dir=tmp_path, sample_steps=2, log=logs.append)
    attempts = [m for m in logs if "building it as `python -m ditexport build` would" in m]
    assert len(attempts) == 1
    failed, eager, failed_too = rows
    assert failed.status == failed_too.status == "FAILED" and failed.error == failed_too.error
    assert str(tmp_path / "digits") in failed.error and "\n" not in failed.error
    assert any(m.startswith("  export FAILED — ") and failed.error in m for m in logs)
    assert eager.status == "ok"
    assert verdict(rows) == ("FAILED: 1 ok, 2 failed, 0 not run, 0 skipped", 1)
