"""`python benchmarks/cpu_bench.py`: interleaved timings, reported as they are taken."""
import importlib.util
import re
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_bench.py"
_SPEC = importlib.util.spec_from_file_location("cpu_bench", _SCRIPT)
cpu_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cpu_bench)
compare_onnxruntime_to_torch, time_interleaved = cpu_bench.compare_onnxruntime_to_torch, cpu_bench.time_interleaved


def test_interleaved_timing_logs_each_variant_every_round():
    lines, calls = [], []
    ms = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, calls=2,
                          warmup=1, log=lines.append)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then rounds with the variants interleaved
    assert [re.sub(r"\s+[\d.]+ ms$", "", line).split() for line in lines] == [
        ["warm-up", "a"], ["warm-up", "b"],
        ["round", "1/3", "a"], ["round", "1/3", "b"], ["round", "2/3", "a"], ["round", "2/3", "b"],
        ["round", "3/3", "a"], ["round", "3/3", "b"]]
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


def test_compare_prints_a_line_per_variant_as_it_goes(tmp_path):
    lines = []
    (row,) = compare_onnxruntime_to_torch(("DiT-tiny/2",), batch=2, rounds=2, calls=1, threads=1, log=lines.append)
    assert row["torch_ms"] > 0 and row["onnxruntime_ms"] > 0
    assert row["speedup"] == pytest.approx(row["torch_ms"] / row["onnxruntime_ms"], abs=0.01)
    progress = [re.sub(r"\s+[\d.]+ ms$", "", line).split() for line in lines if line.startswith("  ")]
    assert progress == [["warm-up", "torch"], ["warm-up", "onnxruntime"], ["round", "1/2", "torch"],
                        ["round", "1/2", "onnxruntime"], ["round", "2/2", "torch"], ["round", "2/2", "onnxruntime"]]
    assert "DiT-tiny/2 batch 2, 1 thread(s): timing torch eager and onnxruntime, 2 rounds" in lines
    assert lines[-1].endswith(f"-> {row['speedup']:.2f}x")
