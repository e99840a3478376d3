import os
import subprocess
import sys

from rlhf_fast.pipeline.threads import available_cpus, choose_threads


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


def test_importing_the_pipeline_asks_openmp_to_wait_passively():
    code = (
        "import os, sys; import rlhf_fast.pipeline; "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "True"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice stands
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "ACTIVE"
