"""CPU threads: `sample` and `train-digits` with torch's own default, 1 and 2 threads, and ditexport's default,
on an idle machine and with another process spinning on one core, in one run, side by side.

    python benchmarks/threads.py [--repeats 2] [--json /tmp/threads.json]

Each command runs in a fresh `python -m ditexport` process; variants alternate within each repeat, so slow
phases of a shared machine hit them alike. The busy core is `python -c "while True: pass"`, stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

WORKLOADS = {
    "digits sample (250 steps, batch 16)": ["sample", "--quiet"],
    "DiT-S/2 256 px sample (10 steps, batch 2)": ["sample", "--model", "DiT-S/2", "--image-size", "256",
                                                  "--num-images", "1", "--steps", "10", "--quiet"],
    "DiT-B/2 256 px sample (4 steps, batch 2)": ["sample", "--model", "DiT-B/2", "--image-size", "256",
                                                 "--num-images", "1", "--steps", "4", "--quiet"],
    "train-digits, 50 steps": ["train-digits", "--steps", "50", "--quiet"],
}


def torch_default_threads() -> int:
    """torch's own thread count in a fresh process (what `sample` used before ditexport chose)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def run(args: list[str], flag: list[str], workdir: str) -> tuple[float, str]:
    """Seconds of the measured part (sampling or training) and the thread line the command printed."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out_flag = ["--out", os.path.join(workdir, "out.png" if args[0] == "sample" else "run")]
    if args[0] == "train-digits":
        out_flag[1] = tempfile.mkdtemp(dir=workdir)
    proc = subprocess.run([sys.executable, "-m", "ditexport", *args, *out_flag, *flag], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"{args} {flag} failed: {proc.stderr.strip()}")
    text = proc.stdout
    threads = re.search(r"(\d+ CPU threads? \([^)]*\))", text).group(1)
    if args[0] == "sample":
        return float(re.search(r"wrote .*?: ([\d.]+) s in all", text).group(1)), threads
    return float(re.search(r"trained in ([\d.]+) s", text).group(1)), threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch_default = torch_default_threads()
    variants = {f"torch default ({torch_default})": ["--torch-threads", str(torch_default)],
                "1 thread": ["--torch-threads", "1"], "2 threads": ["--torch-threads", "2"],
                "ditexport default": []}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ditexport-threads-") as workdir:
        for load in ("idle", "one core busy"):
            spinner = None
            if load == "one core busy":
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1)  # let the spinner take its core before the first measurement
            try:
                for workload, command in WORKLOADS.items():
                    times = {name: [] for name in variants}
                    chosen = ""
                    loads = []
                    for _ in range(args.repeats):
                        for name, flag in variants.items():
                            loads.append(os.getloadavg()[0])
                            seconds, threads = run(command, flag, workdir)
                            times[name].append(seconds)
                            chosen = threads if not flag else chosen
                    row = {"load": load, "workload": workload, "load_avg": round(statistics.mean(loads), 2),
                           "default_chose": chosen, "seconds": times}
                    rows.append(row)
                    cells = "  ".join(f"{name} {statistics.median(t):6.2f} s" for name, t in times.items())
                    print(f"{load:<14} {workload:<42} load {row['load_avg']:4.1f}  {cells}  [{chosen}]", flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": os.uname().machine, "cores": len(os.sched_getaffinity(0)),
                       "torch_default": torch_default, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
