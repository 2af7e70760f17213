"""Locust users against a running `python -m ditexport serve` (a load tool nobody here wrote; not a dependency:
`pip install locust`). One-image DDIM requests, each user sending its next when it has an answer and honouring
a 503's Retry-After; one user polls /healthz every second.

    locust -f benchmarks/locustfile_serve.py --host http://127.0.0.1:8000 --headless -u 1000 -r 200 -t 60s
"""
import json
import random
import time

from locust import FastHttpUser, constant, task


class ImageClient(FastHttpUser):
    weight = 1000
    wait_time = constant(0)
    network_timeout = connection_timeout = 120.0

    @task
    def image(self):
        body = json.dumps({"class_labels": [random.randrange(10)], "steps": 50, "sampler": "ddim",
                           "seed": random.randrange(2**31)})
        with self.client.post("/v1/images", data=body, headers={"Content-Type": "application/json"},
                              catch_response=True, name="/v1/images") as response:
            if response.status_code == 503:
                response.success()  # a refusal with Retry-After is the service working; counted apart below
                self.environment.events.request.fire(request_type="503", name="refused", response_time=0,
                                                     response_length=0, exception=None, context={})
                time.sleep(float(response.headers.get("Retry-After", "1")) * random.uniform(0.5, 1.5))
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}")


class HealthProbe(FastHttpUser):
    weight = 1
    fixed_count = 1
    wait_time = constant(1)

    @task
    def health(self):
        self.client.get("/healthz", name="/healthz")
