"""API conformance of the code CI cannot run: basedpyright checks the TensorRT, CUDA-graph, ONNX Runtime I/O-binding
and gpu-check modules ([tool.basedpyright] in pyproject.toml) against tensorrt-stubs and torch's and onnxruntime's
own types, and is shown to catch a misspelt TensorRT call, an unknown TensorRT attribute and a wrong ORT call."""
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _missing() -> str | None:
    if importlib.util.find_spec("basedpyright") is None:
        return "basedpyright is not installed (pip install -e '.[test]')"
    try:
        importlib.metadata.version("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        return "tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def basedpyright(project: Path) -> dict:
    """basedpyright's JSON report for the project whose config is in `project` (run offline, bundled Node)."""
    done = subprocess.run([sys.executable, "-m", "basedpyright", "--outputjson", "--pythonpath", sys.executable],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def errors(report: dict) -> list[str]:
    return [f"{Path(d['file']).name}:{d['range']['start']['line'] + 1}: {d['message']}"
            for d in report["generalDiagnostics"] if d["severity"] == "error"]


def test_modules_that_touch_tensorrt_conform_to_its_api():
    report = basedpyright(ROOT)
    assert report["summary"]["filesAnalyzed"] == 8  # the eight modules listed in [tool.basedpyright]
    assert errors(report) == []


def test_the_check_fails_on_planted_wrong_calls(tmp_path):
    shutil.copytree(ROOT / "ditexport", tmp_path / "ditexport", ignore=shutil.ignore_patterns("__pycache__", "zoo"))
    trt_backend = tmp_path / "ditexport" / "backends" / "tensorrt_backend.py"
    ort_backend = tmp_path / "ditexport" / "backends" / "onnxruntime_backend.py"
    plants = [(trt_backend, "self.context.execute_async_v3(", "self.context.execute_async_v4("),
              (trt_backend, "trt.TensorIOMode.INPUT", "trt.Foo.INPUT"),
              (ort_backend, "session.run_with_iobinding(binding)", "session.run_with_io_binding(binding)")]
    planted_lines = []
    for path, good, bad in plants:
        text = path.read_text()
        assert text.count(good) == 1, good
        planted_lines.append(f"{path.name}:{text[:text.index(good)].count(chr(10)) + 1}:")
        path.write_text(text.replace(good, bad))
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({
        "include": ["ditexport/backends/tensorrt_backend.py", "ditexport/backends/onnxruntime_backend.py"],
        "typeCheckingMode": "standard", "pythonVersion": "3.10"}))
    found = errors(basedpyright(tmp_path))
    assert len(found) == 3, found
    for where, name in zip(planted_lines, ("execute_async_v4", '"Foo"', "run_with_io_binding")):
        assert any(e.startswith(where) and name in e for e in found), (where, name, found)
