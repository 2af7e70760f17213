"""The public API (`import ditexport`) against the CLI it stands under: the same pixels as `sample`, builds that
return an `Export` or raise, exports opened and run, models loaded by name or path."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import ditexport
from ditexport.images import NonFiniteSamplesError, to_uint8


def test_import_is_light_and_names_the_api():
    code = ("import sys, ditexport; print('torch' in sys.modules); "
            "print(sorted(n for n in ditexport.__all__ if not n.startswith('_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False"  # `python -m ditexport --help` and `import ditexport` do not pay for torch
    for name in ("load_model", "build", "open_export", "Export", "Pipeline", "SamplerConfig", "DitexportError"):
        assert name in out[1]


def test_load_model_takes_names_configs_and_paths(tmp_path):
    digits = ditexport.load_model("digits")
    assert digits.config.input_size == 8 and not digits.training
    big = ditexport.load_model("DiT-S/8", image_size=512)
    assert big.config.input_size == 64 and big.config.in_channels == 4
    torch.save(digits.state_dict(), tmp_path / "w.pt")
    again = ditexport.load_model(tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(digits.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ditexport.DitexportError, match="neither a model"):
        ditexport.load_model("DiT-XXL/3")
    with pytest.raises(ditexport.DitexportError, match="not found"):
        ditexport.load_model(tmp_path / "missing.pt")


def test_pipeline_gives_the_pixels_sample_writes(digits_export, tmp_path, one_torch_thread):
    """70 images (two chunks of the 64-image noise schedule) through the API and through the `sample` command, with
    the same settings: the PNG/npz pixels are equal, and "np"/"pt" are those pixels before rounding."""
    npz = tmp_path / "s.npz"
    settings = ["--steps", "4", "--sampler", "ddim", "--eta", "0.5", "--cfg-scale", "2.5", "--seed", "11"]
    subprocess.run([sys.executable, "-m", "ditexport", "sample", "--backend", "onnxruntime", "--export-dir",
                    str(digits_export), "--num-images", "70", "--torch-threads", "1", "--quiet", "--out",
                    str(tmp_path / "s.png"), "--npz", str(npz), *settings], check=True, capture_output=True)
    written = np.load(npz)["arr_0"]
    pipe = ditexport.Pipeline.from_export(digits_export, backend="onnxruntime")
    labels = [i % 10 for i in range(70)]
    cfg = ditexport.SamplerConfig(num_steps=4, method="ddim", eta=0.5, guidance_scale=2.5)
    pil = pipe(class_labels=labels, sampler_cfg=cfg, seed=11).images
    assert len(pil) == 70 and np.array_equal(np.stack([np.array(im) for im in pil])[..., None], written)
    out = pipe(class_labels=labels, num_steps=4, sampler="ddim", eta=0.5, guidance_scale=2.5, seed=11,
               output_type="pt")
    assert np.array_equal(to_uint8(out.images), written) and out.timings["chunks"] == 2
    as_np = pipe(class_labels=labels[:3], sampler_cfg=cfg, seed=11, output_type="np").images
    as_pt = pipe(class_labels=labels[:3], sampler_cfg=cfg, seed=11, output_type="pt").images
    assert as_np.dtype == np.float32 and as_np.shape == (3, 8, 8, 1)
    assert np.array_equal(as_np, as_pt.permute(0, 2, 3, 1).numpy())


def test_pipeline_reports_progress_and_refuses_bad_calls(digits_export):
    with ditexport.open_export(digits_export).pipeline("onnxruntime") as pipe:
        seen = []
        pipe(class_labels=[1, 2], num_steps=3, sampler="dpmpp-2m",
             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert not hasattr(pipe.backend, "session")  # closed with the block: the backend's sessions are released
    pipe = ditexport.open_export(digits_export).pipeline("onnxruntime")
    with pytest.raises(ditexport.UsageError, match="output_type"):
        pipe(class_labels=[1], output_type="jpeg")
    with pytest.raises(ditexport.UsageError, match="class labels must be in 0..9"):
        pipe(class_labels=[10], num_steps=2)
    with pytest.raises(ditexport.UsageError, match="integers"):
        pipe(class_labels=["3"], num_steps=2)
    with pytest.raises(ditexport.UsageError, match="finite"):
        pipe(class_labels=[1], num_steps=2, guidance_scale=float("nan"))


def test_non_finite_samples_raise_instead_of_returning_black_images():
    model = ditexport.load_model("digits")
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteSamplesError):
        ditexport.Pipeline.from_model(model, device="cpu")(class_labels=[1], num_steps=2, output_type="pt")


def test_open_export_and_its_backends(digits_export):
    export = ditexport.open_export(digits_export)
    assert export.passed and export.precisions == ["fp32"] and export.config.input_size == 8
    assert export.graph("xty", "fp32").name == "model.onnx" and export.graph("xty", "fp16") is None
    assert export.report["passed"] is True and "model.onnx" in export.files
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([999, 3]), torch.tensor([3, 10])
    onnx_out = export.backend("onnxruntime")(x, t, y)
    torch_out = export.backend("torch")(x, t, y)  # the weights the export recorded
    assert onnx_out.shape == (2, 2, 8, 8)
    assert (onnx_out - torch_out).norm() / torch_out.norm() < 1e-5
    with pytest.raises(ditexport.DitexportError, match="no fp16 graph"):
        export.backend("onnxruntime", precision="fp16")
    with pytest.raises(ditexport.DitexportError, match="no complete export"):
        ditexport.open_export(digits_export.parent / "nothing-here")


@pytest.mark.slow
def test_build_returns_the_export_or_raises(tmp_path, monkeypatch, one_torch_thread):
    lines = []
    export = ditexport.build("digits", tmp_path / "d", precisions="fp32", sample_steps=0, log=lines.append)
    assert isinstance(export, ditexport.Export) and export.passed and export.path == tmp_path / "d"
    assert any(line.startswith("PASSED") or "PASSED" in line for line in lines)
    assert export.manifest["build_flags"] == ["--model", "digits", "--precision", "fp32"]
    lines.clear()
    assert ditexport.build("digits", tmp_path / "d", precisions="fp32", sample_steps=0, log=lines.append).passed
    assert any("up to date" in line for line in lines)  # reused, not rebuilt
    # A model in memory: built, and its export names it as such (it cannot be re-validated from the CLI).
    model = ditexport.load_model("digits")
    source_less = type(model).from_config(model.config)
    source_less.load_state_dict(model.state_dict())
    built = ditexport.build(source_less.eval(), tmp_path / "m", precisions="fp32", sample_steps=0, log=lines.append)
    assert built.manifest["source"]["kind"] == "module" and built.passed
    with pytest.raises(ditexport.DitexportError, match="given in memory"):
        built.validate(sample_steps=0, log=lines.append)
    # A real validation failure (the graphs checked against a tolerance they cannot meet) raises, with the export.
    from ditexport.export import TOLERANCE

    monkeypatch.setitem(TOLERANCE, "fp32", 1e-12)
    with pytest.raises(ditexport.ValidationFailedError) as failed:
        ditexport.build("digits", tmp_path / "f", precisions="fp32", sample_steps=0, log=lines.append)
    assert failed.value.export.passed is False and (tmp_path / "f" / "model.onnx").is_file()


def test_every_public_definition_says_what_it_does():
    """Review finding of issue 20: public definitions without a docstring (`Backend.with_condition`). Every name
    `ditexport` exports, their public methods and properties, and the backends' interface carry one."""
    import inspect

    from ditexport.backends.base import Backend
    from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ditexport.backends.torch_backend import TorchBackend

    missing = []
    for obj in [getattr(ditexport, n) for n in ditexport.__all__ if n != "__version__"] + [
            Backend, OnnxRuntimeBackend, TorchBackend]:
        if not inspect.getdoc(obj):
            missing.append(obj.__qualname__)
        for name, member in (vars(obj).items() if inspect.isclass(obj) else ()):
            if name.startswith("_") and name != "__call__":
                continue
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if callable(function) and not (function.__doc__ or "").strip():
                missing.append(f"{obj.__qualname__}.{name}")
    assert missing == []
