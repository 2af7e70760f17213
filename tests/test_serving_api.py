"""The HTTP API without Ray: every bad body a 400 naming its field before any work, the body limit, a real fault
a JSON 500 whose request id is in the log, the request timeout, and Retry-After from the measured drain rate."""
import asyncio
import json
import logging
import time

import pytest
import torch

from ditexport.backends.open import open_backend
from ditexport.class_names import class_names
from ditexport.limits import RequestLimits
from ditexport.serving.api import ImageAPI, parse_image_request, served_class_names
from ditexport.serving.engine import BatchingEngine, QueueFullError, RequestError
from ditexport.serving.settings import ServiceLimits, body_limit, largest_valid_body, retry_after_s

DIGITS = [str(i) for i in range(10)]


@pytest.mark.parametrize("body,field", [
    # DDIM's eta outside [0, 1] ran the whole chain and failed at PNG encoding (a 500): refused as the CLI does.
    (b'{"class_labels": [1], "sampler": "ddim", "eta": 1.5}', "eta"),
    (b'{"class_labels": [1], "eta": 10}', "eta"),
    (b'{"class_labels": [1], "eta": 1e308}', "eta"),
    (b'{"class_labels": [1], "eta": -1e308}', "eta"),
    # Integers a float cannot hold raised OverflowError (a 500).
    (b'{"class_labels": [1], "guidance_scale": 1' + b"0" * 400 + b"}", "guidance_scale"),
    (b'{"class_labels": [1], "eta": 1' + b"0" * 400 + b"}", "eta"),
    (b'{"class_labels": [1], "steps": 1' + b"0" * 400 + b"}", "steps"),
    (b'{"class_labels": [1], "seed": 1' + b"0" * 5000 + b"}", "seed"),
    (b'{"class_labels": [1' + b"0" * 400 + b"]}", "class_labels"),
    # Nesting 100,000 deep raised RecursionError in json.loads (a 500).
    (b"[" * 100_000 + b"]" * 100_000, "body"),
    (b'{"class_labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    (b'{"class_labels": [[1]]}', "body"),
    (b'{"class_labels": [1], "sampler": ["ddim"]}', "sampler"),
    (b'{"class_labels": [1], "sampler": {"a": 1}}', "sampler"),
    (b'{"class_labels": [' + b"1," * 16 + b"1]}", "class_labels"),
    (b'{"class_labels": []}', "class_labels"),
    (b'{"class_labels": [1], "steps": 1.0}', "steps"),
    (b'{"class_labels": [1], "guidance_scale": "4"}', "guidance_scale"),
    (b'{"class_labels": [1], "x": 1}', "x"),
    (b"\xff", "body"),
])
def test_every_bad_body_is_a_request_error_naming_its_field(backend, body, field):
    """Refused by parsing or by the engine's admission check, both before any step runs."""
    engine = BatchingEngine(backend)
    with pytest.raises(RequestError) as refused:
        engine.submit(parse_image_request(body, 10, DIGITS, RequestLimits()))
    assert refused.value.field == field, str(refused.value)
    assert engine.queue_depth == 0 and engine.steps_run == 0


def test_the_depth_check_is_linear_and_strings_do_not_count():
    """Brackets inside strings are text, not nesting; a deep body is refused in well under a second."""
    request = parse_image_request(b'{"class_labels": ["3", 1], "sampler": "ddim"}', 10, DIGITS)
    assert request.labels == [3, 1]
    with pytest.raises(RequestError, match="unknown class"):
        parse_image_request(b'{"class_labels": ["[[[{{{"]}', 10, DIGITS)
    start = time.perf_counter()
    with pytest.raises(RequestError, match="nests deeper"):
        parse_image_request(b"[" * 2_000_000 + b"]" * 2_000_000, 10, DIGITS)
    assert time.perf_counter() - start < 1.0


def test_the_body_limit_holds_the_largest_valid_request():
    """Sized from the largest valid request (ImageNet's longest name in every label, pretty-printed): that body
    parses, and the limit leaves room for 4x its size."""
    names = class_names(1000)
    largest = largest_valid_body(RequestLimits(), names)
    request = parse_image_request(largest.replace(b"-1.2345678901234567e-300", b"4.0", 1)
                                  .replace(b"-9223372036854775808", b"1"), 1000, names, RequestLimits())
    assert len(request.labels) == RequestLimits.max_images
    limit = body_limit(ServiceLimits(), RequestLimits(), names)
    assert 4 * len(largest) <= limit < 4 * len(largest) + 1024
    assert body_limit(ServiceLimits(max_body_bytes=123), RequestLimits(), names) == 123


def test_retry_after_follows_the_drain_rate():
    assert retry_after_s(32, None) == 1  # nothing measured yet
    assert retry_after_s(32, 8.0) == 4 and retry_after_s(33, 8.0) == 5
    assert retry_after_s(1000, 1.0) == 60 and retry_after_s(0, 100.0) == 1


@pytest.fixture(scope="module")
def backend():
    from ditexport.zoo import load_builtin

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield open_backend("torch", model=load_builtin("digits"), device="cpu")
    torch.set_num_threads(threads)


async def chunks_of(body: bytes, size: int = 7):
    for i in range(0, len(body), size):
        yield body[i:i + size]


def answer(api: ImageAPI, body: bytes, content_length: str | None = None, request_id: str | None = None):
    return asyncio.run(api.images(chunks_of(body), content_length, request_id))


def test_images_api_answers_refuses_and_limits(backend):
    engine = BatchingEngine(backend, max_queue=1, max_running_images=4)
    engine.start()
    try:
        api = ImageAPI(engine, DIGITS, RequestLimits(), ServiceLimits(), body_limit=200)
        status, ok, _ = answer(api, b'{"class_labels": ["3"], "steps": 3, "sampler": "ddim"}', None, "abc")
        assert status == 200 and ok["class_labels"] == [3] and ok["request_id"] == "abc" and len(ok["images"]) == 1
        status, refused, _ = answer(api, b'{"class_labels": [1], "eta": 2}')
        assert status == 400 and refused["field"] == "eta" and engine.steps_run == 3  # refused before any step
        status, refused, _ = answer(api, b" " * 201 + b"{}")
        assert status == 413 and refused["field"] == "body"  # while streaming, without Content-Length
        status, refused, _ = answer(api, b"{}", content_length="10000000000")
        assert status == 413  # by Content-Length, before a byte is read
    finally:
        engine.stop()


def test_a_real_fault_is_a_json_500_whose_request_id_is_logged(backend, caplog):
    """A backend that fails (a GPU fault, a corrupt engine) fails its requests, not the engine: the client gets
    a JSON 500 naming a request id, and the log holds that id with the traceback."""
    class FailingBackend:
        def __init__(self, inner):
            self.inner, self.config, self.device, self.calls = inner, inner.config, inner.device, 0

        def __call__(self, x, t, y):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return self.inner(x, t, y)

    engine = BatchingEngine(FailingBackend(backend), max_queue=4, max_running_images=4)
    engine.start()
    try:
        api = ImageAPI(engine, DIGITS, RequestLimits(), ServiceLimits(), body_limit=4096)
        with caplog.at_level(logging.ERROR, logger="ditexport.serving"):
            status, fault, _ = answer(api, b'{"class_labels": [2], "steps": 4}', None, "req-42")
        assert status == 500 and fault["request_id"] == "req-42" and "req-42" in fault["error"]
        assert any("req-42" in r.getMessage() and r.exc_info for r in caplog.records)
        status, ok, _ = answer(api, b'{"class_labels": [2], "steps": 4}')  # the engine still serves
        assert status == 200
    finally:
        engine.stop()


def test_a_request_past_its_timeout_is_cancelled_and_answered_503(backend):
    engine = BatchingEngine(backend, max_queue=4, max_running_images=4)
    engine.start()
    try:
        api = ImageAPI(engine, DIGITS, RequestLimits(), ServiceLimits(request_timeout_s=0.2), body_limit=4096)
        status, late, headers = answer(api, b'{"class_labels": [1, 2, 3, 4], "steps": 1000, "sampler": "ddim"}')
        assert status == 503 and "did not finish within 0.2 s" in late["error"] and int(headers["Retry-After"]) >= 1
        deadline = time.monotonic() + 10
        while engine.running_images or engine.queue_depth:  # its slots are freed at the next step boundary
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.steps_run < 1000
    finally:
        engine.stop()


def test_the_engine_estimates_retry_after_from_its_drain_rate(backend):
    """A full queue answers Retry-After = the waiting requests over the measured rate of finished requests."""
    engine = BatchingEngine(backend, max_queue=4, max_running_images=1)
    for seed in range(4):
        engine.submit(parse_image_request(json.dumps({"class_labels": [1], "steps": 2, "seed": seed}).encode(),
                                          10, DIGITS))
    engine.run_until_idle()
    rate = engine.drain_per_s()
    assert rate is not None and rate > 0
    request = parse_image_request(b'{"class_labels": [1], "steps": 2}', 10, DIGITS)
    for _ in range(4):
        engine.submit(request)
    with pytest.raises(QueueFullError) as full:
        engine.submit(request)
    assert full.value.retry_after_s == retry_after_s(4, engine.drain_per_s()) >= 1
    now = time.perf_counter()
    engine._finished_at.clear()
    engine._finished_at.extend([now - 6, now - 4, now - 2])  # one request finished every 2 s
    assert engine.drain_per_s() == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(QueueFullError) as full:
        engine.submit(request)
    assert full.value.retry_after_s == 8  # 4 waiting at 0.5 per s
    engine._finished_at.clear()
    engine._finished_at.extend([0.0, 10.0])  # one request every 10 s, long ago: nothing measured in the window
    assert engine.retry_after_s() == 1


def test_served_class_names_follow_the_model_not_the_directory():
    """A digits export built into a directory not named `digits` accepts the digit names it advertises."""
    manifest = {"name": "my-export", "model": "digits", "config": {"num_classes": 10}}
    assert served_class_names(manifest, 10) == DIGITS


def test_a_request_naming_another_model_is_answered_by_its_application(backend):
    """`model` names an application (GET /v1/models): this one's runs here, another's goes to `route` with the raw
    body (on a cluster: that application's replica, through Ray), none at all is a 400 naming the field."""
    engine = BatchingEngine(backend, max_queue=4, max_running_images=4)
    engine.start()
    routed = []

    async def route(model, body, request_id):
        routed.append((model, body, request_id))
        return 200, {"images": [], "model": model}, {}

    try:
        api = ImageAPI(engine, DIGITS, RequestLimits(), ServiceLimits(), body_limit=4096, model="digits",
                       route=route)
        status, ok, _ = answer(api, b'{"class_labels": [3], "steps": 2, "model": "digits"}', None, "r1")
        assert status == 200 and ok["model"] == "digits" and len(ok["images"]) == 1 and not routed
        body = b'{"class_labels": ["a class only the other model has"], "model": "imagenet"}'
        status, other, _ = answer(api, body, None, "r2")
        assert (status, other["model"]) == (200, "imagenet") and routed == [("imagenet", body, "r2")]
        status, refused, _ = asyncio.run(api.images(chunks_of(body), None, "r3", routed=True))  # no second hop
        assert status == 400 and refused["field"] == "model" and len(routed) == 1
        status, refused, _ = answer(api, b'{"class_labels": [3], "model": 7}')
        assert status == 400 and refused["field"] == "model"
        alone = ImageAPI(engine, DIGITS, RequestLimits(), ServiceLimits(), body_limit=4096, model="digits")
        status, refused, _ = answer(alone, b'{"class_labels": [3], "model": "imagenet"}')
        assert status == 400 and refused["field"] == "model" and "serves 'digits'" in refused["error"]
    finally:
        engine.stop()
