"""Fixtures shared by several test modules."""
import os

import pytest
import torch

from ditexport.serving.sockets import free_loopback_port as free_port  # noqa: F401  (the servers tests start)

# The fault-injection tests' fixtures (`cli`, `system_tmp`) and helpers live in tests/fault_tools.py.
pytest_plugins = ["fault_tools"]


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """Verified export hashes are remembered in a directory of this test session, not in ~/.cache."""
    os.environ["DITEXPORT_CACHE_DIR"] = str(tmp_path_factory.mktemp("ditexport-cache"))


@pytest.fixture(scope="session")
def digits_export(tmp_path_factory):
    """One real `build` of the built-in digits model (fp32 graphs, validated: PASSED), shared by every module
    that needs a complete export. Copy it (shutil.copytree) before changing anything in it."""
    from ditexport.cli import main

    out = tmp_path_factory.mktemp("digits-export") / "digits"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["build", "--export-dir", str(out), "--precision", "fp32", "--sample-steps", "10"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a test module with one torch thread, restoring the count after.

    On the shared 2-core development machine a second torch thread waiting for a busy core made small-model
    tests 4-15x slower (a 100-sample digits test: 106 s with 2 threads, 23 s with 1); on an idle machine one
    thread costs little for matrices this small.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Every command sets torch's thread count (ditexport.threads); an in-process call must not leak it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def no_host_sync_after_first_step(steps):
    """A sampler `progress` wrapper: set-up may synchronise once; from the second step on, any host sync raises."""
    try:
        for i, step in enumerate(steps):
            if i == 1:
                torch.cuda.set_sync_debug_mode("error")
            yield step
    finally:
        torch.cuda.set_sync_debug_mode("default")


def concurrent_calls_match_lone_calls(backend, feeds, threads: int = 4) -> int:
    """Runs every feed through `backend` from `threads` threads at once (each thread in its own order) and
    asserts each result equals, bit for bit, the same feed run alone; returns the number of concurrent calls."""
    import threading

    lone = [backend(*feed) for feed in feeds]
    start = threading.Barrier(threads)
    results, errors = [], []

    def worker(k: int) -> None:
        try:
            start.wait()
            order = list(range(k, len(feeds))) + list(range(k))
            for i in order:
                results.append((i, backend(*feeds[i])))
        except BaseException as e:  # reported below: an exception in a thread would otherwise vanish
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors
    assert len(results) == threads * len(feeds)
    for i, out in results:
        assert out.shape == lone[i].shape and torch.equal(out.cpu(), lone[i].cpu()), f"feed {i} differs"
    return len(results)


def observe_chunks(backend, method: str) -> list[int]:
    """Wraps `backend.<method>` (the real one still runs) and returns the list the batch size of each call lands in."""
    sizes, real = [], getattr(backend, method)

    def counted(x, *rest):
        sizes.append(x.shape[0])
        return real(x, *rest)

    setattr(backend, method, counted)
    return sizes


def model_feeds(cfg, batches, device="cpu", seed=0):
    """(x, t, y) feeds of the given batch sizes, seeded, labels including the null class."""
    feeds = []
    for k, n in enumerate(batches):
        gen = torch.Generator().manual_seed(seed + k)
        x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        y = torch.randint(0, cfg.num_classes + 1, (n,), generator=gen)
        feeds.append((x.to(device), t.to(device), y.to(device)))
    return feeds


def tiny_vae(seed: int, latent_channels: int = 4, sample_size: int = 8):
    """A random diffusers AutoencoderKL small enough for tests: two blocks (8 and 16 channels), so images are twice
    the latents' side."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=sample_size)




def png_pixels(png_b64: str):
    """The pixels (numpy, as PIL reads them) of a base64 PNG, as the HTTP service returns its images."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.array(Image.open(io.BytesIO(base64.b64decode(png_b64))))


def pytest_terminal_summary(terminalreporter):
    """Prints how many fault cases tests/test_faults*.py tried (issue 10 asks for the count)."""
    import sys

    module = sys.modules.get("fault_tools")
    cases = getattr(module, "CASES_TRIED", None)
    if cases:
        terminalreporter.write_line(f"fault injection: {len(cases)} cases tried through the real CLI "
                                    f"({len(set(cases))} distinct)")
