"""The command line: `sample` writes a grid; user errors are one line, no traceback, exit code 2."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ditexport.cli import main
from ditexport.engine import tensorrt_unavailable_reason


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ditexport", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_sample_writes_a_png_grid_and_reports_time_per_step(tmp_path):
    out = tmp_path / "grid.png"
    proc = run_cli("sample", "--model", "DiT-tiny/2", "--steps", "5", "--classes", "1,2,3", "--out", str(out),
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "ms per step" in proc.stdout
    image = np.asarray(Image.open(out))
    assert image.shape[0] > 8 and image.shape[1] > 3 * 8  # three tiles side by side, upscaled
    assert image.std() > 5  # noise-like content, not a blank grid


def test_sample_is_reproducible_by_seed(tmp_path):
    paths = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        paths.append(tmp_path / f"{name}.png")
        assert main(["sample", "--model", "DiT-tiny/2", "--steps", "3", "--num-images", "2", "--seed", str(seed),
                     "--out", str(paths[-1]), "--quiet"]) == 0
    a, b, c = (np.asarray(Image.open(p)) for p in paths)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        ("sample", "--model", "DiT-huge/1"),
        ("sample", "--checkpoint", str(tmp_path / "missing.pt")),
        ("sample", "--model", "DiT-tiny/2", "--classes", "42", "--steps", "2"),
        # fp16 on the CPU is no longer an error (issue 9: slow but correct); CUDA graphs there still are.
        ("sample", "--model", "DiT-tiny/2", "--cuda-graph", "--steps", "2"),
    ]
    for args in cases:
        proc = run_cli(*args, "--out", str(tmp_path / "x.png"))
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "sample" in proc.stdout and "info" in proc.stdout


def test_sampler_choices_are_the_samplers_methods():
    from ditexport.cli import SAMPLERS
    from ditexport.sampler import SAMPLING_METHODS

    assert SAMPLERS == SAMPLING_METHODS


def test_dpm_solver_sample_writes_the_png_and_the_npz_of_the_default_model(tmp_path, capsys):
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert main(["sample", "--sampler", "dpmpp-2m", "--steps", "20", "--npz", str(npz), "--out", str(png),
                 "--quiet"]) == 0
    assert f"wrote {npz}: arr_0 of shape (8, 8, 8, 1) uint8" in capsys.readouterr().out
    with np.load(npz) as data:
        arr = data["arr_0"]
    assert arr.shape == (8, 8, 8, 1) and arr.dtype == np.uint8
    grid = np.asarray(Image.open(png))  # one row of 8 tiles, each upscaled 8x, 2 px padding
    tiles = [grid[2:2 + 64, 2 + i * 66:2 + i * 66 + 64][::8, ::8] for i in range(8)]
    assert all(np.array_equal(tile, arr[i, :, :, 0]) for i, tile in enumerate(tiles))
    from ditexport.zoo.digits_eval import DigitsReference

    labels = [i % 10 for i in range(8)]  # the default labels: cycling through the classes
    agreement, _ = DigitsReference().class_agreement(torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0, labels)
    assert agreement >= 7 / 8  # 20 solver steps draw the requested digits


def test_argument_errors_are_one_line_and_come_before_any_banner(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--steps", "0"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err == ("error: argument --steps: must be at least 1, got 0 "
                            "(see: python -m ditexport sample --help)\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["smaple"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "invalid choice: 'smaple'" in err
    # A label the model does not have is refused before the run's banner, and before sampling.
    assert main(["sample", "--classes", "12", "--steps", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: class labels must be in 0..9, got [12]\n"


@pytest.fixture
def dit_constructions(monkeypatch):
    """Counts DiT constructions; the real constructor still runs."""
    from ditexport.model import DiT

    calls = []
    original = DiT.__init__

    def counting_init(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(DiT, "__init__", counting_init)
    return calls


@pytest.mark.skipif(tensorrt_unavailable_reason(for_build=False) is None, reason="TensorRT and a GPU are here")
def test_a_missing_tensorrt_is_refused_before_the_model_is_built(dit_constructions, capsys, tmp_path):
    assert main(["sample", "--model", "DiT-XL/2", "--backend", "tensorrt", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the tensorrt backend is unavailable: ") and len(err.splitlines()) == 1
    assert dit_constructions == []
    main(["sample", "--model", "DiT-tiny/2", "--steps", "2", "--num-images", "1", "--quiet",
          "--out", str(tmp_path / "y.png")])
    assert dit_constructions == [1]  # the counter sees a construction when there is one


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: nothing to refuse")
@pytest.mark.parametrize("command", [["bench", "--device", "cuda"], ["sample", "--device", "cuda"],
                                     ["eval", "--device", "cuda"]])
def test_a_missing_gpu_is_refused_before_the_model_is_built(command, dit_constructions, capsys, tmp_path):
    model = ["--model", "DiT-XL/2"] if command[0] != "eval" else []
    assert main([*command, *model, "--out" if command[0] != "eval" else "--json", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "error: --device cuda was asked for, but torch sees no CUDA device\n"
    assert dit_constructions == []


def test_only_user_errors_are_one_line_an_internal_error_keeps_its_traceback(monkeypatch, capsys):
    """The CLI catches DitexportError (and the file system's OSError), never a bug's ValueError."""
    from ditexport.cli import parser
    from ditexport.errors import UsageError

    def fails_with(error):
        def command(args):
            raise error
        return command

    monkeypatch.setattr(parser, "cmd_info", fails_with(UsageError("steps must be between 1 and 1000, got 0")))
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "error: steps must be between 1 and 1000, got 0\n"
    monkeypatch.setattr(parser, "cmd_info", fails_with(ValueError("an internal invariant broke")))
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["info"])
    monkeypatch.setattr(parser, "cmd_info", fails_with(RuntimeError("diffusers missing")))
    with pytest.raises(RuntimeError):
        main(["info"])


def test_eval_and_bench_take_every_model_flag(tmp_path, capsys, monkeypatch):
    """Every command that takes a model takes all four model flags the same way (review finding of issue 20: eval
    and bench dropped --image-size and --config, so a 512-px model was sampled at 256 px or sent to the 256-px
    export)."""
    code = main(["eval", "--model", "DiT-S/8", "--image-size", "512", "--num-per-class", "1", "--steps", "1"])
    assert code == 2 and "4x64x64" in capsys.readouterr().err  # the 512-px model (64x64 latents), refused by name
    # bench's default export is the one `build` makes for the same flags: exports/DiT-S-8-512 (a file here, so the
    # bench stops at once and says where it looked; the 256-px directory would be refused the same way).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports").mkdir()
    for size in (256, 512):
        (tmp_path / "exports" / f"DiT-S-8-{size}").write_text("not an export")
    code = main(["bench", "--model", "DiT-S/8", "--image-size", "512", "--backends", "onnxruntime-fp32", "--quick",
                 "--batch-sizes", "2", "--no-unguided"])
    err = capsys.readouterr().err
    assert code == 2 and "DiT-S-8-512" in err and "DiT-S-8-256" not in err


def test_sample_through_an_export_builds_no_torch_model_and_checks_the_request_once(digits_export, dit_constructions,
                                                                                     monkeypatch, tmp_path):
    """Review findings of issue 20: `sample --backend onnxruntime` built the whole torch model to learn the config its
    manifest records, and one request was checked three times (the command, the chunk loop, each chunk)."""
    import ditexport.pipeline as pipeline

    checks = []
    real = pipeline.check_request

    def counted(*args):
        checks.append(args[1])
        return real(*args)

    monkeypatch.setattr(pipeline, "check_request", counted)
    assert main(["sample", "--backend", "onnxruntime", "--export-dir", str(digits_export), "--steps", "2",
                 "--num-images", "70", "--quiet", "--out", str(tmp_path / "x.png")]) == 0
    assert dit_constructions == []  # the config came from the manifest
    assert len(checks) == 1 and len(checks[0]) == 70  # one request, checked once, over two chunks
