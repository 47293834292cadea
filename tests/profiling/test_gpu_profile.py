"""The profile of the tiny pipeline on a CUDA GPU: the memory parts add up to the device-level peak, the step's
categories to the profiled step, the files open, and the timed calls' peaks are those of the same case unprofiled."""

from __future__ import annotations

import pickle

import pytest
import torch

from flux2bench.profiling.steps import read_trace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROFILED = ("bf16", "nf4", "int8", "group_leaf")


@pytest.fixture(scope="module")
def run(run_scenario):
    return run_scenario("""
        defaults: {model: tiny, device: cuda, resolution: 128, steps: 3, warmup: 1, repeats: 2, prompts: a red fox}
        blocks:
          bf16: {profile: true}
          nf4: {precision: nf4, profile: true}
          int8: {precision: int8, profile: true}
          group_leaf: {offload: group_leaf, use_stream: true, profile: true}
          plain: {}
    """, "gpu-profile")


@pytest.mark.parametrize("block", PROFILED)
def test_the_memory_parts_add_up_to_the_device_peak(run, block):
    result = run[block]
    memory = result.profile.memory
    assert memory is not None, result.profile.memory_reason
    assert memory.device_peak_gib is not None and memory.total_gib == pytest.approx(memory.device_peak_gib)
    assert sum(p.gib for p in memory.parts) == pytest.approx(memory.device_peak_gib, rel=0.02)
    assert memory.replayed_allocated_peak_gib == pytest.approx(memory.allocated_peak_gib, rel=0.01)
    weights = {p.name: p.gib for p in memory.parts if p.kind == "weights"}
    assert weights and all(gib > 0 for gib in weights.values())
    if block == "group_leaf":
        assert any("moved onto the GPU" in name for name in weights)
    assert memory.top and memory.top[0].made_by


@pytest.mark.parametrize("block", PROFILED)
def test_the_step_categories_add_up_to_the_profiled_step(run, block):
    step = run[block].profile.step
    assert step is not None, run[block].profile.step_reason
    assert step.activity == "cuda" and step.step_index == 1
    assert sum(c.ms for c in step.categories) == pytest.approx(step.step_ms, rel=0.05)
    assert any(c.group == "matmul" and c.ms > 0 for c in step.categories)
    if block == "group_leaf":
        assert any(c.name == "copy HtoD" and c.bytes for c in step.categories)


def test_the_saved_files_open_in_their_viewers_formats(run):
    profile, root = run["bf16"].profile, run.store.root
    snapshot = pickle.loads((root / profile.memory.snapshot).read_bytes())
    assert {"segments", "device_traces"} <= set(snapshot)
    assert any(e.get("cat") == "kernel" for e in read_trace(root / profile.step.trace)["traceEvents"])


def test_profiling_changes_no_peak_of_the_timed_calls(run):
    profiled, plain = run["bf16"], run["plain"]
    for phase in ("load", "inference"):
        for name in ("gpu_allocated_peak_gib", "gpu_reserved_peak_gib"):
            assert getattr(profiled.memory[phase], name).value == getattr(plain.memory[phase], name).value
