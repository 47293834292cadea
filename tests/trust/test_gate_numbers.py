"""The gate never believes a number no measurement gives: NaN, infinite or negative timings and peaks, zero
timings, timings beyond the case's timeout, or a record whose case is not the case of its key or not one of the
run's, make ``compare`` answer "cannot compare" (exit 2) naming the record and the field, never pass; ``report`` sets
such a record aside with the same reason and reports the rest. The same holds for numbers that are each possible but
not together (steps longer than their call, calls longer than the case's wall time, more or fewer samples than the
case makes, an allocator peak above its reserved peak, a peak above the card or the host run.json lists), for a case
that ran (``ok``) without the timings and memory every such case measures, and on either side of the gate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.compare import CompareError, compare, latency_finding
from flux2bench.compare.rules import LatencyRule
from flux2bench.results import Setup
from records import ENVIRONMENT, environment
from runs import make_case, make_run, run_in_memory, with_changes

PEAKS = {"gpu_allocated_peak_gib": 10.0, "gpu_reserved_peak_gib": 12.0, "gpu_device_peak_gib": 13.0,
         "host_rss_peak_gib": 6.0}
MAIN = make_case("main-1", image_s=[1.0, 1.02, 0.98, 1.01], memory=PEAKS)
OTHER = make_case("other-1", image_s=[2.0, 2.02, 1.98, 2.01], memory=PEAKS)


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result.exit_code, " ".join(result.output.split())


def tamper(run_dir: Path, key: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Edit a record on disk, as a hand or a broken machine would."""
    path = run_dir / "results" / f"{key}.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return path


def peak(value: float) -> Callable[[dict[str, Any]], None]:
    return lambda record: record["memory"]["inference"]["gpu_device_peak_gib"].update(value=value)


def step(value: float) -> Callable[[dict[str, Any]], None]:
    return lambda record: record["latency"]["steps"][0].__setitem__(0, value)


def images(value: float) -> Callable[[dict[str, Any]], None]:
    return lambda record: record["latency"]["stages"].update(image=[value] * 4)


IMPOSSIBLE = {
    "nan-peak": (peak(float("nan")), "memory.inference.gpu_device_peak_gib.value: nan is not a finite number"),
    "infinite-peak": (peak(float("inf")), "memory.inference.gpu_device_peak_gib.value: inf is not a finite number"),
    "negative-peak": (peak(-13.0), "memory.inference.gpu_device_peak_gib.value: -13.0 is impossible"),
    "negative-step": (step(-0.2), "latency.steps.0.0: -0.2 is impossible"),
    "zero-step": (step(0.0), "latency.steps.0.0: 0.0 is impossible"),
    "zero-images": (images(0.0), "latency.stages.image.0: 0.0 is impossible"),
    "nan-image": (images(float("nan")), "latency.stages.image.0: nan is not a finite number"),
}


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    return make_run(tmp_path, "baseline", [MAIN, OTHER]), make_run(tmp_path, "current", [MAIN, OTHER])


def batched_under_the_batch_1_key(run_dir: Path) -> Path:
    """A batch-4 record renamed, key and all, to the batch-1 case's key."""
    batched = make_case("main-1", image_s=[4.0, 4.1, 3.9, 4.0], memory=PEAKS, setting={"batch_size": 4})
    assert batched.key != MAIN.key
    record = run_dir / "results" / f"{MAIN.key}.json"
    record.write_text(json.dumps({**json.loads(batched.to_json()), "key": MAIN.key,
                                  "case": {**batched.case.to_dict(), "key": MAIN.key}}))
    return record


MISMATCHED = f"key: '{MAIN.key}' is not its case's key"


def test_a_batch_4_record_under_the_batch_1_key_cannot_be_compared(runs):
    baseline, current = runs
    record = batched_under_the_batch_1_key(current)
    code, output = invoke("compare", baseline, current)
    assert code == 2 and f"unreadable result record {record}: {MISMATCHED}" in output


def test_report_sets_a_record_under_another_cases_key_aside(runs):
    _, current = runs
    batched_under_the_batch_1_key(current)
    assert invoke("report", current)[0] == 0
    report = (current / "report.md").read_text()
    assert f"results/{MAIN.key}.json ({MISMATCHED}" in report and f"| {MAIN.label} |" not in report


@pytest.mark.parametrize("name", ["nan-peak", "negative-step", "zero-images"])
def test_report_sets_an_impossible_record_aside_with_the_reason_and_reports_the_rest(runs, name):
    edit, problem = IMPOSSIBLE[name]
    _, current = runs
    tamper(current, MAIN.key, edit)
    code, output = invoke("report", current)
    assert code == 0, output
    report = (current / "report.md").read_text()
    assert f"results/{MAIN.key}.json ({problem}" in report and f"| {OTHER.label} | ok |" in report
    assert f"| {MAIN.label} |" not in report  # no row of numbers for it


def test_export_leaves_an_impossible_record_out_and_says_so(runs):
    _, current = runs
    tamper(current, MAIN.key, step(-1.0))
    code, output = invoke("export", current)
    assert code == 0 and "incomplete" in output and "latency.steps.0.0" in output
    exported = json.loads((current / "pytest-benchmark.json").read_text())
    assert [b["extra_info"]["key"] for b in exported["benchmarks"]] == [OTHER.key]


def test_records_made_in_memory_are_held_to_the_same_rules_by_compare():
    broken = with_changes(MAIN)
    broken.memory["inference"].gpu_device_peak_gib.value = float("nan")
    with pytest.raises(CompareError, match="cannot compare: current run: result record .*gpu_device_peak_gib.*nan"):
        compare(run_in_memory("baseline", [MAIN]), run_in_memory("current", [broken]))


@pytest.mark.parametrize("baseline, current", [([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]), ([1.0, 1.0], [-1.0, 1.0]),
                                               ([1.0, float("nan")], [1.0, 1.0])])
def test_a_latency_sample_no_clock_gives_is_never_decided(baseline, current):
    with pytest.raises(CompareError, match="cannot compare s_per_step"):
        latency_finding("s_per_step", baseline, current, LatencyRule())


def setting(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets the field at ``path`` (dotted; a number indexes a list) of a record."""
    *parents, last = path.split(".")

    def edit(record: dict[str, Any]) -> None:
        for part in parents:
            record = record[int(part)] if isinstance(record, list) else record[part]
        record[int(last) if isinstance(record, list) else last] = value

    return edit


def psnr(value: float) -> Callable[[dict[str, Any]], None]:
    return setting("drift", {"baseline_key": None, "label": "bf16", "failed": [],
                             "metrics": {"psnr": {"value": value, "method": "test", "reason": None}}})


def steps_of(seconds: float) -> Callable[[dict[str, Any]], None]:
    """Every step of the first timed call taking ``seconds``."""
    return lambda record: record["latency"]["steps"].__setitem__(0, [seconds] * 4)


# Numbers each of which a clock or a counter could give, that no measurement gives together (or at all: a duration
# no clock reads, a PSNR above the cap drift.py puts on identical images). MAIN's calls take about 1 s each, its
# steps 0.225 s, its load 10 s, its warm-up 1.02 s; its reserved peak is 12 GiB.
INCONSISTENT = {
    "steps-longer-than-their-call": (steps_of(10.0), "latency.steps.0: its steps sum to 40 s, more than the call "
                                                     "they ran in (latency.stages.image.0: 1 s)"),
    "steps-longer-than-the-timeout": (steps_of(1e308), "latency.steps.0.0: 1e+308 is impossible here (must be in "
                                                       "[1e-06, 60])"),
    "a-wall-time-longer-than-the-timeout": (setting("wall_s", 61.0), "wall_s: 61.0 is impossible here (must be in "
                                                                     "[0, 60])"),
    "a-negative-part-of-the-wall-time": (setting("wall_split", {"method": "test", "imports_s": -50.0}),
                                         "wall_split.imports_s: -50.0 is impossible here (must be at least 0)"),
    "more-timed-calls-than-the-case-makes": (
        lambda record: record["latency"]["stages"].update(image=[1.0] * 60) or record["latency"].update(
            steps=[[0.2] * 4] * 60), "latency.stages.image: 60 timed calls; its case makes 4 (4 repeats x 1 prompts x "
                                     "1 seeds)"),
    "fewer-steps-than-the-case-makes": (setting("latency.steps.1", [0.2] * 3),
                                        "latency.steps.1: 3 steps; its case makes 4"),
    "fewer-warm-up-calls-than-the-case-makes": (setting("latency.warmup_s", []),
                                                "latency.warmup_s: 0 warm-up calls; its case makes 1"),
    "stages-longer-than-their-call": (setting("latency.stages.vae_decode", [5.0] * 4),
                                      "latency.stages: call 0's stages sum to 5 s, more than the call itself"),
    "calls-longer-than-the-wall-time": (lambda record: record.update(wall_s=3.0) or record["latency"].update(
        load_s=1.0), "wall_s: 3 s is less than the warm-up and timed calls it holds (5.03 s)"),
    "load-longer-than-the-wall-time": (setting("wall_s", 8.0),
                                       "wall_s: 8 s is less than the load (latency.load_s) it holds (10 s)"),
    "a-step-no-clock-reads": (step(1e-300), "latency.steps.0.0: 1e-300 is impossible here (must be in [1e-06, 60])"),
    "a-load-no-clock-reads": (setting("latency.load_s", 1e-300), "latency.load_s: 1e-300 is impossible here"),
    "allocated-above-reserved": (setting("memory.inference.gpu_allocated_peak_gib.value", 50.0),
                                 "memory.inference.gpu_allocated_peak_gib.value: 50.0 GiB is above the reserved peak "
                                 "12.0 GiB"),
    "psnr-above-its-cap": (psnr(1e300), "drift.metrics.psnr.value: 1e+300 is impossible here (must be in [0, 100])"),
}


@pytest.mark.parametrize("side", ["current", "baseline"])
@pytest.mark.parametrize("name", [*IMPOSSIBLE, *INCONSISTENT])
def test_an_impossible_number_or_numbers_no_measurement_gives_together_cannot_be_compared_on_either_side(runs, side,
                                                                                                         name):
    edit, problem = {**IMPOSSIBLE, **INCONSISTENT}[name]
    baseline, current = runs
    record = tamper(current if side == "current" else baseline, MAIN.key, edit)
    code, output = invoke("compare", baseline, current)
    assert code == 2, output
    assert f"cannot compare: {side} run: unreadable result record {record}: {problem}" in output
    assert "pass" not in output and "Traceback" not in output


def test_a_psnr_at_its_cap_and_a_wall_time_holding_load_and_calls_compare_a_shorter_one_does_not(runs):
    baseline, current = runs
    for run_dir in runs:
        tamper(run_dir, MAIN.key, psnr(100.0))
        tamper(run_dir, MAIN.key, setting("wall_s", 15.04))  # load 10 s, warm-up 1.02 s, calls 4.01 s, and more
    assert invoke("compare", baseline, current)[0] == 0
    tamper(current, MAIN.key, setting("wall_s", 9.99))
    code, output = invoke("compare", baseline, current)
    assert code == 2 and "wall_s: 9.99 s is less than the load (latency.load_s) it holds (10 s)" in output


# Peaks above what the machines run.json lists hold: ENVIRONMENT's one card has 79.2 GiB, its host 125.8 GiB.
ABOVE_THE_MACHINE = {
    "device-peak-above-the-card": ("gpu_device_peak_gib", 5000.0,
                                   "memory.inference.gpu_device_peak_gib.value: 5000.0 GiB is more than the largest "
                                   "GPU's memory (79.2 GiB in run.json)"),
    "rss-above-the-host": ("host_rss_peak_gib", 9000.0, "memory.inference.host_rss_peak_gib.value: 9000.0 GiB is "
                                                        "more than the host's RAM (125.8 GiB in run.json)"),
}


@pytest.mark.parametrize("side", ["current", "baseline"])
@pytest.mark.parametrize("name", ABOVE_THE_MACHINE)
def test_a_peak_above_the_machine_run_json_lists_cannot_be_compared_on_either_side(runs, side, name):
    field, value, problem = ABOVE_THE_MACHINE[name]
    baseline, current = runs
    run_dir = current if side == "current" else baseline
    tamper(run_dir, MAIN.key, lambda record: record["memory"]["inference"][field].update(value=value))
    code, output = invoke("compare", baseline, current)
    assert code == 2, output
    assert f"cannot compare: {side} run: result record {MAIN.key} ({run_dir}): {problem}" in output
    assert "pass" not in output and "improvement" not in output


def resumed_on(run_dir: Path, env: dict[str, Any]) -> None:
    """run.json as a run that another host resumed writes it."""
    meta = json.loads((run_dir / "run.json").read_text())
    meta["resumed"] = [{"environment": env}]
    (run_dir / "run.json").write_text(json.dumps(meta))


def test_a_peak_is_held_to_the_card_it_ran_on_which_may_be_the_card_of_the_host_that_resumed_the_run(tmp_path):
    h200 = environment(gpu_name="NVIDIA H200", gpus=[{"index": 0, "name": "NVIDIA H200", "memory_gib": 140.4}])
    big = make_case("main-1", image_s=[1.0, 1.02, 0.98, 1.01], memory={**PEAKS, "gpu_device_peak_gib": 100.0})
    baseline, current = make_run(tmp_path, "baseline", [big]), make_run(tmp_path, "current", [big])  # on an H100
    code, output = invoke("compare", baseline, current)
    assert code == 2 and "100.0 GiB is more than the largest GPU's memory (79.2 GiB in run.json)" in output
    for run_dir in (baseline, current):
        resumed_on(run_dir, h200)
    assert invoke("compare", baseline, current)[0] == 0
    on_the_h100 = with_changes(big, setup=Setup(gpu=ENVIRONMENT["gpu_name"]))
    baseline, current = (make_run(tmp_path / "named", name, [on_the_h100]) for name in ("baseline", "current"))
    for run_dir in (baseline, current):
        resumed_on(run_dir, h200)
    code, output = invoke("compare", baseline, current)
    assert code == 2 and f"100.0 GiB is more than the {ENVIRONMENT['gpu_name']}'s memory (79.2 GiB" in output


def test_a_record_of_a_gpu_no_machine_of_the_run_has_cannot_be_compared(runs):
    baseline, current = runs
    tamper(current, MAIN.key, setting("setup.gpu", "NVIDIA B200"))
    code, output = invoke("compare", baseline, current)
    assert code == 2 and ("setup.gpu: 'NVIDIA B200' is none of the GPUs run.json lists (NVIDIA H100 80GB HBM3)"
                          in output)


def test_report_sets_a_record_above_its_host_aside_and_reports_the_rest(runs):
    _, current = runs
    tamper(current, MAIN.key, lambda record: record["memory"]["inference"]["host_rss_peak_gib"].update(value=9000.0))
    code, output = invoke("report", current)
    assert code == 0, output
    report = (current / "report.md").read_text()
    assert f"results/{MAIN.key}.json ({ABOVE_THE_MACHINE['rss-above-the-host'][2]}" in report
    assert f"| {OTHER.label} | ok |" in report and f"| {MAIN.label} |" not in report


# A case that ran to the end (ok) timed its load and every call with its steps, and measured its inference peaks:
# a record without them has nothing to compare, and the gate would skip every metric and pass.
UNMEASURED = {
    "no-timings": (setting("latency", None), "latency: a case with status ok was timed; this record has no timings"),
    "no-load-time": (setting("latency.load_s", None), "latency.load_s: a case with status ok timed its load"),
    "no-timed-calls": (setting("latency.stages", {}), "latency.stages.image: a case with status ok timed its calls"),
    "no-steps": (setting("latency.steps", []), "latency.steps: a case with status ok times the denoising steps of "
                                               "each of its 4 timed calls; this record has steps for 0"),
    "nothing-measured": (lambda record: record.update(latency=None, memory={}, drift=None, energy=None),
                         "latency: a case with status ok was timed; this record has no timings"),
}


@pytest.mark.parametrize("side", ["current", "baseline"])
@pytest.mark.parametrize("name", UNMEASURED)
def test_a_case_that_ran_without_its_timings_cannot_be_compared_on_either_side(runs, side, name):
    edit, problem = UNMEASURED[name]
    baseline, current = runs
    record = tamper(current if side == "current" else baseline, MAIN.key, edit)
    code, output = invoke("compare", baseline, current)
    assert code == 2, output
    assert f"cannot compare: {side} run: unreadable result record {record}: {problem}" in output
    assert "pass" not in output


@pytest.mark.parametrize("side", ["current", "baseline"])
def test_a_case_that_ran_without_inference_memory_cannot_be_compared_with_one_that_has_it(runs, side):
    baseline, current = runs
    run_dir = current if side == "current" else baseline
    tamper(run_dir, MAIN.key, lambda record: record.update(memory={}))
    code, output = invoke("compare", baseline, current)
    assert code == 2, output
    assert (f"cannot compare: {side} run: result record {MAIN.key} ({run_dir}): memory.inference: a case with "
            "status ok measured its inference phase's peaks; this record has none") in output


def test_a_case_that_did_not_run_needs_no_timings_and_its_failure_still_fails_the_gate(runs):
    baseline, current = runs
    tamper(current, MAIN.key, setting("latency", None))
    assert invoke("compare", baseline, current)[0] == 2  # ok without timings: impossible
    tamper(current, MAIN.key, lambda record: record.update(status="oom", memory={}, reason="CUDA out of memory"))
    code, output = invoke("compare", baseline, current)
    assert code == 1 and "status ok → oom" in output


def test_records_made_in_memory_are_held_to_the_consistency_rules_and_to_their_environments_machines():
    allocated = with_changes(MAIN)
    allocated.memory["inference"].gpu_allocated_peak_gib.value = 50.0
    with pytest.raises(CompareError, match="current run: result record .*gpu_allocated_peak_gib.*above the reserved"):
        compare(run_in_memory("baseline", [MAIN]), run_in_memory("current", [allocated]))
    huge = with_changes(MAIN)
    huge.memory["inference"].gpu_device_peak_gib.value = 5000.0
    with pytest.raises(CompareError, match="baseline run: result record .*5000.0 GiB is more than the largest GPU"):
        compare(run_in_memory("baseline", [huge]), run_in_memory("current", [MAIN]))
    unmeasured = with_changes(MAIN, memory={})
    with pytest.raises(CompareError, match="current run: result record .*memory.inference: a case with status ok"):
        compare(run_in_memory("baseline", [MAIN]), run_in_memory("current", [unmeasured]))


def test_a_record_of_a_case_the_run_does_not_have_cannot_be_compared_and_the_report_sets_it_aside(tmp_path):
    baseline = make_run(tmp_path, "baseline", [MAIN, OTHER])
    current = make_run(tmp_path, "current", [MAIN])
    stray = current / "results" / f"{OTHER.key}.json"
    stray.write_bytes((baseline / "results" / f"{OTHER.key}.json").read_bytes())  # copied from another run
    code, output = invoke("compare", baseline, current)
    assert code == 2, output
    assert (f"cannot compare: current run: unreadable result record {stray}: case {OTHER.key} is not one of the "
            "run's (run.json's case_keys), nor a drift baseline of one of its blocks") in output
    code, output = invoke("report", current)
    assert code == 0 and "1 record(s) set aside as invalid" in output
    assert f"results/{OTHER.key}.json" in (current / "report.md").read_text()
