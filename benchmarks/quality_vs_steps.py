"""Quality against sampling steps on the built-in digits model: the table of docs/digits.md.

    python benchmarks/quality_vs_steps.py --torch-threads 1 --json quality_vs_steps.json

Scores DDPM 250, DDIM 50 and DPM-Solver++ (2M) at 10, 15, 20, 25 and 50 steps, guided (4) and unguided,
100 digits per class, for seeds 0-4 (the spread over seeds is the measurement noise), with the sampling time of
each run; prints a markdown table and the fastest setting within the noise of DDPM 250.
`--from-json FILE` re-prints the table of an earlier run without sampling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_settings(text: str) -> tuple[tuple[str, int], ...]:
    """"ddpm:250,dpmpp-2m:20" -> (("ddpm", 250), ("dpmpp-2m", 20)); the first is the reference."""
    try:
        return tuple((name, int(steps)) for name, steps in (item.split(":") for item in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"settings are sampler:steps pairs, e.g. ddpm:250,dpmpp-2m:20; "
                                         f"got {text!r}") from None


def main(argv=None) -> int:
    from ditexport.zoo.digits_sweep import SWEEP_SETTINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", type=parse_settings, default=SWEEP_SETTINGS,
                   help="sampler:steps pairs, the first is the reference (default: the issue's seven)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated noise seeds (default: 0,1,2,3,4)")
    p.add_argument("--num-per-class", type=int, default=100, help="digits per class and run (default: 100)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale beside unguided (default: 4)")
    p.add_argument("--checkpoint", default=None, help="a 10-class 1x8x8 model (default: the built-in digits)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    p.add_argument("--json", default=None, help="also write every per-seed score as JSON")
    p.add_argument("--from-json", default=None, help="print the table of an earlier --json run; no sampling")
    args = p.parse_args(argv)

    from ditexport.zoo.digits_sweep import SweepRow, fastest_within_noise, format_sweep, rows_to_dicts

    if args.from_json:
        saved = json.loads(open(args.from_json).read())
        rows = [SweepRow(**r) for r in saved["rows"]]
        print_summary(rows, saved, format_sweep, fastest_within_noise)
        return 0

    import torch

    from ditexport.artifacts import atomic_write_json
    from ditexport.backends import TorchBackend
    from ditexport.source import ModelSource
    from ditexport.zoo.digits_eval import DigitsReference
    from ditexport.zoo.digits_sweep import sweep_quality

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    resolved = ModelSource.resolve(None, args.checkpoint)
    model, source = resolved.load(), resolved.describe()
    reference = DigitsReference()
    num_samples = 10 * args.num_per_class
    print(f"{source}; {num_samples} digits per run; seeds {seeds}; {torch.get_num_threads()} torch thread(s)")
    start, load_before = time.perf_counter(), os.getloadavg()
    rows = sweep_quality(TorchBackend(model), settings=args.settings, seeds=seeds,
                         num_per_class=args.num_per_class, guidance_scale=args.cfg_scale, reference=reference)
    saved = {"model": source, "num_samples": num_samples, "frechet_floor": reference.frechet_floor(num_samples),
             "classifier_held_out_accuracy": reference.held_out_accuracy, "torch_threads": torch.get_num_threads(),
             "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
             "wall_s": time.perf_counter() - start, "load_average_1_5_15_min": {"start": load_before,
                                                                                 "end": os.getloadavg()},
             "rows": rows_to_dicts(rows)}
    print_summary(rows, saved, format_sweep, fastest_within_noise)
    if args.json:
        print(f"wrote {atomic_write_json(args.json, saved)}")
    return 0


def print_summary(rows, saved, format_sweep, fastest_within_noise) -> None:
    print()
    print(format_sweep(rows, saved["num_samples"], saved["frechet_floor"]))
    guided = max(r.guidance_scale for r in rows)
    best = fastest_within_noise(rows, saved["num_samples"], guided)
    print(f"\nfastest setting within the noise of {rows[0].name} at guidance {guided:g}: "
          f"{best.name if best else 'none'}")


if __name__ == "__main__":
    sys.exit(main())
