"""The digits yardstick: Fréchet distance, the real-digit classifier, and the evaluation report."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ditexport import cli
from ditexport.backends import TorchBackend
from ditexport.sampler import SamplerConfig
from ditexport.model import create_model
from ditexport.pipeline import Pipeline
from ditexport.zoo import load_builtin
from ditexport.zoo.digits_eval import DigitsReference, evaluate_digits, frechet_distance


@pytest.fixture(scope="module")
def reference():
    return DigitsReference()


def test_frechet_distance_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_classifier_knows_real_digits_and_rejects_wrong_labels(reference):
    assert reference.held_out_accuracy > 0.97
    images = torch.from_numpy(reference.held_out_features).float().reshape(-1, 1, 8, 8)
    agreement, per_class = reference.class_agreement(images, reference.held_out_labels)
    assert agreement == pytest.approx(reference.held_out_accuracy)
    assert min(per_class) > 0.9
    wrong, _ = reference.class_agreement(images, (reference.held_out_labels + 1) % 10)
    assert wrong < 0.05


def test_real_digits_reach_the_floor_and_noise_does_not(reference):
    floor = reference.frechet_floor(500)
    held_out = torch.from_numpy(reference.held_out_features[:500]).float().reshape(-1, 1, 8, 8)
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    print(f"floor {floor:.3f}, uniform noise {reference.frechet_to_real(noise):.3f}")
    assert reference.frechet_to_real(held_out) == pytest.approx(floor, rel=0.2)
    assert reference.frechet_to_real(noise) > 20 * floor


def test_evaluate_scores_guided_and_unguided_samples(reference):
    backend = TorchBackend(create_model("DiT-digits", seed=0))  # random weights: plumbing, not quality
    report = evaluate_digits(backend, num_per_class=2, num_steps=5, guidance_scale=3.0, seed=1,
                             reference=reference)
    assert [s.guidance_scale for s in report.scores] == [3.0, 1.0]
    assert report.floor_samples == 20 and report.frechet_floor == pytest.approx(reference.frechet_floor(20))
    labels = np.repeat(np.arange(10), 2)
    for score in report.scores:
        # The same samples drawn again through the pipeline, classified and counted here.
        images = Pipeline(backend).run(labels.tolist(), seed=1, sampler_cfg=SamplerConfig(
            num_steps=5, guidance_scale=score.guidance_scale)).images
        hits = reference.predict(images) == labels
        assert score.class_agreement == pytest.approx(hits.mean())
        assert score.per_class_agreement == pytest.approx([hits[2 * c:2 * c + 2].mean() for c in range(10)])
        assert score.frechet_distance == pytest.approx(reference.frechet_to_real(images))
        assert score.frechet_distance > report.frechet_floor  # an untrained model draws no digits
    assert "held-out accuracy" in report.format()


def test_evaluate_refuses_models_that_do_not_draw_digits():
    with pytest.raises(ValueError, match="1x8x8"):
        evaluate_digits(TorchBackend(create_model("DiT-tiny/2", seed=0)), num_per_class=1, num_steps=2)


def test_eval_command_prints_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--num-per-class", "2", "--steps", "10", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "class agreement" in printed and "real-vs-real floor" in printed
    report = json.loads(out.read_text())
    assert report["model"] == "built-in model 'digits'" and report["num_per_class"] == 2
    assert [s["guidance_scale"] for s in report["scores"]] == [4.0, 1.0]


def test_eval_command_takes_the_sampler(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--sampler", "dpmpp-2m", "--steps", "5", "--num-per-class", "2", "--json", str(out),
                     "--quiet"]) == 0
    assert "5 dpmpp-2m steps" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["sampler"], report["num_steps"]) == ("dpmpp-2m", 5)
    backend = TorchBackend(load_builtin("digits"))
    frechet = {name: [s.frechet_distance for s in evaluate_digits(backend, num_per_class=2, num_steps=5,
                                                                  sampler=name).scores]
               for name in ("dpmpp-2m", "ddim")}
    assert [s["frechet_distance"] for s in report["scores"]] == pytest.approx(frechet["dpmpp-2m"], rel=1e-6)
    assert frechet["dpmpp-2m"] != pytest.approx(frechet["ddim"], rel=1e-3)  # the solver, not DDIM, made them
