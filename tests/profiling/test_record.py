"""The profile as a record stores it: numbers validated where they are made and where they are read back, parts that
add up to their whole, files inside the run directory, and records without a profile unchanged."""

from __future__ import annotations

import json

import pytest

from flux2bench.profiling.record import MemoryPart, PeakMemory, Profile, StepCategory, StepTime
from flux2bench.results import CaseResult
from records import result


def peak_memory(**changes) -> PeakMemory:
    parts = [MemoryPart("weights: transformer bfloat16", "weights", 6.0, "test"),
             MemoryPart("activations and temporaries (allocated during the call)", "allocated", 3.0, "test"),
             MemoryPart("outside the allocator (CUDA context, library workspaces)", "outside", 1.0, "test")]
    values = dict(total_gib=10.0, total_basis="test", allocated_peak_gib=9.0, reserved_peak_gib=9.0,
                  replayed_allocated_peak_gib=9.0, replayed_reserved_gib=9.0, device_peak_gib=10.0, parts=parts,
                  snapshot="profiles/main-0123.snapshot.pickle")
    return PeakMemory(**{**values, **changes})


def step_time(**changes) -> StepTime:
    values = dict(activity="cuda", step_index=2, step_ms=10.0, timed_step_ms=9.5, trace="profiles/main.trace.json.gz",
                  categories=[StepCategory("matmul bf16", "matmul", 7.0, 7.5, 300),
                              StepCategory("idle", "idle", 3.0, 3.0, 0)])
    return StepTime(**{**values, **changes})


def record(profile: Profile | None) -> CaseResult:
    made = result()
    made.profile = profile
    return made


def test_a_profile_reads_back_as_it_was_written():
    profile = Profile("test", memory=peak_memory(), load_reason="no CUDA here", step=step_time())
    back = CaseResult.from_json(record(profile).to_json())
    assert back.profile == profile
    assert set(back.files()) >= {"profiles/main-0123.snapshot.pickle", "profiles/main.trace.json.gz"}


def test_a_record_without_a_profile_is_written_as_before():
    data = json.loads(record(None).to_json())
    assert "profile" not in data and CaseResult.from_json(json.dumps(data)).profile is None


@pytest.mark.parametrize("path, value", [
    (("memory", "parts", 0, "gib"), float("nan")), (("memory", "parts", 0, "gib"), -1.0),
    (("memory", "total_gib"), 12.0), (("step", "categories", 0, "ms"), 8.0),
    (("step", "categories", 0, "busy_ms"), 1.0), (("memory", "snapshot"), "../outside.pickle"),
    (("step", "trace"), "/etc/passwd"), (("step", "step_ms"), float("inf"))])
def test_a_number_or_a_path_that_cannot_be_true_is_refused_when_read_back(path, value):
    data = json.loads(record(Profile("test", memory=peak_memory(), load_reason="x", step=step_time())).to_json())
    target = data["profile"]
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = value
    with pytest.raises(ValueError):
        CaseResult.from_json(json.dumps(data))


def test_a_part_is_either_measured_or_has_a_reason():
    with pytest.raises(ValueError, match="either measured or has a reason"):
        Profile("test", memory=peak_memory(), memory_reason="both", load_reason="x", step_reason="y")
    with pytest.raises(ValueError, match="either measured or has a reason"):
        Profile("test", load_reason="x", step_reason="y")


def test_parts_that_do_not_add_up_are_refused_where_they_are_made():
    with pytest.raises(ValueError, match="add up to"):
        peak_memory(total_gib=11.0)
