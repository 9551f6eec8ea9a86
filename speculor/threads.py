"""How many threads torch uses on the CPU, chosen so that a busy machine does not make decoding collapse.

torch starts one intra-op thread per core, and its threads meet at a barrier after every operation. When another
process holds one of those cores, every operation waits for the thread that lost its core, and speculative decoding,
which runs hundreds of small operations per token, slows down twenty-fold: on two cores with one busy-loop process,
the shipped pair decoded at 4–12 tokens/s with torch's two threads against 140–170 with one (benchmarks/RESULTS.md,
"CPU threads on a busy machine"). So the default counts only the cores nothing else is busy on:

    threads = physical cores this process may use − cores other work keeps busy  (at least 1)

where the busy cores are the tasks runnable on the machine right now besides this one (Linux's `procs_running`,
the median of a few samples 10 ms apart), or the 1-minute load average where that count is not available. The load
average is only the fallback because it lags: it takes a minute to notice a new busy process, and it still counts
the previous `speculor` command's own threads for a minute after it ended, so back-to-back runs on an idle machine
would halve their threads. Erring towards fewer threads is cheap (on an idle machine one thread too few costs a
fraction of a core) and erring towards more is not.

An explicit count (`--threads`, `threads=`) or an `OMP_NUM_THREADS` set in the environment always wins, and an
explicit count stays in force for the process: a later automatic choice (a `SpeculativeDecoder` built with its
default `threads="auto"` after a command set `--threads`) keeps it. Only the CPU is affected: on a GPU, torch's CPU
threads are left alone.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from speculor.errors import SpeculorError

CPU_TOPOLOGY = Path("/sys/devices/system/cpu")
CGROUP_CPU_LIMIT = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")
RUNNABLE_SAMPLES = 5
RUNNABLE_SAMPLE_SECONDS = 0.01
# The count last given explicitly to `use_cpu_threads` in this process, which automatic choices keep.
_explicit_threads: int | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count for CPU work and what it was chosen from, for logs and benchmark records."""

    threads: int
    usable_cores: int
    busy_cores: float
    source: str  # "argument", "OMP_NUM_THREADS" or "free cores"

    def describe(self) -> str:
        if self.source == "free cores":
            return (
                f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} "
                f"({self.usable_cores} cores, {self.busy_cores:.1f} busy with other work)"
            )
        return f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} (from {self.source})"


def allowed_cpus() -> set[int]:
    """Logical CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int]) -> int:
    """Distinct physical cores among `cpus`: hyper-threads share a core's arithmetic units, so a second thread on
    one only adds another barrier to wait at. Without Linux's topology files, every logical CPU counts as a core."""
    cores = set()
    for cpu in cpus:
        topology = CPU_TOPOLOGY / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores)


def cgroup_cpu_limit() -> int | None:
    """The CPU quota of this container in whole CPUs (cgroup v2 `cpu.max`), or None when there is none. A quota
    throttles a process that runs more threads than it allows, which stalls the barriers just as a busy core does."""
    try:
        quota, period = CGROUP_CPU_LIMIT.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def runnable_tasks_besides_this_one() -> float | None:
    """Tasks runnable on the whole machine besides this process's reading thread: the median of a few samples of
    Linux's `procs_running`, since one sample catches short bursts. None where /proc/stat does not say."""
    samples = []
    for sample in range(RUNNABLE_SAMPLES):
        if sample:
            time.sleep(RUNNABLE_SAMPLE_SECONDS)
        try:
            line = next(line for line in PROC_STAT.read_text().splitlines() if line.startswith("procs_running "))
            samples.append(max(0, int(line.split()[1]) - 1))
        except (OSError, ValueError, StopIteration):
            return None
    return float(statistics.median(samples))


def usable_cores() -> int:
    """Physical cores this process may use: its affinity mask, capped by a container's CPU quota."""
    cores = physical_cores(allowed_cpus())
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit is not None else cores


def busy_cores() -> float:
    """Cores other work keeps busy: the tasks runnable right now, else the 1-minute load average, else none."""
    running = runnable_tasks_besides_this_one()
    if running is not None:
        return running
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def choose_cpu_threads(threads: int | None = None) -> ThreadChoice:
    """The thread count to use: `threads` when given, else `OMP_NUM_THREADS` when set, else the free cores."""
    cores = usable_cores()
    if threads is not None:
        if threads < 1:
            raise SpeculorError(f"threads must be at least 1, got {threads}")
        return ThreadChoice(threads, cores, 0.0, "argument")
    from_environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_environment.isdigit() and int(from_environment) >= 1:
        return ThreadChoice(int(from_environment), cores, 0.0, "OMP_NUM_THREADS")
    busy = busy_cores()
    return ThreadChoice(max(1, cores - round(busy)), cores, busy, "free cores")


def use_cpu_threads(threads: int | None, device: object) -> ThreadChoice | None:
    """Set torch's CPU thread count for work on `device` (a torch.device, 'cpu', 'cuda:N' or None for the default
    device) and return the choice; on a GPU, leave torch's threads alone and return None. `threads` None chooses
    automatically, keeping a count given explicitly earlier in this process. Call it before the models load, so the
    count is settled before any work starts."""
    import torch

    from speculor.loading import resolve_device

    global _explicit_threads
    if resolve_device(device).type != "cpu":
        if threads is not None and threads < 1:
            raise SpeculorError(f"threads must be at least 1, got {threads}")
        return None
    choice = choose_cpu_threads(threads if threads is not None else _explicit_threads)
    if threads is not None:
        _explicit_threads = threads
    torch.set_num_threads(choice.threads)
    return choice


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads on the CPU (default: OMP_NUM_THREADS if set, else the physical cores no other process "
        "is busy on; more threads than free cores make every step wait for the thread that lost its core)",
    )
