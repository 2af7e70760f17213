"""CPU threads: one decision for torch and ONNX Runtime, and `--torch-threads` on every command that computes."""
import pytest
import torch

from ditexport import cli
from ditexport.backends.onnxruntime_backend import session_options
from ditexport.threads import SMALL_MODEL_WIDTH, default_threads, resolve_threads, torch_initial_threads

# Every sub-command that runs torch or ONNX Runtime on the CPU, with the arguments it cannot do without.
COMPUTING_COMMANDS = {"sample": [], "build": [], "validate": [], "bench": [], "eval": [], "train-digits": [],
                      "demo": [], "export-vae": ["--vae", "some/dir"]}


def test_small_models_get_one_thread_and_big_ones_the_cores_less_one():
    assert default_threads(64, cores=16) == default_threads(SMALL_MODEL_WIDTH, cores=16) == 1
    assert default_threads(SMALL_MODEL_WIDTH + 1, cores=8) == min(7, torch_initial_threads())
    assert default_threads(1152, cores=2) == 1
    assert default_threads(1152, cores=1) == 1  # never zero
    assert default_threads(None, cores=4) == min(3, torch_initial_threads())  # no model: treated as big


def test_the_flag_wins_then_omp_num_threads_then_the_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads(3, 128) == (3, "--torch-threads") and torch.get_num_threads() == 3
    threads, why = resolve_threads(None, 128)
    assert threads == 1 == torch.get_num_threads() and "width 128" in why
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_threads(None, 128) == (2, "OMP_NUM_THREADS") and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored, as torch ignores it
    assert resolve_threads(None, 128)[0] == 1


@pytest.mark.parametrize("threads", [1, 3])
def test_onnxruntime_sessions_follow_the_threads_resolved_for_torch(threads):
    resolve_threads(threads, 1152)
    assert session_options().intra_op_num_threads == threads
    assert session_options(threads=2).intra_op_num_threads == 2  # an explicit count still wins


@pytest.mark.parametrize("command", sorted(COMPUTING_COMMANDS))
def test_every_computing_command_takes_torch_threads(command):
    args = cli.build_parser().parse_args([command, *COMPUTING_COMMANDS[command], "--torch-threads", "3"])
    assert args.torch_threads == 3
    assert cli.build_parser().parse_args([command, *COMPUTING_COMMANDS[command]]).torch_threads is None


def test_sample_sets_the_threads_it_announces(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    common = ["sample", "--model", "DiT-tiny/2", "--steps", "2", "--num-images", "1", "--quiet"]
    assert cli.main([*common, "--torch-threads", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert torch.get_num_threads() == 2 and "2 CPU threads (--torch-threads)" in capsys.readouterr().out
    assert cli.main([*common, "--out", str(tmp_path / "b.png")]) == 0
    assert torch.get_num_threads() == 1 and "1 CPU thread (default for a model of width 64)" in capsys.readouterr().out
