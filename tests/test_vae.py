"""The VAE decoder export: a tiny random AutoencoderKL saved to disk, loaded, exported, validated on CPU
(the fp16 graph through the same fp16 emulation as the DiT's); no engine is built for it."""
import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the VAE export needs diffusers (pip install 'ditexport[vae]')")

from conftest import tiny_vae  # noqa: E402
from ditexport.cli import main  # noqa: E402
from ditexport.pipeline import VAE_SCALE, VaeDecoder  # noqa: E402
from ditexport.artifacts import vae_onnx_filename  # noqa: E402
from ditexport.export.vae import VaeDecodeGraph, sample_latents  # noqa: E402
from ditexport.validate.vae import validate_vae_decoder  # noqa: E402
from ditexport.vae import REPORT_NAME, VaeExportError, export_vae, load_vae, vae_scale_factor  # noqa: E402

LATENT = 4  # 4x4 latents -> 8x8 images with two decoder blocks


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    tiny_vae(0).save_pretrained(root / "tiny-vae")
    report = export_vae(root / "tiny-vae", root / "out", latent_size=LATENT, log=lambda m: None)
    return root, report


def test_graph_is_the_pipelines_decoder(exported):
    root, _ = exported
    vae = load_vae(root / "tiny-vae")
    latents = torch.randn(2, 4, LATENT, LATENT)
    assert vae_scale_factor(vae) == 2
    with torch.no_grad():
        expected = VaeDecoder(root / "tiny-vae")(latents)  # the pipeline divides by 0.18215 itself
        got = VaeDecodeGraph(vae)(latents)
    assert VAE_SCALE == 0.18215 and torch.allclose(got, expected)


def test_export_validates_both_precisions_on_several_batches(exported):
    root, report = exported
    assert report["passed"] and report["image_size"] == 8 and report["latent_size"] == LATENT
    for precision, tolerance in (("fp32", 1e-5), ("fp16", 5e-3)):
        graph = report["graphs"][precision]
        assert (root / "out" / vae_onnx_filename(precision)).is_file()
        assert graph["tolerance"] == tolerance
        assert graph["emulated"] == (precision == "fp16") and graph["provider"] == "CPUExecutionProvider"
        assert [c["batch"] for c in graph["checks"]] == [1, 2, 3]  # one session, three batch sizes
        for check in graph["checks"]:
            assert check["shape"] == [check["batch"], 3, 8, 8] and check["finite"]
            assert 0 < check["rel_err"] <= tolerance
    # fp16 rounding shows: the fp16 graph is really different from the fp32 one, though within tolerance.
    assert report["graphs"]["fp16"]["checks"][0]["rel_err"] > 10 * report["graphs"]["fp32"]["checks"][0]["rel_err"]
    assert json.loads((root / "out" / REPORT_NAME).read_text())["passed"] is True


def test_fp16_graph_keeps_norms_and_io_in_fp32(exported):
    import onnx
    from onnx import TensorProto

    root, _ = exported
    model = onnx.load(str(root / "out" / vae_onnx_filename("fp16")))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(inits.get(w) == TensorProto.FLOAT16 for w in conv_weights)
    norms = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")]
    norm_params = [inits[name] for n in norms for name in n.input[1:] if name in inits]
    assert norms and norm_params and all(dt == TensorProto.FLOAT for dt in norm_params)
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    assert value.type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_validation_catches_a_different_decoder(exported):
    root, _ = exported
    other = tiny_vae(1)  # same architecture, other weights: the check must fail
    result = validate_vae_decoder(other, root / "out" / vae_onnx_filename("fp32"), precision="fp32",
                                  latent_size=LATENT, batches=(2,))
    assert not result["passed"] and result["checks"][0]["rel_err"] > 1e-2


def test_fp16_validation_sees_the_rounding_that_plain_cpu_execution_hides(exported):
    # ORT's CPU provider runs most fp16 nodes in fp32 through casts; the emulated twin rounds every fp16
    # tensor as fp16 hardware does, so its error is the larger, honest one (about 2.5x here).
    import onnxruntime as ort

    from ditexport.validate import relative_error

    root, report = exported
    vae = load_vae(root / "tiny-vae")
    plain = ort.InferenceSession(str(root / "out" / vae_onnx_filename("fp16")), providers=["CPUExecutionProvider"])
    for i, check in enumerate(report["graphs"]["fp16"]["checks"]):
        latents = sample_latents(vae, check["batch"], LATENT, i)  # the seeds validate_vae_decoder uses
        with torch.no_grad():
            expected = VaeDecodeGraph(vae)(latents).numpy()
        plain_err = relative_error(plain.run(None, {"latents": latents.numpy()})[0], expected)[0]
        assert 0 < plain_err < check["rel_err"]


def test_the_standalone_export_writes_only_the_decoder_graphs_and_its_report(exported):
    root, report = exported
    assert "engine" not in report  # engines for the decoder come with a DiT export (build --vae)
    assert sorted(p.name for p in (root / "out").iterdir()) == ["vae.fp16.onnx", "vae.onnx", REPORT_NAME]


def test_missing_vae_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(VaeExportError, match="not found"):
        load_vae(tmp_path / "nope")
    code = main(["export-vae", "--vae", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--latent-size", "4"])
    assert code == 2 and capsys.readouterr().err.startswith("error: VAE directory not found")
