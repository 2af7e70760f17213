"""Quality against sampling steps on the digits model: class agreement, Fréchet distance and time per sampler setting.

Each setting is scored with and without guidance over several seeds; the seed-to-seed spread of the
reference setting (official DDPM 250) is the measurement noise that the other settings are judged against.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from .digits_eval import DigitsReference, evaluate_digits
from ..logs import get_logger

LOG = get_logger("zoo")

# The settings compared: today's reference, the official DDIM, and DPM-Solver++ over the range diffusers users run.
SWEEP_SETTINGS = (("ddpm", 250), ("ddim", 50), ("dpmpp-2m", 10), ("dpmpp-2m", 15), ("dpmpp-2m", 20),
                  ("dpmpp-2m", 25), ("dpmpp-2m", 50))
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp-2m": "DPM-Solver++ 2M"}
NOISE_SDS = 2.0  # "within noise": no worse than the reference's seed mean by more than 2 of its seed-to-seed SDs


@dataclass
class SweepRow:
    """One sampler setting at one guidance scale, one value per seed."""
    sampler: str
    num_steps: int
    guidance_scale: float
    seeds: list[int]
    class_agreement: list[float]
    frechet_distance: list[float]
    sampling_s: list[float]

    @property
    def name(self) -> str:
        return f"{SAMPLER_NAMES.get(self.sampler, self.sampler)} {self.num_steps}"


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def agreement_noise(row: SweepRow, num_samples: int) -> float:
    """Seed-to-seed SD of the class agreement, at least one digit of a run (an SD of 0 at 100 % is no noise
    estimate: it only says no seed missed)."""
    return max(mean_sd(row.class_agreement)[1], 1 / num_samples)


def within_noise(row: SweepRow, reference: SweepRow, num_samples: int) -> bool:
    """Class agreement no lower and Fréchet distance no higher than the reference's by more than its noise."""
    agreement_ok = (mean_sd(row.class_agreement)[0]
                    >= mean_sd(reference.class_agreement)[0] - NOISE_SDS * agreement_noise(reference, num_samples))
    ref_fd, ref_sd = mean_sd(reference.frechet_distance)
    return agreement_ok and mean_sd(row.frechet_distance)[0] <= ref_fd + NOISE_SDS * ref_sd


def sweep_quality(backend, settings=SWEEP_SETTINGS, seeds=(0,), num_per_class: int = 100,
                  guidance_scale: float = 4.0, reference: DigitsReference | None = None, log=LOG.info) -> list[SweepRow]:
    """Scores every (sampler, steps) setting with `guidance_scale` and unguided, once per seed."""
    reference = reference or DigitsReference()
    rows: dict[tuple, SweepRow] = {}
    for sampler, steps in settings:
        for seed in seeds:
            report = evaluate_digits(backend, num_per_class=num_per_class, num_steps=steps,
                                     guidance_scale=guidance_scale, seed=seed, sampler=sampler, reference=reference)
            for score in report.scores:
                key = (sampler, steps, score.guidance_scale)
                row = rows.setdefault(key, SweepRow(sampler, steps, score.guidance_scale, [], [], [], []))
                row.seeds.append(seed)
                row.class_agreement.append(score.class_agreement)
                row.frechet_distance.append(score.frechet_distance)
                row.sampling_s.append(score.sampling_s)
                log(f"{row.name:<20} guidance {score.guidance_scale:g}  seed {seed}: agreement "
                    f"{100 * score.class_agreement:5.1f} %  Fréchet {score.frechet_distance:.3f}  "
                    f"{score.sampling_s:.1f} s")
    return list(rows.values())


def format_sweep(rows: list[SweepRow], num_samples: int, frechet_floor: float) -> str:
    """A markdown table: seed-0 scores, the seed mean ± SD, time, and whether the setting is within the noise
    of the first row's setting (the reference) at the same guidance scale."""
    lines = ["| sampler | steps | guidance | class agreement | Fréchet (64 px) | over seeds: agreement | "
             "over seeds: Fréchet | sampling (median) | within noise of the reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    references = {}
    for row in rows:
        references.setdefault(row.guidance_scale, row)
    for row in sorted(rows, key=lambda r: -r.guidance_scale):
        ref = references[row.guidance_scale]
        agreement_mean, agreement_sd = mean_sd(row.class_agreement)
        fd_mean, fd_sd = mean_sd(row.frechet_distance)
        verdict = "reference" if row is ref else ("yes" if within_noise(row, ref, num_samples) else "no")
        lines.append(f"| {SAMPLER_NAMES.get(row.sampler, row.sampler)} | {row.num_steps} | {row.guidance_scale:g} | "
                     f"{100 * row.class_agreement[0]:.1f} % | {row.frechet_distance[0]:.3f} | "
                     f"{100 * agreement_mean:.2f} ± {100 * agreement_sd:.2f} % | {fd_mean:.3f} ± {fd_sd:.3f} | "
                     f"{statistics.median(row.sampling_s):.1f} s | {verdict} |")
    seeds = rows[0].seeds
    lines.append(f"\nFirst two score columns: seed {seeds[0]}; 'over seeds': mean ± SD over seeds "
                 f"{', '.join(map(str, seeds))}; {num_samples} digits per run; real-vs-real Fréchet floor "
                 f"{frechet_floor:.3f}.")
    return "\n".join(lines)


def fastest_within_noise(rows: list[SweepRow], num_samples: int, guidance_scale: float) -> SweepRow | None:
    """The setting with the fewest steps whose guided scores are within the reference's noise."""
    guided = [r for r in rows if r.guidance_scale == guidance_scale]
    ok = [r for r in guided[1:] if within_noise(r, guided[0], num_samples)]
    return min(ok, key=lambda r: (r.num_steps, statistics.median(r.sampling_s))) if ok else None


def rows_to_dicts(rows: list[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]
