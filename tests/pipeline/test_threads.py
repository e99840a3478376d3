import os
import subprocess
import sys
import time

import pytest

from rlhf_fast.pipeline.threads import (
    WAIT_VARIABLES,
    available_cpus,
    choose_threads,
    cores_busy_now,
    free_cores,
)


def test_threads_follow_the_free_cores():
    assert choose_threads(cpus=2, load=0.0) == 2
    assert choose_threads(cpus=2, load=1.0) == 1  # one core taken by another process
    assert choose_threads(cpus=2, load=9.0) == 1  # never fewer than one
    assert choose_threads(cpus=16, load=4.2) == 12
    # This process's own threads are part of the load average, not someone else's.
    assert choose_threads(cpus=2, load=2.0, own_threads=2) == 2
    assert (
        choose_threads(cpus=4, load=0.0) <= 4 and 1 <= choose_threads() <= available_cpus() <= os.cpu_count()
    )


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measures through Linux's /proc/stat")
def test_the_cores_busy_now_count_a_process_that_keeps_one_busy():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = cores_busy_now(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.8 <= busy <= os.cpu_count() + 0.01
    assert 1 <= free_cores() <= available_cpus()


def test_importing_the_pipeline_bounds_openmp_spinning_before_torch_loads():
    code = (
        "import os, sys; import rlhf_fast.pipeline; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('KMP_BLOCKTIME'), "
        "os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}

    def run(**extra):
        out = subprocess.run(
            [sys.executable, "-c", code], env=env | extra, capture_output=True, text=True, check=True
        )
        return out.stdout.split()

    assert run() == ["3000", "1", "None", "True"]
    # The user's choice of any of the three stands, and nothing else is added beside it.
    assert run(OMP_WAIT_POLICY="PASSIVE") == ["None", "None", "PASSIVE", "True"]
    assert run(GOMP_SPINCOUNT="100") == ["100", "None", "None", "True"]
    assert run(KMP_BLOCKTIME="0") == ["None", "0", "None", "True"]
