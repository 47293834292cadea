"""Host memory as the kernel counts it, and emulated smaller hosts (``max_ram_gib``, a cgroup v2 around the worker)."""

from __future__ import annotations

import pytest
import torch

from flux2bench import cgroup
from flux2bench.results import CaseResult
from flux2bench.trackers.memory import MemorySampler, MemoryTracker, read_io_counters
from flux2bench.units import GIB

from conftest import REPO


def test_each_phase_records_shared_memory_major_faults_and_disk_reads(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * (8 << 20))
    with MemorySampler(None) as sampler, MemoryTracker(sampler, "load", torch.device("cpu")) as tracker:
        weights.read_bytes()
    memory = tracker.result
    assert memory.host_shared_peak_gib.value is not None and "RssShmem" in memory.host_shared_peak_gib.method
    assert memory.major_faults.value >= 0 and "majflt" in memory.major_faults.method
    assert memory.disk_read_gib.value >= 0 and "read_bytes" in memory.disk_read_gib.method


def test_io_counters_are_read_from_proc():
    counters = read_io_counters()
    assert set(counters) <= {"major_faults", "disk_read_gib"} and all(v >= 0 for v in counters.values())


def test_records_of_earlier_versions_load_with_the_new_fields_unrecorded():
    import json

    committed = REPO / "reports" / "h100-20261126-111007" / "results"
    record = CaseResult.from_json(next(committed.glob("*.json")).read_text())
    memory = next(iter(record.memory.values()))
    assert memory.disk_read_gib.value is None and "not recorded" in memory.disk_read_gib.reason
    assert json.loads(record.to_json())  # and they serialise again


# --- the RAM cap --------------------------------------------------------------------------------------------------

def test_a_host_without_cgroup_v2_cannot_cap_ram(tmp_path):
    with pytest.raises(cgroup.CgroupUnavailable, match="no cgroup v2 hierarchy"):
        cgroup.create("case", GIB, root=tmp_path)


def test_a_cgroup_v2_without_the_memory_controller_cannot_cap_ram(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu io pids\n")
    with pytest.raises(cgroup.CgroupUnavailable, match="memory controller"):
        cgroup.create("case", GIB, root=tmp_path)


def test_a_capped_cgroup_gets_the_limit_no_swap_and_is_removed(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    capped = cgroup.create("case", 16 * GIB, root=tmp_path)
    assert (capped.path / "memory.max").read_text() == str(16 * GIB)
    (capped.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (capped.path / "memory.peak").write_text(str(15 * GIB))
    record = capped.record()
    assert (record["max_ram_gib"], record["oom_kills"], record["peak_gib"]) == (16.0, 1, 15.0)
    for name in ("memory.max", "memory.events", "memory.peak"):  # a real cgroup's files go with its directory
        (capped.path / name).unlink()
    capped.remove()
    assert not capped.path.exists()


def test_the_memory_controller_is_delegated_to_children_where_it_is_not_yet(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")  # a fresh VM: memory not yet given to children
    cgroup.create("case", GIB, root=tmp_path)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory"  # what the kernel is told to add


def test_a_capped_case_is_unsupported_with_the_reason_where_the_host_cannot_cap(run_scenario, monkeypatch, tmp_path):
    monkeypatch.setattr(cgroup, "ROOT", tmp_path)  # a host with cgroup v1 only
    monkeypatch.setattr(cgroup.create, "__defaults__", (tmp_path,))
    run = run_scenario("""
        blocks:
          capped: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0, max_ram_gib: 16}
    """, "capped")
    (result,) = run.results
    assert result.status == "unsupported"
    assert result.reason.startswith("max_ram_gib needs a cgroup v2: no cgroup v2 hierarchy")
    assert "ram=16GiB" in result.label
