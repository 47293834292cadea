"""Reading a history from tiny CPU runs: the runs in order of their start time, the unusable ones skipped with the
reason, and runs of another GPU model, other library versions or another host kept in series of their own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from flux2bench.history import HistoryError, build_history
from flux2bench.history.render import markdown, summary_lines
from flux2bench.history.runs import check_label, read_history
from runs import make_case, make_run

TINY_SCENARIO = """
blocks:
  tiny:
    model: tiny
    device: cpu
    resolution: 64
    steps: 2
    repeats: 2
    warmup: 0
    prompts: a red fox
    timeout_s: 300
"""


@pytest.fixture(scope="module")
def tiny_run(run_scenario) -> Path:
    finished = run_scenario(TINY_SCENARIO, "history-tiny")
    assert [r.status for r in finished.results] == ["ok"]
    return finished.store.root


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def copy_run(source: Path, dest: Path, minute: int, slower: float = 1.0, **environment: Any) -> Path:
    """A copy of ``source`` started at 10:MM, its timings ``slower`` times, its environment's fields changed (a
    ``versions`` dict updates library versions)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".lock", "images", "latents", "tmp"))
    versions = environment.pop("versions", {})

    def meta(data: dict[str, Any]) -> None:
        data |= {"created_at": f"2026-12-01T10:{minute:02d}:00+00:00", "run_id": dest.name}
        data["environment"] |= environment
        data["environment"]["versions"] |= versions

    def timings(record: dict[str, Any]) -> None:
        latency = record["latency"]
        latency["stages"] = {stage: [s * slower for s in samples] for stage, samples in latency["stages"].items()}
        latency["steps"] = [[s * slower for s in image] for image in latency["steps"]]
        record["wall_s"] *= slower  # a slower case takes longer as a whole: its calls stay within its wall time

    edit_json(dest / "run.json", meta)
    for record in (dest / "results").glob("*.json"):
        edit_json(record, timings)
    return dest


@pytest.fixture
def folder(tmp_path: Path, tiny_run: Path):
    """``folder(n, **changes_of_run)``: a folder of n copies of the tiny run, named so that their names sort opposite
    to their start times; ``changes_of_run[i]`` (1-based) are copy_run's changes for that run."""
    def make(n: int, **changes: dict[str, Any]) -> Path:
        root = tmp_path / "history"
        for i in range(1, n + 1):
            copy_run(tiny_run, root / f"run-{n - i:02d}", i, **changes.get(f"run{i}", {}))
        return root

    return make


def test_runs_are_ordered_by_the_time_each_started_or_as_given(folder):
    root = folder(5)
    history = build_history([root])
    assert [r.run_id for r in history.runs] == ["run-04", "run-03", "run-02", "run-01", "run-00"]
    assert [r.position for r in history.runs] == [1, 2, 3, 4, 5]
    given = build_history([root / "run-00", root / "run-02", root / "run-01"], order="given")
    assert [r.run_id for r in given.runs] == ["run-00", "run-02", "run-01"]


def test_each_point_names_its_run_commit_gpu_and_host(folder):
    history = build_history([folder(4)])
    run = history.runs[-1]
    assert run.scenario == "history-tiny" and run.started == "2026-12-01T10:04:00+00:00"
    assert run.software["torch"] and run.host and run.label is None
    steps = next(a.series for a in history.analysed if a.series.metric == "s_per_step")
    assert steps.runs == [1, 2, 3, 4] and all(p.noise is not None for p in steps.points)


def test_unusable_run_directories_are_skipped_each_with_its_reason(folder, tiny_run):
    root = folder(6)
    next((root / "run-05" / "results").glob("*.json")).unlink()  # incomplete: a case without a result
    (root / "run-04" / "run.json").write_text("{not json")
    (root / "notes").mkdir()
    shutil.copytree(root / "run-03", root / "run-03-copy")
    edit_json(root / "run-02" / "run.json", lambda data: data.pop("created_at"))
    edit_json(root / "run-01" / "run.json", lambda data: data.update(label="two\nlines"))
    other = make_run(root, "other", [make_case("other-0a1b2c3d4e5f", image_s=[1.0])])
    edit_json(other / "run.json", lambda data: data.update(created_at="2026-12-01T09:00:00+00:00"))
    runs, skipped = read_history([root, root / "run-00"])
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert [r.run_id for r in runs] == ["run-03", "run-00"]
    assert reasons["run-05"].startswith("incomplete: 1 case(s) without a result")
    assert reasons["run-04"].startswith("unreadable:") and "run.json" in reasons["run-04"]
    assert reasons["notes"] == "not a run directory (no run.json)"
    assert reasons["run-03-copy"].startswith("a copy of") and "same run id and start time" in reasons["run-03-copy"]
    assert "no readable start time" in reasons["run-02"] and "--order given" in reasons["run-02"]
    assert reasons["run-01"].startswith("run.json's label")
    assert reasons["other"].startswith("another scenario (ci): no case key in common")
    assert [s.reason for s in skipped if Path(s.path).name == "run-00"] == [f"given twice (also as {root / 'run-00'})"]


def test_no_usable_run_directory_is_an_error_naming_why(tmp_path):
    with pytest.raises(HistoryError, match=r"no usable run directory \(1 skipped: .*missing: does not exist\)"):
        build_history([tmp_path / "missing"])


def test_runs_on_another_gpu_model_make_a_series_of_their_own(folder):
    other_gpu = {"gpu_name": "NVIDIA H200"}
    history = build_history([folder(6, run5=other_gpu, run6=other_gpu)])
    steps = [a for a in history.analysed if a.series.metric == "s_per_step"]
    assert [a.series.runs for a in steps] == [[5, 6], [1, 2, 3, 4]]
    assert steps[0].apart_from is None and steps[0].not_enough.startswith("not enough history: 2 runs")
    assert steps[1].apart_from.startswith("GPU no GPU (not NVIDIA H200)")
    assert f"- {steps[1].series.case_key} s_per_step: 4 runs (#1, #2, #3, #4), GPU no GPU (not NVIDIA H200)" in \
        markdown(history)


def test_the_terminal_says_each_cause_of_keeping_series_apart_once_for_the_series_it_holds(folder):
    other_gpu = {"gpu_name": "NVIDIA H200"}
    history = build_history([folder(6, run5=other_gpu, run6=other_gpu)])
    apart = [a for a in history.analysed if a.apart_from]
    assert len(apart) > 1 and len({a.apart_from for a in apart}) == 1
    [line] = [line for line in summary_lines(history) if line.startswith("kept apart")]
    cases = len({a.series.case_key for a in apart})
    assert line == (f"kept apart: {len(apart)} series of {cases} case{'s' * (cases > 1)}, 4 runs (#1, #2, #3, #4): "
                    f"{apart[0].apart_from}")


def test_other_library_versions_are_kept_apart_unless_allowed_and_then_listed_where_they_change(folder):
    upgraded = {"versions": {"diffusers": "9.9.9"}}
    root = folder(6, run5=upgraded, run6=upgraded)
    apart = [a for a in build_history([root]).analysed if a.series.metric == "s_per_step"]
    assert [a.series.runs for a in apart] == [[5, 6], [1, 2, 3, 4]] and apart[1].apart_from.endswith("(not 9.9.9)")
    [joined] = [a for a in build_history([root], allow_env_change=True).analysed if a.series.metric == "s_per_step"]
    assert joined.series.runs == [1, 2, 3, 4, 5, 6]
    assert [(run, text.split(" → ")[1]) for run, text in joined.series.env_changes] == [(5, "9.9.9")]


def test_host_bound_series_hold_the_runs_of_one_host(folder):
    elsewhere = {"host_label": "runner-2"}
    history = build_history([folder(5, run5=elsewhere)])
    rss = [a.series.runs for a in history.analysed if a.series.metric == "host_rss_peak_gib"]
    assert rss == [[5], [1, 2, 3, 4]]


def test_a_slower_cpu_run_is_a_change_point_that_is_reported_never_gated(folder):
    history = build_history([folder(6, run6={"slower": 2.0})])
    [point] = [p for a in history.analysed if a.series.metric == "s_per_step" for p in a.change_points]
    assert point.run == 6 and point.decision == "reported" and point.change == pytest.approx(1.0)
    assert history.exit_code == 0


def test_the_label_of_the_code_under_test_is_read_from_run_json(folder):
    root = folder(4)
    edit_json(root / "run-00" / "run.json", lambda data: data.update(label="other-repo@1a2b3c"))
    newest = build_history([root]).runs[-1]
    assert newest.label == "other-repo@1a2b3c" and newest.code == "other-repo@1a2b3c"


@pytest.mark.parametrize("label", ["", "  ", "a\nb", "x" * 201, 7])
def test_a_label_is_one_line_of_printable_text(label):
    with pytest.raises(ValueError):
        check_label(label)

