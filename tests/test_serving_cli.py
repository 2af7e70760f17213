"""`python -m ditexport serve` as a user runs it: a process that starts its own Ray on loopback, answers like
`python -m ditexport sample`, and stops on SIGTERM."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, png_pixels

pytest.importorskip("ray.serve", reason="the service needs Ray Serve: pip install 'ditexport[serve]'")


def get(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=120) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def running_serve(export_dir, *flags: str):
    """`python -m ditexport serve` as a user starts it, ready; yields (its URL, its output lines so far) and stops it
    with SIGTERM (as `kill` or `docker stop`; Ctrl-C takes the same path), which must exit it with 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAY_ADDRESS")}
    server = subprocess.Popen([sys.executable, "-m", "ditexport", "serve", "--export-dir", str(export_dir),
                               "--port", str(port), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, ready = [], threading.Event()

    def read():
        for line in server.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "ready in" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(timeout=180), "".join(lines)
        yield f"http://127.0.0.1:{port}", lines
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, "".join(lines)


def test_serve_answers_as_sample_does_with_its_threads_and_stops_on_sigterm(digits_export, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAY_ADDRESS")}
    with running_serve(digits_export, "--torch-threads", "2") as (base, lines):
        banner = next(line for line in lines if "ready in" in line)
        assert "2 CPU threads (--torch-threads) per replica" in banner and base.removeprefix("http://") in banner
        assert get(base + "/v1/models")["models"][0]["threads"] == 2
        answer = get(base + "/v1/images", {"class_labels": [3, 1], "steps": 6, "sampler": "dpmpp-2m", "seed": 7})
        # The same request through `sample`, on the same backend and threads.
        npz = tmp_path / "lone.npz"
        subprocess.run([sys.executable, "-m", "ditexport", "-q", "sample", "--export-dir", str(digits_export),
                        "--backend", "onnxruntime", "--classes", "3,1", "--steps", "6", "--sampler", "dpmpp-2m",
                        "--seed", "7", "--torch-threads", "2", "--out", str(tmp_path / "lone.png"), "--npz", str(npz)],
                       check=True, env=env, timeout=120)
        lone = np.load(npz)["arr_0"]
        served = np.stack([png_pixels(image) for image in answer["images"]])
        assert np.array_equal(served.reshape(lone.shape), lone)


def test_the_load_benchmark_runs_all_three_modes_and_answers_every_request(digits_export, tmp_path):
    """`benchmarks/serve_load.py`, tiny: every request of every mode answered, and each mode batched as it says."""
    out = tmp_path / "load.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "serve_load.py"),
                           "--export-dir", str(digits_export), "--rates", "200", "--requests", "8", "--steps", "20,30",
                           "--threads", "1", "--max-running-images", "8", "--cost-seconds", "0.3",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["mode"]: row for row in result["rows"]}
    assert sorted(rows) == ["continuous", "request-batch", "single"]
    for row in rows.values():
        assert row["sent"] == row["ok"] == 8 and row["errors"] == 0 and row["p50"] <= row["p99"]
    assert rows["single"]["rows_per_forward"] == 2.0  # one guided one-image request at a time
    assert rows["continuous"]["rows_per_forward"] > 2.0  # 8 requests at 200/s overlap: they share forwards
    assert set(result["forward_ms_per_row"]) == {"2", "16"} and min(result["forward_ms_per_row"].values()) > 0
    assert "Best achieved requests/s with p99 at most" in done.stdout


def test_every_limit_flag_of_serve_and_demo_defaults_to_its_dataclass_field():
    """Each default is declared once: the flags of `serve` and `demo` read the fields of RequestLimits,
    ServiceLimits and DemoLimits, and `serve` builds its settings from the flags with nothing changed."""
    from dataclasses import fields

    from ditexport.cli.parser import build_parser
    from ditexport.limits import DemoLimits, RequestLimits
    from ditexport.serving.command import limits_of
    from ditexport.serving.settings import ServeSettings, ServiceLimits

    parser = build_parser()
    serve = parser.parse_args(["serve", "--export-dir", "x"])
    demo = parser.parse_args(["demo"])
    checked = 0
    for args, classes in ((serve, (RequestLimits, ServiceLimits)), (demo, (DemoLimits,))):
        for cls in classes:
            for f in fields(cls):
                assert getattr(args, f.name) == f.default, (args.command, f.name)
                checked += 1
            assert limits_of(args, cls) == cls()
    assert checked == 3 + 11 + 5
    for name in ("backend", "precision", "device"):
        assert getattr(serve, name) == getattr(ServeSettings, name)
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "(default: 16384)" in help_text and "(default: 60.0)" in help_text and "(default: 32)" in help_text


def test_a_limit_flag_refuses_zero_and_non_numbers(capsys):
    from ditexport.cli import main

    assert main_exit(main, ["serve", "--export-dir", "x", "--max-queue", "0"]) == 2
    assert "must be above 0" in capsys.readouterr().err
    assert main_exit(main, ["demo", "--max-guidance", "inf"]) == 2


def main_exit(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)
