"""A profiled case end to end on the CPU: `flux2bench run --profile` takes its profile on extra calls after the
timed ones, the case stays ok with a reason for what needs CUDA, the step's time comes from the tiny pipeline's real
profiler output, and a case without the profile runs none of the profiling code."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from flux2bench.case_run import CaseRun, Events
from flux2bench.cli import app
from flux2bench.identity import changed
from flux2bench.metrics import s_per_step
from flux2bench.profiling.steps import read_trace
from flux2bench.profiling.record import LoadMemory, MemoryPart
from flux2bench.profiling.take import NO_CUDA, profiled_step, recount_profile, take_profile
from flux2bench.report import build_report
from flux2bench.results import CaseResult, Metric, Status
from flux2bench.store import RunStore
from flux2bench.trackers.memory import MemorySampler

from conftest import REPO

SCENARIO = """
    blocks:
      tiny: {model: tiny, device: cpu, resolution: 64, steps: 3, warmup: 1, repeats: 1, prompts: a red fox}
"""


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> RunStore:
    root = tmp_path_factory.mktemp("profiled")
    (root / "tiny.yaml").write_text(textwrap.dedent(SCENARIO))
    outcome = CliRunner().invoke(app, ["run", str(root / "tiny.yaml"), "--profile", "--out", str(root / "runs"),
                                       "--no-report"])
    assert outcome.exit_code == 0, outcome.output
    return RunStore.open(next((root / "runs").iterdir()))


def record(store: RunStore) -> CaseResult:
    (result,) = store.results()
    return result


def test_run_profile_profiles_the_case_without_changing_its_key(profiled):
    result = record(profiled)
    assert result.status == Status.OK and result.case.profile and result.profile is not None
    assert result.key == changed(result.case, profile=False).key


def test_what_needs_cuda_is_a_reason_and_the_case_stays_ok(profiled):
    profile = record(profiled).profile
    assert profile.memory is None and profile.memory_reason == NO_CUDA.format(device="cpu")
    assert profile.load is None and profile.load_reason == NO_CUDA.format(device="cpu")


def test_the_step_of_the_tiny_pipeline_splits_into_categories_that_add_up_to_it(profiled):
    result = record(profiled)
    step = result.profile.step
    assert (step.activity, step.step_index) == ("cpu", 1)
    assert sum(c.ms for c in step.categories) == pytest.approx(step.step_ms, rel=0.05)
    groups = {c.group for c in step.categories if c.ms > 0}
    assert {"matmul", "attention", "elementwise", "idle"} <= groups
    assert {c.name for c in step.categories} >= {"matmul bf16", "attention flash"}
    assert step.timed_step_ms == pytest.approx(s_per_step(result) * 1e3)
    assert [r.group for r in step.rates] == ["matmul", "attention"]


def test_the_trace_is_saved_compressed_and_holds_the_profiled_step(profiled):
    step = record(profiled).profile.step
    assert step.trace.endswith(".trace.json.gz")
    events = read_trace(profiled.root / step.trace)["traceEvents"]
    assert any(e.get("name") == f"ProfilerStep#{step.step_index}" for e in events)
    assert not (profiled.root / step.trace.removesuffix(".gz")).exists()


def test_a_run_without_profiles_has_no_why_section(tmp_path):
    run = shutil.copytree(REPO / "reports" / "smoke-20261126-084139", tmp_path / "smoke")
    assert "Why each setup costs" not in build_report(run, plots=False).markdown_text


def test_the_report_of_a_profiled_run_answers_why(profiled):
    paths = build_report(profiled.root)
    step = record(profiled).profile.step
    assert "## Why each setup costs what it costs" in paths.markdown_text
    assert f"[{step.trace}]({step.trace})" in paths.markdown_text
    assert (profiled.root / "plots" / "why_step.png").is_file()
    assert "Where a denoising step goes" in paths.html.read_text()


def test_a_recount_reads_the_saved_trace_again_and_says_so(profiled, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(profiled.root, run_dir)
    store = RunStore.open(run_dir)
    before = record(store)
    wrong = record(store)
    wrong.profile.step.categories = [dataclasses.replace(c, name="other") for c in wrong.profile.step.categories]
    store.write(wrong)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "recount_profiles.py"), str(run_dir)],
                          capture_output=True, text=True, check=True)
    after = record(RunStore.open(run_dir)).profile.step
    assert done.stdout.split() == ["recounted", before.key]
    assert after.categories == before.profile.step.categories
    assert after.method.endswith("read again from the record and the saved trace after the run "
                                 "(scripts/recount_profiles.py)")


def test_the_profile_is_taken_with_the_load_and_inference_peaks_already_in_the_record(tiny_case, tmp_path,
                                                                                     monkeypatch):
    seen = []
    monkeypatch.setattr("flux2bench.profiling.take.take_profile",
                        lambda pipe, arguments, result, *rest: seen.append(sorted(result.memory)))
    result = CaseRun(changed(tiny_case(steps=2), profile=True), tmp_path, Events(None)).run()
    assert result.status == Status.OK, result.reason
    assert seen == [["inference", "load"]]


def test_a_recount_of_what_is_not_a_run_directory_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "recount_profiles.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {tmp_path} is not a flux2bench run directory (no run.json)"]


def test_a_load_part_without_the_load_peak_is_given_the_records_own(profiled, tmp_path):
    result = record(profiled)
    weights = [MemoryPart("weights: transformer bfloat16", "weights", 16.0, "sum of storages")]
    result.profile.load = LoadMemory(weights, 16.0, None, None, "resident weights")
    result.memory["load"].gpu_allocated_peak_gib = Metric(16.5, "torch.cuda.max_memory_allocated")
    assert recount_profile(result, profiled.root)
    assert (result.profile.load.allocated_peak_gib, result.profile.load.transient_gib) == (16.5, 0.5)
    assert result.profile.load.method.startswith("resident weights; read again from the record")


def test_the_worker_of_a_case_without_the_profile_imports_no_profiling_code(tiny_case, tmp_path):
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from flux2bench.case_run import CaseRun, Events
        from flux2bench.identity import case_from_dict
        result = CaseRun(case_from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]), Events(None)).run()
        print(json.dumps([str(result.status), sorted(m for m in sys.modules if m.startswith("flux2bench.profiling"))]))
    """)
    case = json.dumps(tiny_case().to_dict())
    done = subprocess.run([sys.executable, "-c", code, case, str(tmp_path)], capture_output=True, text=True,
                          env=os.environ, timeout=600, check=True)
    status, modules = json.loads(done.stdout.splitlines()[-1])
    assert status == "ok" and modules == ["flux2bench.profiling", "flux2bench.profiling.record"]
    assert not (tmp_path / "profiles").exists()


@pytest.mark.parametrize("steps, index", [(1, 0), (2, 1), (4, 2), (8, 4), (50, 25)])
def test_the_profiled_step_is_the_middle_one_and_never_the_first_of_several(steps, index):
    assert profiled_step(steps) == index


def test_a_failing_profile_call_is_a_reason_not_a_failed_case(tiny_case, tmp_path):
    def pipe(**_):
        raise RuntimeError("the pipeline broke")

    result = CaseResult.for_case(tiny_case(steps=3), Status.OK)
    with MemorySampler(None) as sampler:
        profile = take_profile(pipe, lambda: {}, result, torch.device("cpu"), sampler, tmp_path)
    assert profile.step is None and profile.step_reason == "RuntimeError: the pipeline broke"
    assert result.status == Status.OK


def test_inputs_that_cannot_be_prepared_are_the_reason_of_the_calls_that_need_them(tiny_case, tmp_path):
    def inputs():
        raise OSError("no prompt embeddings")

    with MemorySampler(None) as sampler:
        profile = take_profile(object(), inputs, CaseResult.for_case(tiny_case(), Status.OK), torch.device("cpu"),
                               sampler, tmp_path)
    assert profile.step_reason == "the call's inputs could not be prepared: OSError: no prompt embeddings"
    assert profile.memory_reason == profile.load_reason == NO_CUDA.format(device="cpu")


def test_other_ranks_make_the_calls_and_leave_the_record_to_rank_0(tiny_case, tmp_path):
    calls = []

    def pipe(**kwargs):
        calls.append(kwargs)
        for step in range(3):
            kwargs["callback_on_step_end"](None, step, None, {})

    with MemorySampler(None) as sampler:
        profile = take_profile(pipe, lambda: {}, CaseResult.for_case(tiny_case(steps=3), Status.OK),
                               torch.device("cpu"), sampler, tmp_path, rank=1)
    assert profile is None and len(calls) == 1 and not (tmp_path / "profiles").exists()
