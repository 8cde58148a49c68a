"""Start a test function in 2 CPU processes as ``torchrun`` does (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT in the environment; ``accelerate`` then sets up gloo). Used by the distributed tests."""

import os
import socket
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# A guard against a hung child (a deadlocked collective, a stuck kernel), not a speed limit: on a busy 2-core machine
# a launch that takes a minute alone can take several, so the limit is generous (seconds; override with the
# environment variable SIMNPO_TEST_HANG_TIMEOUT).
HANG_TIMEOUT = float(os.environ.get("SIMNPO_TEST_HANG_TIMEOUT", "1800"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(module: str, function: str, *args: str, timeout: float = HANG_TIMEOUT) -> list[str]:
    """Run ``<module>.<function>(*args)`` (a test module's function) in 2 processes; their outputs, or fail with them.

    A port taken by another program between :func:`free_port` and gloo's bind is retried once on a new port.
    """
    script = (f"import sys; sys.path[:0] = [{ROOT!r}, {TESTS!r}]; "
              f"from {module} import {function} as run; run(*{list(args)!r}); "
              "from llm.runtime import end_distributed; end_distributed()")  # no Gloo teardown abort at exit
    for attempt in range(2):
        environment = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                           OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
        processes = [subprocess.Popen([sys.executable, "-c", script],
                                      env=dict(environment, RANK=str(r), LOCAL_RANK=str(r)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        outputs = []
        try:
            for process in processes:
                outputs.append(process.communicate(timeout=timeout)[0])
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
        failed = [text for process, text in zip(processes, outputs) if process.returncode != 0]
        if not failed:
            return outputs
        if attempt == 0 and any("address already in use" in text.lower() for text in failed):
            continue
        pytest.fail("a process failed:\n" + "\n----\n".join(text[-3000:] for text in failed))
