"""Nothing flux2bench writes lands outside the run directory and the cache: a hard link or a symbolic link at a name
it writes is replaced, never written through; no output a command is asked for goes into a run directory (one it was
given or any other); a lock is never opened through a link; workers take no internal variable from the caller's
environment; the fork server leaves no file outside the run directory."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flux2bench.artifact_cache import ArtifactCache
from flux2bench.cli import app
from flux2bench.child_env import INTERNAL
from flux2bench.runner import Runner, SupervisorConfig, start_run
from flux2bench.safe_files import UnsafeTarget, write_atomic
from flux2bench.store import RunDirError, RunStore
from flux2bench.supervision.process import Workers
from runs import make_case, make_run

VICTIM_TEXT = "a file that is not the run's"
ONE_CASE = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0, timeout_s: 120,
           prompts: "FAULT:none", drift_baseline: "off"}
blocks:
  only: {}
"""


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path, "run", [make_case("main-1", image_s=[1.0, 1.1, 0.9],
                                                memory={"gpu_device_peak_gib": 2.0})])


def hard_link(victim: Path, name: Path) -> Path:
    name.parent.mkdir(parents=True, exist_ok=True)
    os.link(victim, name)
    return name


def written_apart(victim: Path, name: Path) -> bool:
    """The victim kept its content and its one name; ``name`` is a file of its own."""
    return (victim.read_text() == VICTIM_TEXT and victim.stat().st_nlink == 1 and not name.is_symlink()
            and not name.samefile(victim))


@pytest.mark.parametrize("name", ["report.md", "report.html", "report.csv"])
def test_a_report_over_a_hard_link_is_a_new_file_and_the_linked_file_keeps_its_content(run_dir, victim, name):
    target = hard_link(victim, run_dir / name)
    assert invoke("report", run_dir)[0] == 0
    assert written_apart(victim, target) and target.read_text() != VICTIM_TEXT


@pytest.mark.parametrize("command", [["export", "{run}", "--output", "{out}"],
                                     ["compare", "{run}", "{run}", "--json", "{out}"],
                                     ["compare", "{run}", "{run}", "--markdown", "{out}"]])
def test_an_output_named_by_an_option_is_never_written_through_a_hard_link(run_dir, victim, tmp_path, command):
    out = hard_link(victim, tmp_path / "verdict" / "out.txt")
    code, output = invoke(*[part.format(run=run_dir, out=out) for part in command])
    assert code == 0, output
    assert written_apart(victim, out) and out.read_text() != VICTIM_TEXT


@pytest.fixture
def other_run(tmp_path) -> Path:
    """A run directory that no command below is given: only a path under it is."""
    return make_run(tmp_path, "other", [make_case("main-2", image_s=[2.0, 2.1, 1.9],
                                                  memory={"gpu_device_peak_gib": 3.0})])


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("command, target, says", [
    (["export", "{run}", "--output"], "run.json", "is a file of the run directory"),
    (["export", "{run}", "--output"], "results/{key}.json", "is a file of the run directory"),
    (["export", "{run}", "--output"], "pytest-benchmark.json", "is inside the run directory"),
    (["compare", "{run}", "{run}", "--json"], "run.json", "is a file of the run directory"),
    (["compare", "{run}", "{run}", "--markdown"], "results/{key}.json", "is a file of the run directory"),
    (["compare", "{run}", "{run}", "--json"], "verdict.json", "is inside the run directory"),
    (["history", "{run}", "--json"], "run.json", "is a file of the run directory"),
    (["history", "{run}", "--out"], "pages", "is inside the run directory"),
], ids=["export-run-json", "export-record", "export-its-own-name", "compare-json-run-json", "compare-markdown-record",
        "compare-json-new-file", "history-json-run-json", "history-out-folder"])
def test_no_output_goes_into_a_run_directory_the_command_was_not_given(run_dir, other_run, command, target, says):
    """The run directory is recognised by its run.json, whether or not the command was given it."""
    out = other_run / target.format(key=make_case("main-2").key)
    before = snapshot(other_run)
    code, output = invoke(*[part.format(run=run_dir) for part in command], out)
    assert code == 2 and f"{out}: {says} {other_run}; write elsewhere" in output, output
    assert output.count("error:") == 1 and "Traceback" not in output
    assert snapshot(other_run) == before and not (other_run / "pages").exists()


def test_a_command_still_writes_where_it_is_meant_to_in_its_own_run_directory(run_dir):
    assert invoke("report", run_dir)[0] == 0 and (run_dir / "report.md").is_file()
    assert invoke("export", run_dir, "--output", run_dir / "pytest-benchmark.json")[0] == 0
    assert invoke("export", run_dir)[0] == 0 and (run_dir / "pytest-benchmark.json").is_file()


def test_a_symbolic_link_at_a_written_name_is_replaced_and_a_folder_or_fifo_refused(tmp_path, victim):
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    write_atomic(link, "{}")
    assert not link.is_symlink() and link.read_text() == "{}" and victim.read_text() == VICTIM_TEXT
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "folder", "{}")
    with pytest.raises(UnsafeTarget, match="not a regular file"):
        write_atomic(tmp_path / "fifo", "{}")  # refused at once: nothing waits on a reader


def test_a_report_whose_name_is_a_fifo_is_refused_with_one_line_and_exit_2(run_dir):
    os.mkfifo(run_dir / "report.md")
    code, output = invoke("report", run_dir)
    assert code == 2 and "report.md" in output and "not a regular file" in output and "Traceback" not in output


@pytest.mark.parametrize("make_link", [os.symlink, os.link], ids=["symlink", "hard-link"])
def test_the_run_directory_lock_is_never_opened_through_a_link(run_dir, victim, make_link):
    make_link(victim, run_dir / ".lock")
    with pytest.raises(RunDirError, match="lock"):
        with RunStore(run_dir).locked():
            pass
    assert victim.read_text() == VICTIM_TEXT


@pytest.mark.parametrize("make_link", [os.symlink, os.link], ids=["symlink", "hard-link"])
def test_a_poisoned_cache_lock_truncates_nothing_and_the_cache_says_so_once(tmp_path, victim, make_link):
    warnings: list[str] = []
    cache = ArtifactCache(tmp_path / "cache", warn=warnings.append)
    artifact = tmp_path / "run" / "embeddings" / "e.safetensors"
    lock = cache.root / "locks" / f"{cache._hash(cache.identity('text_encoder', artifact))[:32]}.lock"
    make_link(victim, lock)
    for _ in range(2):
        with cache.lock("text_encoder", artifact):
            pass
    assert victim.read_text() == VICTIM_TEXT
    assert len(warnings) == 1 and "lock" in warnings[0] and "goes on without it" in warnings[0]


def test_workers_never_inherit_the_callers_internal_variables(tmp_path, monkeypatch):
    for name in INTERNAL:
        monkeypatch.setenv(name, str(tmp_path / "planted"))
    env = Workers(RunStore(tmp_path))._environment(None, 1, None)
    assert {name: env.get(name) for name in INTERNAL} == {
        "FLUX2BENCH_EVENTS_FD": None, "FLUX2BENCH_RUNNER_PID": str(os.getpid()), "FLUX2BENCH_SPAWNED_AT": None,
        "FLUX2BENCH_CGROUP": None, "FLUX2BENCH_FORK_SERVER_LOG": None,
        "FLUX2BENCH_ARTIFACT_CACHE": str(tmp_path / "compile-cache" / "artifacts")}


@pytest.fixture
def logged_run(tmp_path, fault_worker, victim, monkeypatch):
    """One forked case whose log and timeline names were hard links to a file outside, run with the internal
    variables planted in the caller's environment (a cgroup that does not exist, a log file elsewhere)."""
    monkeypatch.setenv("FLUX2BENCH_CGROUP", str(tmp_path / "no-such-cgroup"))
    monkeypatch.setenv("FLUX2BENCH_FORK_SERVER_LOG", str(tmp_path / "planted-fork-server.log"))
    scenario = tmp_path / "one.yaml"
    scenario.write_text(textwrap.dedent(ONE_CASE))
    store, cases = start_run(scenario, run_dir=tmp_path / "run")
    links = [hard_link(victim, store.root / "logs" / f"{cases[0].key}.log"),
             hard_link(victim, store.root / "timelines" / f"{cases[0].key}.csv")]
    before = set(Path(tempfile.gettempdir()).iterdir())
    (result,) = Runner(store, SupervisorConfig(worker_module=fault_worker)).run(cases)
    return store, result, links, set(Path(tempfile.gettempdir()).iterdir()) - before


def test_a_worker_log_and_timeline_over_hard_links_leave_the_linked_file_as_it_was(logged_run, victim):
    _, result, links, _ = logged_run
    assert result.status == "ok", result.reason
    assert all(written_apart(victim, link) for link in links if link.exists())
    assert result.wall_split.worker_start == "fork-server", logged_run[0].meta.get("fork_server")


def test_a_planted_cgroup_or_log_variable_reaches_no_worker_and_no_file(logged_run, tmp_path):
    _, result, _, _ = logged_run
    assert result.status == "ok" and "cgroup" not in (result.setup.axes.get("ram_cap") or {})
    assert not (tmp_path / "planted-fork-server.log").exists()


def test_the_fork_servers_output_is_kept_in_the_run_directory_and_nothing_in_tmpdir(logged_run):
    store, _, _, new_in_tmpdir = logged_run
    assert (store.root / "logs" / "fork-server.log").is_file()
    assert not [path for path in new_in_tmpdir if "flux2bench" in path.name]
