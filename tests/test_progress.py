"""Progress of long stages: a heartbeat line while a stage runs, none for a stage that ends quickly, and every
stage of the export and the validation of a model announced while it runs."""
import re
import threading

import pytest

from ditexport import progress, validate
from ditexport.export import export_graphs
from ditexport.model import create_model
from ditexport.validate import validate_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_long_stage_is_announced_while_it_runs():
    lines, heard = [], threading.Event()

    def log(message):
        lines.append(message)
        heard.set()

    with progress.heartbeat(log, "export: tracing", every_s=0.01, end_line=True):
        assert heard.wait(timeout=60)  # the block runs until the first heartbeat line has arrived
    assert re.fullmatch(r"export: tracing … \d+ s", lines[0])
    assert re.fullmatch(r"export: tracing: done in \d+ s", lines[-1])  # the stage's end, at once
    count = len(lines)
    heard.clear()
    assert not heard.wait(timeout=0.05) and len(lines) == count  # silent once the stage is over


def test_without_end_line_the_callers_result_line_ends_the_stage():
    lines, heard = [], threading.Event()
    with progress.heartbeat(lambda message: (lines.append(message), heard.set()), "validate: model.onnx",
                            every_s=0.01):
        assert heard.wait(timeout=60)
    assert lines and all(" … " in line for line in lines)


def test_a_quick_stage_adds_no_line_and_a_failed_one_no_done_line():
    lines = []
    with progress.heartbeat(lines.append, "validate: quick", every_s=60):
        pass
    assert lines == []
    heard = threading.Event()
    with pytest.raises(KeyError):
        with progress.heartbeat(lambda message: (lines.append(message), heard.set()), "export: failing",
                                every_s=0.01, end_line=True):
            assert heard.wait(timeout=60)
            raise KeyError("the stage failed")
    assert lines and not any("done in" in line for line in lines)


def test_every_stage_of_export_and_validation_is_announced(tmp_path, monkeypatch):
    """With a heartbeat every millisecond, each stage that runs is named while it runs."""
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.001)
    validate.stress._STRESS_RESULTS.clear()  # an earlier test's result would make the stress stage instant
    lines = []
    model = create_model("DiT-tiny/2", seed=0)
    export_graphs(model, tmp_path, graphs=("xty",), log=lines.append)
    report = validate_export(tmp_path, model, batches=(2,), sample_steps=2, log=lines.append)
    stages = {line.split(" … ")[0] for line in lines if " … " in line}
    assert stages >= {"export: tracing the xty graph (torch.onnx.export, dynamo)",
                      "export: cleaning up and writing model.onnx",
                      "export: deriving model.fp16.onnx from model.onnx (fp16 policy)",
                      "validate: model.onnx against torch at batches 2",
                      "validate: model.fp16.onnx against torch at batches 2",
                      "validate: stress check",
                      "validate: sampling the torch reference (2 images, 2 ddpm steps)",
                      "validate: sampling through model.onnx (2 images, 2 ddpm steps)",
                      "validate: sampling through model.fp16.onnx (2 images, 2 ddpm steps)"}, stages
    # Each stage's result line carries its time.
    results = [line for line in lines
               if line.startswith("validate: ") and " … " not in line and ": done in" not in line]
    assert len(results) == 5 and all(re.search(r"\(\d+\.\d s\)$", line) for line in results), results
    assert report.passed
