"""The report's Why section: per profiled case, the step by category and the peak by owner as stacked bars, the
tables behind them, the largest allocations and links to the saved trace and snapshot."""

from __future__ import annotations

import pytest

from flux2bench.profiling.record import (Allocation, LoadMemory, MemoryPart, PeakMemory, Profile, Rate, StepCategory,
                                         StepTime)
from flux2bench.report import build_report
from flux2bench.store import RunStore
from records import ENVIRONMENT, environment, gpu_result, write_run

PINNED_GIB_S = 50.0


def profile(snapshot: str | None = "profiles/x.snapshot.pickle") -> Profile:
    parts = [MemoryPart("weights: transformer uint8 (nf4) (quantized)", "weights", 16.0, "test"),
             MemoryPart("activations and temporaries (allocated during the call)", "allocated", 4.0, "test"),
             MemoryPart("allocator slack (reserved minus allocated at the peak)", "slack", 1.0, "test"),
             MemoryPart("outside the allocator (CUDA context, library workspaces)", "outside", 1.0, "test")]
    memory = PeakMemory(22.0, "device-level peak (NVML) during the call", 20.0, 21.0, 20.0, 21.0, 22.0, parts,
                        top=[Allocation(1.5, 3, "diffusers/models/attention_dispatch.py:812 _native_attention",
                                        "transformer", "transformer.single_transformer_blocks.7.attn")],
                        snapshot=snapshot, snapshot_reason=None if snapshot else "the snapshot is 900 MiB: not saved")
    step = StepTime("cuda", 3, 600.0, [StepCategory("matmul bf16", "matmul", 400.0, 400.0, 500),
                                       StepCategory("copy HtoD", "copy", 50.0, 500.0, 900, 10 * 2**30, 20.0),
                                       StepCategory("idle", "idle", 150.0, 150.0, 0)], 590.0,
                    [Rate("matmul", 200.0, 400.0, 500.0, 989.5)], trace="profiles/x.trace.json.gz")
    load = LoadMemory([MemoryPart("weights: transformer uint8 (nf4) (quantized)", "weights", 16.0, "test")], 16.0,
                      18.0, 2.0, "test method")
    return Profile("test", memory=memory, load=load, step=step)


def test_the_why_section_explains_step_and_peak_of_each_profiled_case(tmp_path):
    record = gpu_result(device=22.0, reserved=21.0)
    record.profile = profile()
    run = write_run(tmp_path / "run", [record], environment=environment(
        host_to_device={"pinned_gib_s": PINNED_GIB_S, "pageable_gib_s": 6.0, "method": "test"}))
    text = build_report(run).markdown_text
    why = text[text.index("## Why each setup costs what it costs"):]
    assert "| matmul bf16 | 400.00 | 66.7% |" in why
    assert "| copy HtoD | 50.00 | 8.3% | 500.00 | 900 | 20.0 (40.0% of the host's pinned 50.0) |" in why
    assert "| matmul | 200 | 400.00 | 500 | 50.5% |" in why
    assert "| weights: transformer uint8 (nf4) (quantized) | 16.000 | 72.7% |" in why
    assert "transformer.single_transformer_blocks.7.attn" in why and "22.00 GiB" in why
    assert "[profiles/x.trace.json.gz](profiles/x.trace.json.gz)" in why
    assert "[profiles/x.snapshot.pickle](profiles/x.snapshot.pickle)" in why
    assert (run / "plots" / "why_step.png").is_file() and (run / "plots" / "why_peak.png").is_file()


def test_what_was_not_saved_or_measured_says_why(tmp_path):
    record = gpu_result(device=22.0, reserved=21.0)
    record.profile = profile(snapshot=None)
    record.profile.step, record.profile.step_reason = None, "RuntimeError: CUPTI unavailable"
    run = write_run(tmp_path / "run", [record], environment=ENVIRONMENT)
    text = build_report(run, plots=False).markdown_text
    assert "No allocator snapshot saved: the snapshot is 900 MiB: not saved." in text
    assert "Step: not profiled (RuntimeError: CUPTI unavailable)." in text


def test_the_html_report_links_the_saved_files(tmp_path):
    record = gpu_result(device=22.0, reserved=21.0)
    record.profile = profile()
    run = write_run(tmp_path / "run", [record], environment=ENVIRONMENT)
    html = build_report(run).html.read_text()
    assert '<a href="profiles/x.trace.json.gz">profiles/x.trace.json.gz</a>' in html
    assert "What holds the peak" in html


@pytest.mark.parametrize("damage, problem", [
    (lambda p: setattr(p.step.rates[0], "tflops", 5e6), "matmul: 5000000.0 TFLOP/s is not its 200.0 TFLOP over its "
                                                       "busy 400.0 ms"),
    (lambda p: setattr(p.step.categories[0], "items", -3), "matmul bf16: the count of kernels -3 is negative"),
    (lambda p: setattr(p.step, "step_index", 99), "profile.step.step_index: step 99 of a case of 4 steps"),
])
def test_a_profile_whose_numbers_disagree_sets_its_record_aside(tmp_path, damage, problem):
    record = gpu_result(device=22.0, reserved=21.0)
    record.profile = profile()
    damage(record.profile)
    run = write_run(tmp_path / "run", [record], environment=ENVIRONMENT)
    (reason,) = RunStore(run).records().invalid.values()
    assert problem in reason
