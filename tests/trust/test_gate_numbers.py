"""The gate never believes a number no measurement gives: NaN, infinite, negative or zero timings and peaks, or a
record whose case is not the case of its key, make ``compare`` answer "cannot compare" (exit 2) naming the record and
the field, never pass; ``report`` sets such a record aside with the same reason and reports the rest."""

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


@pytest.mark.parametrize("side", ["current", "baseline"])
@pytest.mark.parametrize("name", IMPOSSIBLE)
def test_an_impossible_number_on_either_side_cannot_be_compared(runs, side, name):
    edit, problem = IMPOSSIBLE[name]
    baseline, current = runs
    record = tamper(current if side == "current" else baseline, MAIN.key, edit)
    code, output = invoke("compare", baseline, current)
    assert code == 2, output
    assert f"cannot compare: {side} run: unreadable result record {record}: {problem}" in output
    assert "pass" not in output and "Traceback" not in output


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
