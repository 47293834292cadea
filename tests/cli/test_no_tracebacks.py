"""No input or environment problem ends in a traceback: one line naming the file and what is wrong, the documented
exit code, and what was already written left intact. A defect of flux2bench is one line, a log and exit code 4."""

from __future__ import annotations

import errno
import gzip
import os
import textwrap

import pytest
from typer.testing import CliRunner

from flux2bench import cli, scenario
from flux2bench.drift import compare_outputs
from flux2bench.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL
from flux2bench.runner import Runner
from flux2bench.scenario import ScenarioError, load_cases
from records import gradient_image, result, save_outputs, write_run, write_timeline

TINY = "defaults: {model: tiny, device: cpu, resolution: 64, steps: 1}\nblocks:\n  main: {}\n"


def invoke(*args) -> tuple[int, str]:
    outcome = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert outcome.exc_info is None or outcome.exc_info[0] is SystemExit, outcome.exc_info
    return outcome.exit_code, " ".join(outcome.output.split())


def test_an_unexpected_error_is_one_line_a_log_with_the_traceback_and_exit_4(tmp_path, monkeypatch,
                                                                             write_scenario):
    monkeypatch.setenv("FLUX2BENCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(scenario, "load_cases", lambda *a, **k: {}["a defect"])
    code, output = invoke("plan", write_scenario(TINY))
    assert code == EXIT_INTERNAL and "Traceback" not in output
    [log] = (tmp_path / "logs").iterdir()
    assert f"internal error (KeyError: 'a defect'); the traceback is in {log}" in output
    assert "Traceback" in log.read_text() and "load_cases" in log.read_text()


@pytest.mark.parametrize("args, says", [
    (["report", ".", "--no-such-option"], "No such option: --no-such-option"),
    (["compare", "."], "Missing argument"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["plan", ".", "--max-cases", "many"], "Invalid value for '--max-cases'"),
    (["history", ".", "--newest", "0"], "Invalid value for '--newest'"),
])
def test_a_misused_command_exits_2_with_its_usage_and_writes_no_crash_log(tmp_path, monkeypatch, args, says):
    monkeypatch.setenv("FLUX2BENCH_LOG_DIR", str(tmp_path / "logs"))
    code, output = invoke(*args)
    assert (code, "internal error" in output, "Traceback" in output) == (EXIT_BAD_INPUT, False, False)
    assert says in output and "Usage: " in output
    assert not (tmp_path / "logs").exists()


@pytest.fixture
def resumable(tmp_path, write_scenario, monkeypatch):
    """A run directory whose case never ran (the runner is replaced by one that runs nothing)."""
    monkeypatch.setattr(Runner, "run", lambda self, cases, measure=True: [])
    invoke("run", write_scenario(TINY), "--out", tmp_path / "out", "--no-report")
    return next((tmp_path / "out").iterdir())


def test_a_report_that_cannot_be_written_says_so_and_the_run_keeps_its_exit_code(resumable, monkeypatch):
    import flux2bench.report

    def full(run_dir, **options):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "report.html"))

    monkeypatch.setattr(flux2bench.report, "build_report", full)
    code, output = invoke("run", "--resume", resumable)
    assert code == EXIT_FAILED  # the run's own: its case has no result
    assert f"the report could not be written ({resumable / 'report.html'}: No space left on device)" in output


def test_a_record_that_cannot_be_written_exits_2_naming_the_file(resumable, monkeypatch):
    def read_only(self, cases, measure=True):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.store.root / "results" / "x.json"))

    monkeypatch.setattr(Runner, "run", read_only)
    code, output = invoke("run", "--resume", resumable)
    assert code == EXIT_BAD_INPUT and "Traceback" not in output
    assert f"{resumable / 'results' / 'x.json'}: Read-only file system" in output


@pytest.mark.parametrize("content", [b"garbage, not gzip", b"\x1f\x8b\x08\x00truncated"])
def test_a_garbage_or_truncated_timeline_skips_its_plot_with_the_reason(tmp_path, content):
    record = write_timeline(tmp_path / "run", result(memory=None))
    write_run(tmp_path / "run", [record])
    (tmp_path / "run" / record.timeline).write_bytes(content)
    code, output = invoke("report", tmp_path / "run", "--timeline-case", record.key)
    assert code == 0 and "Traceback" not in output
    assert f"{tmp_path / 'run' / record.timeline} is unreadable" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("row, problem", [
    ("1e308,inference,1.0,1.0,1.0,0.0", "row 1: t_s 1e+308 is not in [0, 180]"),
    ("0.5,inference,1.0,-3,1.0,0.0", "row 1: rss_gib -3 is not in [0, inf]"),
    ("0.5,inference,inf,1.0,1.0,0.0", "row 1: gpu_used_gib inf is not in [-inf, inf]"),
    ("0.5,inference,1.0,lots,1.0,0.0", "row 1: rss_gib 'lots' is not in [0, inf]"),
])
def test_a_timeline_with_values_no_sampler_writes_skips_its_plot_naming_the_row(tmp_path, row, problem):
    record = write_timeline(tmp_path / "run", result(memory=None))
    write_run(tmp_path / "run", [record])
    with gzip.open(tmp_path / "run" / record.timeline, "wt") as f:
        f.write(f"t_s,phase,gpu_used_gib,rss_gib,anon_gib,file_gib\n{row}\n")
    code, output = invoke("report", tmp_path / "run", "--timeline-case", record.key)
    assert code == 0 and "Traceback" not in output
    assert (f"{tmp_path / 'run' / record.timeline} is not a memory timeline ({problem})"
            in (tmp_path / "run" / "report.md").read_text())


@pytest.mark.parametrize("damage", ["image", "latents"])
def test_a_damaged_baseline_output_leaves_drift_unmeasured_naming_the_file(tmp_path, damage):
    images = [gradient_image()] * 4
    import torch

    latents = [torch.ones(4, 8, 8)] * 4
    baseline = save_outputs(tmp_path, result(), images, latents)
    variant = save_outputs(tmp_path, result(precision="fp8"), images, latents)
    for output in baseline.outputs:
        (tmp_path / getattr(output, damage)).write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    drift = compare_outputs(tmp_path, variant, baseline)
    metric = drift.metrics["psnr" if damage == "image" else "latent_cosine"]
    assert metric.value is None
    assert metric.reason.startswith(f"damaged {damage} in the run directory: ")
    assert str(tmp_path / getattr(baseline.outputs[0], damage)) in metric.reason  # the first pair's


def test_gate_rules_that_are_not_utf8_exit_2_naming_the_file(tmp_path):
    run = write_run(tmp_path / "run", [result()])
    rules = tmp_path / "gate.yaml"
    rules.write_bytes(b"defaults:\n  s_per_image: {threshold: 0.1}  # \xff\xfe\n")
    code, output = invoke("compare", run, run, "--rules", rules)
    assert code == EXIT_BAD_INPUT and f"cannot read gate rules {rules}: not UTF-8" in output


def _fifo(path):
    os.mkfifo(path)
    return path


def _loop(path):
    path.symlink_to(path)
    return path


def _directory(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("make, problem", [(_fifo, "is not a regular file"), (_loop, "cannot be read"),
                                           (lambda path: "/dev/zero", "is not a regular file"),
                                           (_directory, "is a directory, not a scenario file")],
                         ids=["fifo", "symlink-loop", "dev-zero", "directory"])
def test_the_scenario_loader_refuses_what_is_not_a_regular_file_without_hanging(tmp_path, make, problem):
    path = make(tmp_path / "scenario.yaml")
    with pytest.raises(ScenarioError, match=problem):
        load_cases(path)


@pytest.mark.parametrize("key", ["null", "1.5", "2024-01-01", "[a, b]", "? {a: 1}"])
def test_a_block_name_that_is_not_text_is_a_scenario_error(write_scenario, key):
    path = write_scenario(textwrap.dedent(f"""
        blocks:
          {key}: {{model: tiny}}
    """))
    with pytest.raises(ScenarioError, match="not text|must be text"):
        load_cases(path)
