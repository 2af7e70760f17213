"""The Gradio demo: its generate function, a real server queried with gradio_client, and a real browser."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port

from ditexport.demo_app import (BUILTIN_KEY, NO_BLEND, DemoInputError, DemoLimits, DemoService, GenerateRequest,
                                builtin_entry)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Small but real requests: the digits model at a few steps answers in well under a second.
QUICK = dict(num_images=4, steps=12, guidance=4.0, seed=11)


@pytest.fixture(scope="module")
def service():
    service = DemoService([builtin_entry()], DemoLimits(max_steps=300, max_images=8))
    yield service
    service.close()


# ------------------------------------------------------------------------------ the generate function

def test_generate_returns_the_requested_images(service):
    response = service.generate(GenerateRequest(class_index=3, **QUICK), progress=False)
    assert len(response.images) == len(response.captions) == 4
    for image in response.images:
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8  # 8x8 digits enlarged 16x
        assert image.std() > 0
    assert response.captions[0] == "3 · #1"
    r = response.result
    assert r.images.shape == (4, 1, 8, 8) and r.steps == 12 and r.labels == [3] * 4
    assert 0 <= r.images.min() and r.images.max() <= 1
    assert "**torch** (fp32)" in response.summary and "ms per step" in response.summary
    # Different noise per image: a batch of one class is not one image repeated.
    assert not torch.equal(r.images[0], r.images[1])


def test_blend_endpoints_reproduce_plain_class_sampling(service):
    def images(**kw):
        return service.generate(GenerateRequest(**QUICK, **kw), progress=False).result.images

    class_a, class_b = images(class_index=3), images(class_index=8)
    assert torch.equal(images(class_index=3, blend_class=8, blend_weight=0.0), class_a)
    assert torch.equal(images(class_index=3, blend_class=8, blend_weight=1.0), class_b)
    middle = images(class_index=3, blend_class=8, blend_weight=0.5)
    assert not torch.equal(middle, class_a) and not torch.equal(middle, class_b)


@pytest.mark.parametrize("change, message", [
    (dict(steps=301), "steps must be between 1 and 300"),
    (dict(num_images=9), "number of images must be between 1 and 8"),
    (dict(guidance=25.0), "guidance scale must be between 1.0 and 20.0"),
    (dict(guidance=float("nan")), "guidance scale must be between 1.0 and 20.0 on this server, got nan"),
    (dict(blend_class=3, blend_weight=1.5), "blend must be between"),
    (dict(class_index=10), r"class must be in 0\.\.9"),
    (dict(backend="onnxruntime (fp32)"), "cannot run digits"),
    (dict(model="exports/nothing"), "unknown model"),
    (dict(sampler="euler"), "sampler must be"),
])
def test_limits_and_bad_inputs_are_clear_errors(service, change, message):
    request = GenerateRequest(**{**QUICK, **change})
    with pytest.raises(DemoInputError, match=message):
        service.generate(request, progress=False)


def test_requests_for_a_busy_backend_wait_for_it(service):
    slot = service._slots["torch"]
    slot.acquire()  # another request holds the torch backend
    waits, results, waiting = [], [], threading.Event()

    def on_wait(message):
        waits.append(message)
        waiting.set()

    worker = threading.Thread(target=lambda: results.append(
        service.generate(GenerateRequest(**QUICK), progress=False, on_wait=on_wait)))
    try:
        worker.start()
        assert waiting.wait(timeout=60)  # the request said it waits ...
        worker.join(timeout=0.2)
        assert worker.is_alive() and results == []  # ... and it does wait: no result while the slot is held
        assert waits == ["waiting for the torch backend (busy with another request)"]
    finally:
        slot.release()
    worker.join(timeout=60)
    assert len(results) == 1 and len(results[0].images) == 4


def test_the_demo_refuses_beyond_its_queue_bound_with_a_busy_message():
    """DemoLimits.max_queue requests may be running or waiting at once, all runtimes together; one more is told
    at once that the demo is busy (the bound Gradio's queue also has), instead of waiting minutes."""
    from ditexport.demo_app import DemoBusyError

    service = DemoService([builtin_entry()], DemoLimits(max_queue=2))
    slot = service._slots["torch"]
    slot.acquire()  # a request holds the torch backend; the next two wait for it
    waiting, results = threading.Semaphore(0), []
    workers = [threading.Thread(target=lambda: results.append(service.generate(
        GenerateRequest(**QUICK), progress=False, on_wait=lambda _: waiting.release()))) for _ in range(2)]
    try:
        for worker in workers:
            worker.start()
        assert waiting.acquire(timeout=60) and waiting.acquire(timeout=60)
        start = time.perf_counter()
        with pytest.raises(DemoBusyError, match="the demo is busy: 2 requests are already running or waiting; "
                                                "try again in a few seconds"):
            service.generate(GenerateRequest(**QUICK), progress=False)
        assert time.perf_counter() - start < 1.0
    finally:
        slot.release()
    for worker in workers:
        worker.join(timeout=60)
    assert len(results) == 2
    assert len(service.generate(GenerateRequest(**QUICK), progress=False).images) == 4  # room again
    service.close()


def test_the_gradio_queue_has_the_demos_bound(service):
    from ditexport.demo_app.ui import build_app

    app = build_app(DemoService([builtin_entry()], DemoLimits(max_queue=7)))
    assert app._queue.max_size == 7


# ---------------------------------------------------------------------------------- the command line

def test_demo_command_binds_localhost_and_does_not_share_by_default():
    from ditexport.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share, args.func.__name__) == ("127.0.0.1", None, False, "cmd_demo")
    args = build_parser().parse_args(["demo", "--host", "0.0.0.0", "--port", "8000", "--share"])
    assert (args.host, args.port, args.share) == ("0.0.0.0", 8000, True)


def test_demo_app_script_forwards_to_the_demo_command():
    script = Path(__file__).resolve().parent.parent / "demo" / "app.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--share" in out.stdout and "127.0.0.1" in out.stdout


# ------------------------------------------------------------------------------------ an ONNX export

@pytest.fixture(scope="module")
def export_root(digits_export, tmp_path_factory):
    """A validated build of the served digits model, as if copied from another machine: the checkpoint its
    manifest names is not here, so only its graphs can run it."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("exports")
    shutil.copytree(digits_export, root / "digits")
    manifest_path = root / "digits" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"] = {"kind": "checkpoint", "model": None,
                          "checkpoint": {"path": "/elsewhere/digits.pt", "sha256": "0" * 64}}
    manifest_path.write_text(json.dumps(manifest))
    return root


def test_exports_run_on_onnxruntime_and_blend_through_the_condition_graph(service, export_root):
    from ditexport.demo_app import create_service

    served = create_service(export_root)
    try:
        assert served.model_keys() == [BUILTIN_KEY, "exports/digits"]
        entry = served.entry("exports/digits")
        # No checkpoint beside the export: no torch backend, yet blending works from the graph's embedders.
        assert entry.backend_choices() == ["onnxruntime (fp32)"]
        assert [label for label, _ in served.class_choices("exports/digits")] == [str(i) for i in range(10)]
        request = dict(model="exports/digits", backend="onnxruntime (fp32)", class_index=6, **QUICK)
        on_ort = served.generate(GenerateRequest(**request), progress=False)
        assert "**onnxruntime** (fp32)" in on_ort.summary
        on_torch = service.generate(GenerateRequest(class_index=6, **QUICK), progress=False)
        assert (on_ort.result.images - on_torch.result.images).abs().max() < 1e-3
        blended_0 = served.generate(GenerateRequest(**request, blend_class=2, blend_weight=0.0), progress=False)
        assert (blended_0.result.images - on_ort.result.images).abs().max() < 1e-3
        blended_1 = served.generate(GenerateRequest(**request, blend_class=2, blend_weight=1.0), progress=False)
        plain_2 = service.generate(GenerateRequest(class_index=2, **QUICK), progress=False)
        assert (blended_1.result.images - plain_2.result.images).abs().max() < 1e-3
    finally:
        served.close()


# ------------------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def server_exports(digits_export, tmp_path_factory):
    """The demo server's export root: the digits export; a copy whose manifest records a failed validation
    (what `build` writes when validation fails); and a copy with 64 bytes flipped in model.onnx."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("demo_server") / "exports"
    for name in ("digits", "failed", "flipped"):
        shutil.copytree(digits_export, root / name)
    manifest_path = root / "failed" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["validation"]["passed"] = False
    manifest_path.write_text(json.dumps(manifest))
    graph = root / "flipped" / "model.onnx"
    data = bytearray(graph.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    graph.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def server(server_exports):
    """`python -m ditexport demo` in a subprocess on a free port; stopped at the end of the module."""
    tmp = server_exports.parent
    log_path = tmp / "server.log"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ditexport", "demo", "--port", str(port), "--exports", str(server_exports),
           "--max-steps", "300"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "demo: serving" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/", log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_server_listens_on_localhost_only(server):
    port = int(server[0].rstrip("/").rsplit(":", 1)[1])
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("needs Linux's /proc/net/tcp to read the listening address")
    listening = []
    for table in tables:
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                listening.append(address)
    assert listening == ["0100007F"], f"expected 127.0.0.1 only, got {listening}"  # little-endian hex


def test_gradio_client_gets_images_and_errors_do_not_stop_the_server(server, service, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    request = dict(model=BUILTIN_KEY, backend="torch (fp32)", class_index=5, blend_class=NO_BLEND, blend_weight=0.5,
                   num_images=4, guidance=4.0, sampler="ddpm", steps=12, seed=11)
    gallery, summary = client.predict(**request, api_name="/generate")
    assert len(gallery) == 4 and "**torch** (fp32)" in summary
    from PIL import Image

    served = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]
    # The same request computed here: the server sends these pixels (1 thread there, maybe 2 here).
    local = service.generate(GenerateRequest(**{k: v for k, v in request.items() if k != "model"}),
                             progress=False).images
    for a, b in zip(served, local):
        assert a.shape == (128, 128, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    with pytest.raises(AppError, match="steps must be between 1 and 300 on this server, got 5000"):
        client.predict(**{**request, "steps": 5000}, api_name="/generate")
    with pytest.raises(AppError, match=r"class must be in 0\.\.9 for .*, got 42"):
        client.predict(**{**request, "class_index": 42}, api_name="/generate")
    gallery, _ = client.predict(**{**request, "num_images": 2, "class_index": 1}, api_name="/generate")
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)


def _gallery_pixels(gallery) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]


def test_the_documented_one_shot_api_call_works_for_every_backend_here(server, service, tmp_path):
    """docs/demo.md's call, verbatim but for the model and backend: a fresh client (no page session whose
    menus were filled for the first model) asks for an export on onnxruntime."""
    from gradio_client import Client

    documented = dict(blend_class=-1, blend_weight=0.5, num_images=8, guidance=4.0, sampler="ddpm", steps=250,
                      seed=0)
    for model, backend in (("exports/digits", "onnxruntime (fp32)"), ("exports/digits", "torch (fp32)"),
                           (BUILTIN_KEY, "torch (fp32)")):
        gallery, summary = Client(server[0], verbose=False, download_files=str(tmp_path)).predict(
            model=model, backend=backend, class_index=3, **documented, api_name="/generate")
        assert len(gallery) == 8 and f"**{backend.split()[0]}** (fp32)" in summary and f"model: {model}" in summary
    # The export on ONNX Runtime draws what torch draws from the same seed (the images of the last call).
    local = service.generate(GenerateRequest(class_index=3, **documented), progress=False).images
    onnx = Client(server[0], verbose=False, download_files=str(tmp_path)).predict(
        model="exports/digits", backend="onnxruntime (fp32)", class_index=3, **documented, api_name="/generate")[0]
    for a, b in zip(_gallery_pixels(onnx), local):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_api_values_are_taken_as_advertised_and_fractions_refused(server, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False, download_files=str(tmp_path))
    advertised = {p["parameter_name"]: p["type"] for p in
                  client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]}
    assert advertised["class_index"]["type"] == "string"  # a string is what a client will send, then
    request = dict(model=BUILTIN_KEY, backend="torch (fp32)", blend_class=-1, blend_weight=0.5, num_images=2,
                   guidance=4.0, sampler="ddpm", steps=12, seed=5)
    as_text = _gallery_pixels(client.predict(**request, class_index="3", api_name="/generate")[0])
    as_int = _gallery_pixels(client.predict(**request, class_index=3, api_name="/generate")[0])
    assert all(np.array_equal(a, b) for a, b in zip(as_text, as_int))
    with pytest.raises(AppError, match=r"steps must be a whole number, got 2\.5"):
        client.predict(**{**request, "steps": 2.5}, class_index=3, api_name="/generate")


def test_failed_and_damaged_exports_are_not_served_and_rejections_log_no_traceback(server, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False, download_files=str(tmp_path))
    menu = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    offered = next(p for p in menu if p["parameter_name"] == "model")["type"]["enum"]
    assert "exports/digits" in offered and "exports/flipped" in offered and "exports/failed" not in offered
    request = dict(backend="onnxruntime (fp32)", class_index=3, blend_class=-1, blend_weight=0.5, num_images=2,
                   guidance=4.0, sampler="ddpm", steps=12, seed=5)
    with pytest.raises(AppError, match="model.onnx does not match its SHA-256.*rebuild with: python -m ditexport "
                                        "build --model digits --precision fp32 --export-dir .*flipped --force"):
        client.predict(model="exports/flipped", **request, api_name="/generate")
    with pytest.raises(AppError, match="unknown model 'exports/failed'"):
        client.predict(model="exports/failed", **request, api_name="/generate")
    with pytest.raises(AppError, match="model must be a string"):
        client.predict(model=5, **request, api_name="/generate")
    bad = [(dict(steps=5000), "steps must be between 1 and 300 on this server, got 5000"),
           (dict(class_index=42), r"class must be in 0\.\.9 for exports/digits, got 42"),
           (dict(sampler="euler"), "sampler must be one of ddpm, ddim, dpmpp-2m, got 'euler'"),
           (dict(seed=-1), "seed must be between 0 and 2147483647 on this server, got -1"),
           (dict(num_images=0.5), "number of images must be a whole number, got 0.5"),
           (dict(blend_weight=2.0, blend_class=1), r"blend must be between 0\.0 and 1\.0 on this server, got 2\.0"),
           (dict(backend="tensorrt (fp16)"), r"backend 'tensorrt \(fp16\)' cannot run exports/digits here; "
                                             r"available: torch \(fp32\), onnxruntime \(fp32\)"),
           # Values of the wrong type from the API: a message, not a Python error and a logged traceback.
           (dict(backend=["onnxruntime (fp32)"]), r"backend must be a string \(a menu choice\), got \['onnx"),
           (dict(sampler={"name": "ddpm"}), "sampler must be a string"),
           (dict(guidance=10**400), "guidance scale must be a number a float can hold"),
           (dict(steps=[12]), r"steps must be a number, got \[12\]")]
    for change, message in bad:
        with pytest.raises(AppError, match=message):
            client.predict(model="exports/digits", **{**request, **change}, api_name="/generate")
    # A NaN guidance never leaves the client (JSON has no NaN); the service's own refusal is tested in-process.
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        client.predict(model="exports/digits", **{**request, "guidance": float("nan")}, api_name="/generate")
    gallery, _ = client.predict(model="exports/digits", **request, api_name="/generate")  # still serving
    assert len(gallery) == 2
    log = server[1].read_text()
    assert "not offering" in log and "failed" in log  # one warning line for the failed export
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------------------- a real browser

def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


@pytest.mark.browser
def test_browser_generates_and_shows_images(server, tmp_path):
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # DITEXPORT_DEMO_SCREENSHOT=docs/demo.png keeps the demo's defaults (DPM-Solver++, 10 steps) for the README picture.
    screenshot_to = os.environ.get("DITEXPORT_DEMO_SCREENSHOT")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server[0], wait_until="networkidle")
            if not screenshot_to:
                page.get_by_label("Steps (1-300)").fill("25")
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#gallery img')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length >= 8", timeout=90_000)
            page.wait_for_function("() => document.querySelector('#summary').innerText.includes('ms per step')",
                                   timeout=30_000)
            shown = page.evaluate("() => [...document.querySelectorAll('#gallery img')]"
                                  ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth)")
            summary = page.inner_text("#summary")
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            if screenshot_to:
                page.screenshot(path=screenshot_to, full_page=True)
        finally:
            browser.close()
    # The gallery may also render a preview of one image; the grid alone holds the 8 samples.
    assert len(shown) >= 8 and all(w == 128 for w in shown)
    assert "torch" in summary and ("25 DPMPP-2M steps" in summary or screenshot_to)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
