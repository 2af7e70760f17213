"""The Ray Serve service on loopback, started once for the module on the digits export (onnxruntime)."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import free_port, png_pixels

pytest.importorskip("ray.serve", reason="the service needs Ray Serve: pip install 'ditexport[serve]'")

from ditexport.images import to_uint8  # noqa: E402
from ditexport.pipeline import Pipeline  # noqa: E402
from ditexport.sampler import SamplerConfig  # noqa: E402
from ditexport.backends.open import open_export_backend  # noqa: E402
from ditexport.limits import RequestLimits  # noqa: E402
from ditexport.serving.service import deploy, shutdown  # noqa: E402
from ditexport.serving.settings import ServeSettings, ServiceLimits  # noqa: E402

SAMPLERS = [dict(sampler="ddim"), dict(sampler="ddpm"), dict(sampler="dpmpp-2m"), dict(sampler="ddim", eta=0.5)]


@pytest.fixture(scope="module")
def served_export(digits_export, tmp_path_factory):
    """The digits export as `build --export-dir .../elsewhere` writes it: the manifest's `name` is the directory's,
    its `model` is digits (the service took its class names from the name, and refused the digits it advertised)."""
    import shutil

    path = tmp_path_factory.mktemp("served") / "elsewhere"
    shutil.copytree(digits_export, path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "name": "elsewhere"}))
    return path


@pytest.fixture(scope="module")
def service(served_export, one_torch_thread):
    port = free_port()
    settings = ServeSettings(export_dir=str(served_export), backend="onnxruntime", max_batch=8,
                             limits=RequestLimits(max_images=8, max_steps=200),
                             service=ServiceLimits(max_queue=2, max_running_images=16))
    seconds = deploy(settings, port=port)
    print(f"service started in {seconds:.1f} s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        shutdown()


def call(url, body=None, timeout=120):
    """(status, headers, JSON) of a GET (body None) or a POST of `body` (bytes or a JSON-able object)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_concurrent_requests_each_equal_their_lone_sample(service, digits_export):
    bodies = [{"class_labels": [i % 10, (3 * i + 1) % 10][: 1 + i % 2], "seed": 100 + i, "steps": 3 + i % 5,
               "guidance_scale": 1.0 if i % 3 == 0 else 2.0 + i / 8, **SAMPLERS[i % 4]} for i in range(16)]
    # The 2-request queue would refuse part of 16 at once; these go in waves the queue takes, 4 at a time.
    results = [None] * 16

    def post(i):
        for _ in range(50):  # a 503 here is the queue working; the client retries as Retry-After says
            status, headers, body = call(service + "/v1/images", bodies[i])
            if status != 503:
                results[i] = (status, body)
                return
            time.sleep(float(headers["Retry-After"]) / 10)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    backend = open_export_backend(digits_export, "onnxruntime", max_batch=8)
    pipeline = Pipeline(backend)
    for body, (status, answer) in zip(bodies, results):
        assert status == 200, answer
        assert answer["seed"] == body["seed"] and answer["steps"] == body["steps"]
        cfg = SamplerConfig(num_steps=body["steps"], method=body["sampler"], guidance_scale=body["guidance_scale"],
                            eta=body.get("eta", 0.0))
        lone = to_uint8(pipeline.run(body["class_labels"], seed=body["seed"], sampler_cfg=cfg, progress=False).images)
        got = np.stack([png_pixels(p).reshape(lone.shape[1:]) for p in answer["images"]])
        assert np.array_equal(got, lone), body


@pytest.mark.parametrize("body,field", [
    (b"{not json", "body"),
    ({"class_labels": ["seven"]}, "class_labels"),
    ({"class_labels": [10]}, "class_labels"),
    ({"class_labels": [1], "steps": 201}, "steps"),
    ({"class_labels": [1], "steps": 0}, "steps"),
    (b'{"class_labels": [1], "guidance_scale": NaN}', "guidance_scale"),
    ({"class_labels": [1], "sampler": "euler"}, "sampler"),
    ({"steps": 5}, "class_labels"),
])
def test_bad_requests_are_4xx_naming_the_field(service, body, field):
    status, _, answer = call(service + "/v1/images", body)
    assert status == 400 and answer["field"] == field, answer


def test_the_class_names_advertised_are_accepted(service):
    names = call(service + "/v1/models")[2]["models"][0]["class_names"]
    status, _, answer = call(service + "/v1/images", {"class_labels": [names[3], 1], "steps": 2, "guidance_scale": 1})
    assert status == 200 and answer["sampler"] == "ddpm" and answer["class_labels"] == [3, 1]


def test_a_full_queue_answers_503_with_retry_after_and_health_survives(service):
    body = {"class_labels": [1] * 8, "steps": 200, "sampler": "ddim"}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(call(service + "/v1/images", body)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = sorted(status for status, _, _ in answers)
    assert len(statuses) == 6 and 503 in statuses and 200 in statuses, statuses
    assert set(statuses) == {200, 503}
    refused = next(h for s, h, _ in answers if s == 503)
    assert int(refused["Retry-After"]) >= 1
    status, _, health = call(service + "/healthz")
    assert status == 200 and health["status"] == "ok"


def test_a_client_that_disconnects_frees_its_slots(service):
    """A client that hangs up mid-chain: Serve cancels its handler, which cancels the engine's future, and the
    engine drops the request at the next step instead of running its 200 steps."""
    import http.client

    _, _, before = call(service + "/healthz")
    host, port = service.removeprefix("http://").split(":")
    client = http.client.HTTPConnection(host, int(port), timeout=60)
    client.request("POST", "/v1/images", json.dumps({"class_labels": [1] * 8, "steps": 200, "sampler": "ddim"}))
    deadline = time.monotonic() + 60
    while call(service + "/healthz")[2]["running_images"] == 0:  # wait until the request runs
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    client.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    client.close()
    while (health := call(service + "/healthz")[2])["running_images"] > 0:
        assert time.monotonic() < deadline, "the request kept its slots"
        time.sleep(0.01)
    assert health["queue_depth"] == 0
    assert health["steps_run"] - before["steps_run"] < 200  # its chain was cut short


def test_models_describes_the_served_export(service, served_export):
    status, _, answer = call(service + "/v1/models")
    model = answer["models"][0]
    assert status == 200 and model["name"] == "elsewhere" and model["model"] == "digits"
    assert model["backend"] == "onnxruntime" and model["class_names"] == [str(i) for i in range(10)]
    assert model["precision"] == "fp32" and model["validation"]["passed"] is True
    assert model["export_dir"] == str(served_export)


def test_the_readme_curl_example_answers(service):
    """The README's `curl` line, sent as the same HTTP request to this module's service."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln.strip() for ln in readme.splitlines() if ln.strip().startswith("curl ") and "/v1/images" in ln)
    args = shlex.split(line)
    url, body = next(a for a in args if a.startswith("http")), args[args.index("-d") + 1]
    assert args[args.index("-X") + 1] == "POST" and re.fullmatch(r"http://127\.0\.0\.1:8000/v1/images", url)
    status, _, answer = call(service + "/v1/images", body.encode())
    sent = json.loads(body)
    assert status == 200 and len(answer["images"]) == len(sent["class_labels"])
    assert (answer["seed"], answer["steps"], answer["sampler"]) == (sent["seed"], sent["steps"], sent["sampler"])
    assert set(answer["timings"]) >= {"queued_s", "sampling_s", "total_s"}
    assert png_pixels(answer["images"][0]).shape[:2] == (8, 8)


def test_the_demo_remote_service_shows_the_services_images(service, digits_export):
    """`RemoteService.generate`, the demo's hook for a running service: its images are the service's pixels,
    which equal a local sample's; errors come back as one ServiceError naming the field."""
    from ditexport.demo_app import GenerateRequest, RemoteService
    from ditexport.serving.client import ImageClient, ServiceError

    remote = RemoteService(service, display_size=16)
    response = remote.generate(GenerateRequest(class_index=3, num_images=2, steps=4, sampler="ddim", guidance=2.0,
                                               seed=5))
    backend = open_export_backend(digits_export, "onnxruntime", max_batch=8)
    lone = Pipeline(backend).run([3, 3], seed=5, sampler_cfg=SamplerConfig(num_steps=4, method="ddim",
                                                                       guidance_scale=2.0), progress=False)
    assert np.array_equal(to_uint8(response.result.images), to_uint8(lone.images))
    assert response.images[0].shape == (16, 16, 3) and response.captions == ["3", "3"]
    assert ImageClient(service).health()["status"] == "ok"
    with pytest.raises(ServiceError) as refused:
        ImageClient(service).images([1], steps=5000)
    assert refused.value.status == 400 and refused.value.field == "steps"


def test_demo_with_server_shows_the_services_images_through_gradio(service, digits_export, tmp_path):
    """`demo --server URL`: the Gradio app runs over RemoteService; its one model and backend are the service's,
    the served gallery holds the service's pixels (equal to a local sample), a blend is refused with a message."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from PIL import Image

    from ditexport.demo_app import DemoInputError, GenerateRequest, RemoteService
    from ditexport.demo_app.service import displayable
    from ditexport.demo_app.ui import launch

    remote = RemoteService(service, display_size=16)
    assert remote.model_keys() == [f"service {service}"]
    assert remote.entry(remote.model_keys()[0]).backend_choices() == ["onnxruntime (fp32)"]
    assert remote.class_choices(remote.model_keys()[0]) == [(str(i), i) for i in range(10)]
    with pytest.raises(DemoInputError, match="blending two classes needs a local backend"):
        remote.generate(GenerateRequest(class_index=1, blend_class=2))

    app = launch(port=free_port(), server=service, warm_up=False, block=False)
    try:
        client = Client(app.local_url, verbose=False, download_files=str(tmp_path))
        request = dict(model=remote.model_keys()[0], backend="onnxruntime (fp32)", class_index=7, blend_class=-1,
                       blend_weight=0.5, num_images=2, guidance=4.0, sampler="dpmpp-2m", steps=5, seed=3)
        gallery, summary = client.predict(**request, api_name="/generate")
        with pytest.raises(AppError, match="blending two classes needs a local backend"):
            client.predict(**{**request, "blend_class": 2}, api_name="/generate")
    finally:
        app.close()
    backend = open_export_backend(digits_export, "onnxruntime", max_batch=8)
    lone = Pipeline(backend).run([7, 7], seed=3, sampler_cfg=SamplerConfig(num_steps=5, method="dpmpp-2m"),
                             progress=False)
    shown = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]
    assert len(shown) == 2 and f"2 images from {service}" in summary
    for got, want in zip(shown, displayable(lone.images, 128)):
        assert np.array_equal(got, want)
