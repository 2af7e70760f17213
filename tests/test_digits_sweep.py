"""The quality-vs-steps sweep: per-seed scores, the noise judgement, and the benchmark script that prints the table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ditexport.backends import TorchBackend
from ditexport.model import create_model
from ditexport.zoo.digits_eval import DigitsReference, evaluate_digits
from ditexport.zoo.digits_sweep import (SweepRow, agreement_noise, fastest_within_noise, format_sweep,
                                        sweep_quality, within_noise)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_vs_steps.py"


def row(sampler, steps, agreement, frechet, scale=4.0, seconds=1.0):
    return SweepRow(sampler, steps, scale, list(range(len(agreement))), agreement, frechet, [seconds] * len(agreement))


def test_noise_is_the_references_seed_spread_one_sided():
    reference = row("ddpm", 250, [1.0, 0.99, 0.98], [1.0, 1.2, 1.1])  # agreement SD 0.01, Fréchet SD 0.1
    assert agreement_noise(reference, 1000) == pytest.approx(0.01)
    assert within_noise(row("x", 10, [0.975] * 3, [1.29] * 3), reference, 1000)  # 1.5 and 1.9 SDs worse
    assert not within_noise(row("x", 10, [0.965] * 3, [1.0] * 3), reference, 1000)  # agreement 2.5 SDs lower
    assert not within_noise(row("x", 10, [1.0] * 3, [1.31] * 3), reference, 1000)  # Fréchet 2.1 SDs higher
    assert within_noise(row("x", 10, [1.0] * 3, [0.5] * 3), reference, 1000)  # better is never outside the noise


def test_a_constant_100_percent_reference_still_allows_one_digit_of_noise():
    reference = row("ddpm", 250, [1.0] * 5, [1.0, 1.1, 1.0, 1.1, 1.0])
    assert agreement_noise(reference, 1000) == pytest.approx(0.001)
    assert within_noise(row("x", 10, [0.998] * 5, [1.0] * 5), reference, 1000)
    assert not within_noise(row("x", 10, [0.997] * 5, [1.0] * 5), reference, 1000)


def test_fastest_within_noise_takes_the_fewest_steps_at_that_guidance():
    rows = [row("ddpm", 250, [1.0, 1.0], [1.0, 1.2]), row("dpmpp-2m", 10, [0.9, 0.9], [3.0, 3.0]),
            row("dpmpp-2m", 20, [1.0, 1.0], [1.1, 1.1]), row("dpmpp-2m", 15, [1.0, 1.0], [1.2, 1.2]),
            row("ddpm", 250, [0.9, 0.9], [0.1, 0.1], scale=1.0), row("dpmpp-2m", 10, [0.9, 0.9], [0.1, 0.1], 1.0)]
    assert fastest_within_noise(rows, 1000, 4.0).num_steps == 15
    assert fastest_within_noise(rows[:2], 1000, 4.0) is None
    table = format_sweep(rows, 1000, 0.07)
    assert table.count("| reference |") == 2 and "| DPM-Solver++ 2M | 10 | 4 | 90.0 % | 3.000 |" in table


def test_sweep_scores_every_setting_and_seed_as_evaluate_does():
    backend = TorchBackend(create_model("DiT-digits", seed=0))  # random weights: plumbing, not quality
    reference = DigitsReference()
    rows = sweep_quality(backend, settings=(("ddpm", 3), ("dpmpp-2m", 2)), seeds=(0, 1), num_per_class=1,
                         guidance_scale=2.0, reference=reference, log=lambda line: None)
    assert [(r.sampler, r.num_steps, r.guidance_scale) for r in rows] == [
        ("ddpm", 3, 2.0), ("ddpm", 3, 1.0), ("dpmpp-2m", 2, 2.0), ("dpmpp-2m", 2, 1.0)]
    assert all(r.seeds == [0, 1] and len(r.frechet_distance) == 2 for r in rows)
    direct = evaluate_digits(backend, num_per_class=1, num_steps=2, guidance_scale=2.0, seed=1, sampler="dpmpp-2m",
                             reference=reference)
    assert rows[2].frechet_distance[1] == pytest.approx(direct.scores[0].frechet_distance, rel=1e-9)
    assert rows[3].class_agreement[1] == direct.scores[1].class_agreement


def test_benchmark_script_prints_the_table_and_reprints_it_from_json(tmp_path):
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(SCRIPT), "--settings", "ddpm:4,dpmpp-2m:3", "--seeds", "0,1", "--num-per-class", "1",
           "--torch-threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| DDPM | 4 | 4 |" in proc.stdout and "| DPM-Solver++ 2M | 3 | 1 |" in proc.stdout
    assert "fastest setting within the noise of DDPM 4 at guidance 4:" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["num_samples"] == 10 and len(saved["rows"]) == 4 and saved["rows"][0]["seeds"] == [0, 1]
    again = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    table = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
    assert table(again.stdout) == table(proc.stdout)
    bad = subprocess.run([sys.executable, str(SCRIPT), "--settings", "ddpm"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "sampler:steps pairs" in bad.stderr
