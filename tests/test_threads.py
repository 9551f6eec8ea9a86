"""speculor.threads: the CPU thread count counts only free cores, explicit settings win, and only the CPU is touched."""

from __future__ import annotations

import pytest
import torch

from speculor import threads
from speculor.errors import SpeculorError


@pytest.fixture
def machine(monkeypatch):
    """A pretend machine: set `cores` and `busy`; OMP_NUM_THREADS unset."""
    state = {"cores": 2, "busy": 0.0}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_explicit_threads", None)
    monkeypatch.setattr(threads, "usable_cores", lambda: state["cores"])
    monkeypatch.setattr(threads, "busy_cores", lambda: state["busy"])
    return state


@pytest.mark.parametrize(
    ("cores", "busy", "expected"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.6, 1), (2, 5.0, 1), (16, 3.2, 13), (1, 0.0, 1)],
)
def test_default_counts_the_cores_nothing_else_is_busy_on(machine, cores, busy, expected):
    machine.update(cores=cores, busy=busy)
    choice = threads.choose_cpu_threads()
    assert (choice.threads, choice.source) == (expected, "free cores")
    assert f"{busy:.1f} busy" in choice.describe()


def test_an_explicit_count_and_then_omp_num_threads_win(machine, monkeypatch):
    machine.update(cores=2, busy=5.0)
    assert threads.choose_cpu_threads(3).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.choose_cpu_threads().threads == 4
    assert threads.choose_cpu_threads(2).threads == 2
    assert "from OMP_NUM_THREADS" in threads.choose_cpu_threads().describe()
    with pytest.raises(SpeculorError, match="threads must be at least 1"):
        threads.choose_cpu_threads(0)


def test_use_cpu_threads_sets_torch_on_the_cpu_only(machine):
    machine.update(cores=2, busy=1.0)
    before = torch.get_num_threads()
    try:
        assert threads.use_cpu_threads(None, "cpu").threads == torch.get_num_threads() == 1
        assert threads.use_cpu_threads(2, torch.device("cpu")).threads == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    if not torch.cuda.is_available():
        with pytest.raises(SpeculorError, match="CUDA is not available"):
            threads.use_cpu_threads(None, "cuda")


def test_container_quota_is_read_in_whole_cpus(tmp_path, monkeypatch):
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "CGROUP_CPU_LIMIT", limit)
    assert threads.cgroup_cpu_limit() is None  # no file: no quota
    for text, expected in (("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000", 1)):
        limit.write_text(text)
        assert threads.cgroup_cpu_limit() == expected


def test_hyper_threads_of_one_core_count_once(tmp_path, monkeypatch):
    for cpu, core in ((0, 0), (1, 0), (2, 1), (3, 1)):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(threads, "CPU_TOPOLOGY", tmp_path)
    assert threads.physical_cores({0, 1, 2, 3}) == 2
    assert threads.physical_cores({0, 1}) == 1
    assert threads.physical_cores({0, 7}) == 2  # no topology for cpu7: every logical CPU counts


def test_busy_cores_count_runnable_tasks_and_fall_back_to_the_load_average(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    monkeypatch.setattr(threads, "PROC_STAT", stat)
    monkeypatch.setattr(threads, "RUNNABLE_SAMPLE_SECONDS", 0.0)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    assert threads.runnable_tasks_besides_this_one() == threads.busy_cores() == 2.0
    monkeypatch.setattr(threads, "PROC_STAT", tmp_path / "missing")
    assert threads.runnable_tasks_besides_this_one() is None
    assert threads.busy_cores() == 5.0


def test_the_python_api_sets_cpu_threads_on_request(llama_pair):
    from speculor import SpeculativeDecoder

    before = torch.get_num_threads()
    try:
        SpeculativeDecoder(llama_pair[0], device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(SpeculorError, match="threads"):
            SpeculativeDecoder(llama_pair[0], device="cpu", threads="many")
    finally:
        torch.set_num_threads(before)


def test_the_python_api_picks_free_cores_by_default_and_none_leaves_torch_alone(llama_pair, machine):
    """A decoder built with no `threads` must not keep torch's one-thread-per-core default: on a shared machine
    that collapses decoding, and an API user cannot be expected to know it."""
    from speculor import SpeculativeDecoder

    machine.update(cores=3, busy=1.0)
    before = torch.get_num_threads()
    try:
        SpeculativeDecoder(llama_pair[0], device="cpu")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)
        SpeculativeDecoder(llama_pair[0], device="cpu", threads=None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_an_explicit_count_outlives_later_automatic_choices(machine):
    """`speculor generate --threads 1` sets the count and then builds a decoder with threads="auto": the count the
    user gave must stay."""
    machine.update(cores=2, busy=0.0)
    before = torch.get_num_threads()
    try:
        threads.use_cpu_threads(1, "cpu")
        choice = threads.use_cpu_threads(None, "cpu")
        assert (choice.threads, choice.source, torch.get_num_threads()) == (1, "argument", 1)
    finally:
        torch.set_num_threads(before)
