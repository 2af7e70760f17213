"""Fixtures shared by several test modules."""
import os

import pytest
import torch

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


def no_host_sync_after_first_step(steps):
    """A sampler `progress` wrapper: set-up may synchronise once; from the second step on, any host sync raises."""
    try:
        for i, step in enumerate(steps):
            if i == 1:
                torch.cuda.set_sync_debug_mode("error")
            yield step
    finally:
        torch.cuda.set_sync_debug_mode("default")


def pytest_terminal_summary(terminalreporter):
    """Prints how many fault cases tests/test_faults*.py tried (issue 10 asks for the count)."""
    import sys

    module = sys.modules.get("fault_tools")
    cases = getattr(module, "CASES_TRIED", None)
    if cases:
        terminalreporter.write_line(f"fault injection: {len(cases)} cases tried through the real CLI "
                                    f"({len(set(cases))} distinct)")
