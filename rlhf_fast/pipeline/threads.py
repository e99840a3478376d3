"""CPU threads for a run on a machine other processes may be using.

Two things make a busy machine far slower than its share of the cores explains (the demo's SFT fell from 21
to 0.7 it/s with one of two cores taken by another process):

- more intra-op threads than free cores: a tiny model's step is hundreds of small parallel regions, and each
  one waits for its slowest thread, which waits for a core;
- OpenMP's default wait: a GNU OpenMP thread waiting for work spins 300,000 times before it sleeps, taking
  the cores the other processes need (and which our own waiting threads then wait for).

Waiting passively (OMP_WAIT_POLICY=PASSIVE: sleep at once) removes the second, but then every one of those
parallel regions starts by waking a sleeping thread: on an idle machine the demo's tiny-model training step
takes 2.1x as long on two threads as with spinning, longer than on one (bench/bench_wait_policy.py). So the
demo uses the cores free when it starts (`free_cores`; one when the machine is full), runs stages that can
run side by side on one thread each (`rlhf_fast.pipeline.parallel`: a one-thread step has no parallel region
to wait in), and bounds the spinning of the stages that run on several: long enough to bridge the gaps
between one step's parallel regions, short enough that a waiting thread soon gives up its core
(`bound_openmp_spinning`). GNU OpenMP (torch's on Linux) reads GOMP_SPINCOUNT; LLVM and
Intel OpenMP read KMP_BLOCKTIME, set to 1 ms (not measured: the torch measured here uses GNU OpenMP). OpenMP
reads them when it starts, i.e. when torch is first imported: `bound_openmp_spinning` must run before that
(the `rlhf_fast.pipeline` package calls it on import) and says whether it was in time.
"""

from __future__ import annotations

import math
import os
import sys
import time

WAIT_POLICY = "OMP_WAIT_POLICY"
# Spins of a waiting thread before it sleeps. bench/bench_wait_policy.py, the demo's training steps on two
# threads against GNU OpenMP's default: 3,000 spins cost 1.08x (tiny) and 1.13x (small) on an idle machine and
# 2.9x / 2.5x with a core taken (10,000: 1.02x / 1.07x and 5.0x / 3.6x; passive: 2.1x / 1.6x and 1.8x / 2.0x).
SPIN_BOUNDS = {
    "GOMP_SPINCOUNT": "3000",  # GNU OpenMP: spins
    "KMP_BLOCKTIME": "1",  # LLVM / Intel OpenMP: milliseconds, the shortest bound above zero (zero: passive)
}
WAIT_VARIABLES = (WAIT_POLICY, *SPIN_BOUNDS)  # any of them set by the user: their choice stands


def bound_openmp_spinning() -> bool:
    """Bounds how long a waiting OpenMP thread spins before it sleeps (`SPIN_BOUNDS`), unless the user set any
    of `WAIT_VARIABLES`. True when it takes effect (torch, and so OpenMP, not yet loaded) or the user's choice
    stands; False when OpenMP started already."""
    if any(name in os.environ for name in WAIT_VARIABLES):
        return True
    os.environ.update(SPIN_BOUNDS)
    return "torch" not in sys.modules


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one), at most os.cpu_count()."""
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    return max(1, count)


def cores_busy_now(seconds: float = 0.5) -> float | None:
    """How many cores are busy right now (all processes'; the caller sleeps meanwhile): the busy share of the
    machine's CPU time over `seconds`, from Linux's /proc/stat (time taken by the hypervisor counts as busy).
    None where there is no /proc/stat.

    The 1-minute load average lags: right after `scripts/install.sh` compiled the extension it still counts
    the compiler on both cores of an idle machine."""

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            # cpu  user nice system idle iowait irq softirq steal ...
            fields = [int(value) for value in stat.readline().split()[1:9]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(seconds)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total_before:
        return None
    return (os.cpu_count() or 1) * (busy_after - busy_before) / (total_after - total_before)


def free_cores() -> int:
    """The cores free for a run that starts now (`choose_threads` with the cores busy right now, or with the
    load average where that cannot be measured)."""
    busy = cores_busy_now()
    return choose_threads(load=busy) if busy is not None else choose_threads(own_threads=1)


def choose_threads(cpus: int | None = None, load: float | None = None, own_threads: int = 0) -> int:
    """The cores free for a run: those not taken by other processes, at least 1, at most `cpus`.

    load: cores in use (`cores_busy_now`; the 1-minute load average, read from the OS, when None);
    own_threads: threads of this process that count in that load, subtracted as its own share.
    """
    cpus = available_cpus() if cpus is None else max(1, int(cpus))
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: assume the machine is ours
            load = 0.0
    others = max(0.0, load - own_threads)
    free = cpus - others
    return max(1, min(cpus, math.floor(free + 0.5)))
