"""`flux2bench history`: the gate's exit codes (1 when the newest runs start a regression or make one significant, 0
otherwise and with too little history, 2 on unusable input, with one line and nothing written, and 2 when a run
the gate would look at is unusable), history.md, history.html and --json; and `run --label`."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.runner import start_run
from runs import make_case, make_run, noisy

KEY = "base-0a1b2c3d4e5f"


def invoke(*args) -> tuple[int, str]:
    outcome = CliRunner().invoke(app, [str(a) for a in args])
    assert outcome.exc_info is None or outcome.exc_info[0] is SystemExit, outcome.exc_info
    return outcome.exit_code, " ".join(outcome.output.split())


def write_runs(root: Path, image_s: list[list[float]]) -> Path:
    """A folder of GPU runs of one case, run i timing the images ``image_s[i]`` (its steps share them evenly), its
    device peak 12.9 GiB; started a minute apart."""
    for i, seconds in enumerate(image_s, 1):
        run = make_run(root, f"ci-{i:02d}", [make_case(KEY, image_s=seconds, memory={"gpu_device_peak_gib": 12.9})])
        meta = json.loads((run / "run.json").read_text())
        meta["created_at"] = f"2026-12-01T10:{i:02d}:00+00:00"
        (run / "run.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def history_of(tmp_path):
    """``history_of(factors)``: runs whose 3 timed images take ``factors[i]`` times 0.5 s, with 0.4% noise."""
    def make(factors: list[float]) -> Path:
        rng = np.random.default_rng(7)
        return write_runs(tmp_path / "history", [noisy(rng, 0.5 * f, 3, 0.004, outlier_p=0) for f in factors])

    return make


def test_the_gate_fails_when_the_newest_run_starts_a_regression(history_of):
    code, output = invoke("history", history_of([1.0] * 11 + [1.03]), "--gate")
    assert code == 1
    assert "history: regression. The gate looks at the newest run: #12 ci-12" in output


def test_the_gate_passes_a_regression_the_newest_runs_did_not_start_unless_it_looks_at_more(history_of):
    root = history_of([1.0] * 8 + [1.03] * 4)
    assert invoke("history", root, "--gate")[0] == 0
    assert invoke("history", root, "--gate", "--newest", "4")[0] == 1


# A 2.5% step at run 11 over 0.6% noise: one run at the new level is not significant, two are.
SMALL_STEP = list(0.5 * np.exp(np.random.default_rng(12).normal(0.0, 0.006, 14)) * ([1.0] * 10 + [1.025] * 4))


@pytest.mark.parametrize("runs, code", [(11, 0), (12, 1), (13, 0)])
def test_the_gate_fails_with_the_run_that_makes_an_earlier_step_significant_and_only_with_it(tmp_path, runs, code):
    root = write_runs(tmp_path / "history", [[s] * 3 for s in SMALL_STEP[:runs]])
    exit_code, output = invoke("history", root, "--gate")
    assert exit_code == code
    if code:
        assert "found with the newest runs: s_per_step from run #11" in output


def test_without_gate_a_regression_is_shown_and_the_exit_code_is_0(history_of):
    code, output = invoke("history", history_of([1.0] * 11 + [1.03]))
    assert code == 0 and "history, as --gate would judge it: regression." in output


def test_a_steady_history_passes(history_of):
    code, output = invoke("history", history_of([1.0] * 12), "--gate")
    assert code == 0 and "No regression beyond its metric's floor found with the newest runs" in output


def test_too_little_history_passes_the_gate_and_says_so(history_of):
    code, output = invoke("history", history_of([1.0, 1.5]), "--gate")
    assert code == 0
    assert "Not enough history for 4 series of the newest runs" in output and "not gated" in output


@pytest.mark.parametrize("args, message", [
    (["missing"], "no usable run directory (1 skipped:"),
    (["history", "--order", "newest"], "order must be one of time, given, not 'newest'"),
    (["history", "--rules", "gate.yaml"], "invalid gate rules"),
    (["history", "--max-pvalue", "2"], "max_pvalue must lie between 0 and 1"),
    (["history", "--out", "history/ci-01/out"], "is inside the run directory"),
    (["history", "--json", "history/ci-02/history.json"], "is inside the run directory"),
])
def test_unusable_input_exits_2_with_one_line_and_writes_nothing(history_of, tmp_path, monkeypatch, args, message):
    root = history_of([1.0] * 4)
    (tmp_path / "gate.yaml").write_text("defaults: {s_per_step: {history_threshold: -1}}\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    code, output = invoke("history", *args)
    assert code == 2 and output.startswith("error: ") and message in output and "Traceback" not in output
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert root.is_dir()


def test_without_apache_otava_history_exits_2_with_the_line_that_installs_it(history_of, monkeypatch):
    monkeypatch.setitem(sys.modules, "otava.analysis", None)  # import fails as when the package is missing
    code, output = invoke("history", history_of([1.0] * 4), "--gate")
    assert code == 2 and "Apache Otava, which is not installed" in output and "flux2bench[history]" in output


def truncate_record(run: Path) -> None:
    next((run / "results").glob("*.json")).write_text("{")


def delete_record(run: Path) -> None:
    next((run / "results").glob("*.json")).unlink()


def negative_load_time(run: Path) -> None:
    record = next((run / "results").glob("*.json"))
    data = json.loads(record.read_text())
    data["latency"]["load_s"] = -1.0
    record.write_text(json.dumps(data))


def truncate_run_json(run: Path) -> None:
    (run / "run.json").write_text("{")


def start_at(run: Path, created_at: str) -> Path:
    meta = json.loads((run / "run.json").read_text())
    meta["created_at"] = created_at
    (run / "run.json").write_text(json.dumps(meta))
    return run


@pytest.mark.parametrize("damage, reason", [
    (truncate_record, "incomplete: 1 case(s) without a result"),
    (delete_record, "incomplete: 1 case(s) without a result"),
    (negative_load_time, "incomplete: 1 case(s) without a result"),
    (truncate_run_json, "unreadable:"),
])
def test_the_gate_cannot_judge_an_unusable_newest_run_and_exits_2_naming_it(history_of, tmp_path, damage, reason):
    root = history_of([1.0] * 12)
    damage(root / "ci-12")
    code, output = invoke("history", root, "--gate", "--json", tmp_path / "history.json")
    assert code == 2
    assert (f"history: cannot judge. The gate looks at the newest run, and it was skipped: {root / 'ci-12'} "
            f"({reason}") in output
    data = json.loads((tmp_path / "history.json").read_text())
    assert data["decision"] == "cannot judge" and data["exit_code"] == 2
    assert invoke("history", root)[0] == 0  # without --gate the run is skipped with the reason, as any other


def test_a_gate_never_passes_because_runs_among_the_newest_are_unusable(history_of):
    root = history_of([1.0] * 10 + [1.03] * 2)
    assert invoke("history", root, "--gate", "--newest", "2")[0] == 1
    truncate_record(root / "ci-11")
    truncate_record(root / "ci-12")
    code, output = invoke("history", root, "--gate", "--newest", "2")  # not a pass on runs 9 and 10
    assert code == 2
    assert (f"The gate looks at the newest 2 runs, and a run among them was skipped: {root / 'ci-11'} (incomplete: "
            in output) and f"; {root / 'ci-12'} (incomplete: " in output


def test_an_unusable_run_stops_the_gate_only_when_it_would_be_among_the_newest(history_of):
    root = history_of([1.0] * 12)
    delete_record(root / "ci-11")
    assert invoke("history", root, "--gate")[0] == 0
    code, output = invoke("history", root, "--gate", "--newest", "2")
    assert code == 2 and f"was skipped: {root / 'ci-11'} (incomplete: " in output


def test_a_run_without_a_start_time_may_be_the_newest_so_by_time_the_gate_cannot_judge(history_of):
    root = history_of([1.0] * 12)
    truncate_run_json(root / "ci-03")
    code, output = invoke("history", root, "--gate")
    assert code == 2 and f"{root / 'ci-03'} (unreadable: " in output and "; no start time places it)" in output
    assert invoke("history", root, "--gate", "--order", "given")[0] == 0  # listed third of twelve: an old run


def test_a_run_directory_named_that_does_not_exist_may_be_the_run_under_test(history_of, tmp_path):
    root = history_of([1.0] * 12)
    (tmp_path / "empty").mkdir()
    code, output = invoke("history", root, tmp_path / "ci-13", "--gate")
    assert code == 2 and f"was skipped: {tmp_path / 'ci-13'} (does not exist; no start time places it)." in output
    assert invoke("history", root, tmp_path / "empty", "--gate")[0] == 0  # a folder without runs holds no run


def test_a_duplicate_of_a_run_is_harmless_but_a_run_of_another_scenario_among_the_newest_is_not(history_of):
    root = history_of([1.0] * 12)
    assert invoke("history", root, root / "ci-12", "--gate")[0] == 0
    other = make_run(root, "other", [make_case("other-0a1b2c3d4e5f", image_s=[0.5] * 3)])
    start_at(other, "2026-12-01T10:11:30+00:00")  # between ci-11 and ci-12
    assert invoke("history", root, "--gate")[0] == 0
    code, output = invoke("history", root, "--gate", "--newest", "2")
    assert code == 2 and f"was skipped: {other} (another scenario (ci): no case key in common" in output


def test_a_newest_run_of_another_scenario_than_its_history_cannot_be_judged(history_of, tmp_path):
    root = history_of([1.0] * 12)
    other = start_at(make_run(tmp_path, "other", [make_case("other-0a1b2c3d4e5f", image_s=[0.5] * 3)]),
                     "2026-12-01T11:00:00+00:00")
    code, output = invoke("history", root, other, "--gate")  # not "not enough history" and a pass
    assert code == 2
    assert (f"The gate looks at the newest run, and every usable run before it is of another scenario (ci), without "
            f"a case key in common with {other} (ci).") in output


def test_an_order_given_against_the_start_times_warns_in_one_line_on_stderr(history_of, monkeypatch):
    # As when the command runs, with logging unconfigured: a warning is printed as its message alone, on stderr.
    monkeypatch.setattr(logging.getLogger("flux2bench.history"), "propagate", False)
    root = history_of([1.0] * 12)
    runs = [root / f"ci-{i:02d}" for i in range(1, 13)]
    listed = CliRunner().invoke(app, ["history", *map(str, runs), "--order", "given", "--gate"])
    assert listed.exit_code == 0 and listed.stderr == ""
    reversed_ = CliRunner().invoke(app, ["history", *map(str, runs[::-1]), "--order", "given", "--gate", "--newest",
                                         "2"])
    assert reversed_.exit_code == 0  # --order given exists for clocks that cannot be trusted: no error
    [line] = reversed_.stderr.splitlines()
    assert line == (f"warning: --order given contradicts the runs' start times (run.json created_at) at 11 places: "
                    f"{runs[10]} (started 2026-12-01T10:11:00+00:00) is listed after {runs[11]} (started "
                    f"2026-12-01T10:12:00+00:00); the newest as listed is {runs[0]}, by start time {runs[11]}")
    assert "warning" not in reversed_.stdout


def test_history_md_html_and_json_link_every_run_and_mark_the_change_point(history_of, tmp_path):
    root = history_of([1.0] * 8 + [1.03] * 4)
    out = tmp_path / "out"
    code, _ = invoke("history", root, "--out", out, "--json", tmp_path / "history.json")
    assert code == 0
    markdown = (out / "history.md").read_text()
    assert [f"../history/ci-{i:02d}" for i in range(1, 13)] == re.findall(r"\]\((\.\./history/ci-\d\d)\)",
                                                                         markdown.split("<details>")[1])
    assert "| #9 [`ci-09`](../history/ci-09) |" in markdown
    page = (out / "history.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "<script" not in page
    for i in range(1, 13):  # each point of each series links to its run directory
        assert page.count(f'"../history/ci-{i:02d}"') >= 3
    data = json.loads((tmp_path / "history.json").read_text())
    [steps] = [s for s in data["series"] if s["metric"] == "s_per_step"]
    [point] = steps["change_points"]
    assert point["run"] == 9 and point["decision"] == "regression" and point["gates"] is False
    assert data["runs"][8]["run_id"] == "ci-09" and data["exit_code"] == 0


def test_run_records_the_label_of_the_code_under_test(write_scenario, tmp_path):
    scenario = write_scenario("blocks:\n  main: {model: tiny, device: cpu}\n")
    store, _ = start_run(scenario, run_dir=tmp_path / "run", label="other-repo@1a2b3c")
    assert json.loads((store.root / "run.json").read_text())["label"] == "other-repo@1a2b3c"


@pytest.mark.parametrize("label", ["", "two\nlines"])
def test_run_refuses_a_label_that_is_not_one_line_of_text_before_making_a_run_directory(write_scenario, tmp_path,
                                                                                       label):
    scenario = write_scenario("blocks:\n  main: {model: tiny, device: cpu}\n")
    code, output = invoke("run", scenario, "--out", tmp_path / "out", "--label", label)
    assert code == 2 and "--label" in output and not (tmp_path / "out").exists()
