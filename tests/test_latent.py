"""A latent DiT end to end with its VAE: `build --vae` exports, validates and records the decoder beside the DiT,
and `sample`, the API and everything that opens the export decode with the exported graph on the DiT's runtime,
with no torch decoding. A random-weight DiT-tiny/2 (4 latent channels) and a tiny random AutoencoderKL."""
import json

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="the VAE needs diffusers (pip install 'ditexport[vae]')")

import ditexport  # noqa: E402
from conftest import tiny_vae  # noqa: E402
from ditexport.cli import main  # noqa: E402
from ditexport.validate import psnr  # noqa: E402


@pytest.fixture(scope="module")
def latent_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    tiny_vae(0).save_pretrained(root / "vae")
    code = main(["build", "--model", "DiT-tiny/2", "--vae", str(root / "vae"), "--export-dir", str(root / "export"),
                 "--sample-steps", "3", "--torch-threads", "1", "--quiet"])
    assert code == 0
    return root


def test_build_exports_validates_and_records_the_decoder(latent_export):
    export = ditexport.open_export(latent_export / "export")
    vae = export.manifest["vae"]
    assert vae["latent_channels"] == 4 and vae["latent_size"] == 8 and vae["image_size"] == 16
    assert {"vae.onnx", "vae.fp16.onnx"} <= set(export.manifest["files"])
    assert export.graph("vae", "fp16").name == "vae.fp16.onnx" and "vae" in export.manifest["inputs"]
    report = export.report
    assert [(v["file"], v["passed"]) for v in report["vae"]] == [("vae.onnx", True), ("vae.fp16.onnx", True)]
    assert all(0 < c["rel_err"] <= v["tolerance"] for v in report["vae"] for c in v["checks"])
    decoded = {s["file"]: s["decoder"] for s in report["samples"]}
    assert decoded == {"model.onnx": "vae.onnx", "model.fp16.onnx": "vae.fp16.onnx"}  # sample level, decoded images
    assert "--vae" in export.manifest["build_flags"]


def test_sample_decodes_with_the_exported_graph_and_never_in_torch(latent_export, tmp_path, capsys, monkeypatch):
    from diffusers import AutoencoderKL

    def no_torch_decoding(*args, **kwargs):
        raise AssertionError("the torch decoder ran")

    monkeypatch.setattr(AutoencoderKL, "decode", no_torch_decoding)
    npz = tmp_path / "s.npz"
    code = main(["sample", "--backend", "onnxruntime", "--export-dir", str(latent_export / "export"), "--steps", "3",
                 "--num-images", "2", "--quiet", "--out", str(tmp_path / "s.png"), "--npz", str(npz)])
    out = capsys.readouterr().out
    assert code == 0 and "decoder: vae (onnxruntime)" in out
    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)  # decoded RGB images, not latents


def test_onnxruntime_decoding_equals_diffusers_within_the_validated_floor(latent_export):
    settings = dict(class_labels=[3, 7], num_steps=3, sampler="dpmpp-2m", seed=5, output_type="pt")
    reference = ditexport.Pipeline.from_model(ditexport.load_model("DiT-tiny/2"), device="cpu",
                                              decoder=str(latent_export / "vae"))(**settings).images
    for precision, floor in (("fp32", 40.0), ("fp16", 25.0)):
        pipe = ditexport.Pipeline.from_export(latent_export / "export", backend="onnxruntime", precision=precision)
        assert pipe.decoder.onnx_path.name == ("vae.onnx" if precision == "fp32" else "vae.fp16.onnx")
        images = pipe(**settings).images
        assert images.shape == reference.shape == (2, 3, 16, 16)
        assert min(psnr(images, reference)) >= floor, (precision, psnr(images, reference))


def test_a_vae_that_does_not_fit_the_dit_is_refused_before_anything_is_written(tmp_path, capsys):
    tiny_vae(0, latent_channels=8).save_pretrained(tmp_path / "vae8")
    code = main(["build", "--model", "DiT-tiny/2", "--vae", str(tmp_path / "vae8"), "--export-dir",
                 str(tmp_path / "out"), "--sample-steps", "0", "--quiet"])
    assert code == 2 and "8-channel latents" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validation_reloads_the_recorded_vae_and_refuses_a_changed_one(latent_export, tmp_path, capsys):
    import shutil

    shutil.copytree(latent_export, tmp_path / "copy")
    manifest_path = tmp_path / "copy" / "export" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["vae"]["source"]["path"] = str(tmp_path / "copy" / "vae")  # the copy's own VAE
    manifest_path.write_text(json.dumps(manifest))
    assert main(["validate", "--export-dir", str(tmp_path / "copy" / "export"), "--sample-steps", "2", "-q"]) == 0
    tiny_vae(1).save_pretrained(tmp_path / "copy" / "vae")  # other weights under the recorded path
    code = main(["validate", "--export-dir", str(tmp_path / "copy" / "export"), "--sample-steps", "2", "-q"])
    assert code == 2 and "changed since this export" in capsys.readouterr().err


def test_the_engine_stage_builds_and_compares_the_decoders_plan_beside_the_dits(tmp_path, monkeypatch, capsys):
    """Where TensorRT and a GPU exist, the VAE decoder gets its plan in the same stage, profiled on images (not the
    DiT's doubled rows), and is compared with ONNX Runtime on latents like the DiT's plans. TensorRT's build and the
    Polygraphy comparison are stood in for (tests/test_build_cli.py's TensorRTHere); the stage is the real one."""
    from test_build_cli import TensorRTHere

    trt = TensorRTHere(monkeypatch)
    seen = {}

    def compare(plan, feeds, tolerance):
        seen[plan.name] = feeds
        return trt.agreeing(plan, feeds, tolerance)

    trt.compare = compare
    tiny_vae(0).save_pretrained(tmp_path / "vae")
    code = main(["build", "--model", "DiT-tiny/2", "--vae", str(tmp_path / "vae"), "--precision", "fp32",
                 "--max-batch", "3", "--sample-steps", "0", "--export-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr()
    engine = ditexport.open_export(tmp_path / "out").engine
    assert engine["status"] == "built" and sorted(engine["plans"]) == ["cond", "model", "vae"]
    assert engine["plans"]["vae"]["onnx"] == "vae.onnx" and engine["parity"]["passed"]
    from ditexport.engine import read_engine_metadata

    vae_plan = tmp_path / "out" / engine["plans"]["vae"]["plan"]
    assert read_engine_metadata(vae_plan)["batch"] == {"min": 1, "opt": 3, "max": 3}  # 3 images, not 6 rows
    # The validation batches (1, 2, 5) that the 1..3-image profile takes, as latents of the DiT's samples.
    assert [{k: v.shape for k, v in f.items()} for f in seen[vae_plan.name]] == [{"latents": (1, 4, 8, 8)},
                                                                                 {"latents": (2, 4, 8, 8)}]


def test_the_demo_decodes_a_latent_export_with_its_graph(latent_export, monkeypatch):
    from diffusers import AutoencoderKL

    from ditexport.backends.decoders import OnnxRuntimeDecoder
    from ditexport.demo_app.service import GenerateRequest, create_service

    monkeypatch.setattr(AutoencoderKL, "decode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch")))
    service = create_service(latent_export)  # the exports under it: the latent one, named after its directory
    key = next(k for k in service.models if k.endswith("export"))
    try:
        assert isinstance(service.decoder_for(key, "onnxruntime (fp32)"), OnnxRuntimeDecoder)
        response = service.generate(GenerateRequest(model=key, backend="onnxruntime (fp32)", class_index=3,
                                                    num_images=2, steps=2, seed=1), progress=False)
        assert response.result.images.shape == (2, 3, 16, 16)  # decoded images, not latents
    finally:
        service.close()


@pytest.mark.slow
def test_serve_decodes_a_latent_export_as_sample_does(latent_export, tmp_path):
    """The HTTP service of a latent export answers with the decoded images `sample` writes (the export's decoder
    graph on ONNX Runtime in the replica)."""
    pytest.importorskip("ray.serve", reason="the service needs Ray Serve: pip install 'ditexport[serve]'")
    import subprocess
    import sys

    from conftest import png_pixels
    from test_serving_cli import get, running_serve

    export = latent_export / "export"
    with running_serve(export, "--torch-threads", "1") as (base, _):
        answer = get(base + "/v1/images", {"class_labels": [3, 1], "steps": 3, "sampler": "dpmpp-2m", "seed": 7})
    npz = tmp_path / "lone.npz"
    subprocess.run([sys.executable, "-m", "ditexport", "-q", "sample", "--export-dir", str(export), "--backend",
                    "onnxruntime", "--classes", "3,1", "--steps", "3", "--sampler", "dpmpp-2m", "--seed", "7",
                    "--torch-threads", "1", "--out", str(tmp_path / "lone.png"), "--npz", str(npz)], check=True,
                   timeout=120)
    lone = np.load(npz)["arr_0"]
    served = np.stack([png_pixels(image) for image in answer["images"]])
    assert lone.shape == (2, 16, 16, 3) and np.array_equal(served, lone)
