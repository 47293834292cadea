"""Nothing in a run directory can redirect a write outside it, no command writes over a file of a run directory
it does not own, and runs started at once never share a directory."""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.compare import CompareError, load_run
from flux2bench.store import RunDirError, RunStore
from runs import make_case, make_run


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


RECORD = make_case("main-1", image_s=[1.0, 1.1, 0.9])
KEY = RECORD.key


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path, "run", [RECORD])


@pytest.fixture
def outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("not the run's")
    return victim


@pytest.mark.parametrize("name", [".lock", "run.json", "scenario.yaml", f"results/{KEY}.json", "timelines"])
def test_a_run_directory_holding_a_link_is_refused_and_the_links_target_untouched(run_dir, outside, name):
    path = run_dir / name
    if path.exists():
        path.unlink()
    path.parent.mkdir(exist_ok=True)
    path.symlink_to(outside)
    with pytest.raises(RunDirError, match=f"{path} is a link"):
        RunStore.open(run_dir)
    code, output = invoke("run", "--resume", run_dir)
    assert code == 2 and f"{path} is a link" in output and "Traceback" not in output
    assert outside.read_text() == "not the run's"


def test_a_temporary_linked_elsewhere_is_replaced_not_written_through(run_dir, outside):
    (run_dir / ".run.json.tmp").symlink_to(outside)
    store = RunStore(run_dir)
    store.update_meta({**store.meta, "note": "rewritten"})
    assert outside.read_text() == "not the run's"
    assert not (run_dir / "run.json").is_symlink() and store.meta["note"] == "rewritten"
    assert not (run_dir / ".run.json.tmp").exists()


def test_the_lock_file_is_never_opened_through_a_link(run_dir, outside):
    (run_dir / ".lock").symlink_to(outside)
    with pytest.raises(RunDirError, match="lock"):
        with RunStore(run_dir).locked():
            pass
    assert outside.read_text() == "not the run's"


@pytest.mark.parametrize("name, kind", [("results", "file"), ("tmp", "file"), (".lock", "folder")])
def test_a_folder_where_a_file_belongs_or_the_reverse_is_refused_naming_it(run_dir, name, kind):
    path = run_dir / name
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    path.write_text("") if kind == "file" else path.mkdir()
    code, output = invoke("run", "--resume", run_dir)
    assert code == 2 and str(path) in output and "Traceback" not in output


@pytest.mark.parametrize("command", [["export", "{run}", "--output", "{run}/run.json"],
                                     ["export", "{run}", "--output", f"{{run}}/results/{KEY}.json"],
                                     ["compare", "{run}", "{run}", "--json", "{run}/run.json"],
                                     ["compare", "{run}", "{run}", "--markdown", "{run}/results/new.md"]])
def test_no_command_writes_over_a_file_of_a_run_directory_it_does_not_own(run_dir, command):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, output = invoke(*[part.format(run=run_dir) for part in command])
    assert code == 2 and "is a file of the run directory" in output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_export_still_writes_its_own_file_in_the_run_directory_twice(run_dir):
    assert invoke("export", run_dir)[0] == 0
    assert invoke("export", run_dir)[0] == 0
    assert json.loads((run_dir / "pytest-benchmark.json").read_text())["benchmarks"]


def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path):
    barrier = threading.Barrier(8)
    made, failed = [], []

    def start():
        barrier.wait()
        try:
            made.append(RunStore.create_unique(tmp_path, "ci-20260101-000000", {"case_keys": []}).root)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            failed.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed and len(set(made)) == 8
    assert {RunStore(root).meta["run_id"] for root in made} == {root.name for root in made}


def test_a_record_nested_too_deeply_is_set_aside_like_any_invalid_record(run_dir):
    (run_dir / "results" / "main-2.json").write_text("[" * 100_000 + "]" * 100_000)
    records = RunStore(run_dir).records()
    assert set(records.valid) == {KEY}
    assert "nested too deeply" in records.invalid[run_dir / "results" / "main-2.json"]
    for command in (["report", run_dir], ["export", run_dir]):
        code, output = invoke(*command)
        assert code == 0 and "Traceback" not in output, output


def test_compare_refuses_a_record_whose_key_is_not_its_file_name_as_run_does(run_dir):
    (run_dir / "results" / f"{KEY}.json").rename(run_dir / "results" / "main-9.json")
    assert "is not its file name" in RunStore(run_dir).records().invalid[run_dir / "results" / "main-9.json"]
    with pytest.raises(CompareError, match="is not its file name"):
        load_run(run_dir, "baseline")


def test_a_write_that_fails_on_a_full_disk_leaves_no_temporary_and_the_old_file_whole(run_dir, monkeypatch):
    import errno
    import os

    before = (run_dir / "run.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    store = RunStore(run_dir)
    with pytest.raises(OSError, match="No space left"):
        store.update_meta({**store.meta, "note": "lost"})
    assert (run_dir / "run.json").read_bytes() == before
    assert not (run_dir / ".run.json.tmp").exists()


def test_a_file_sent_back_from_a_node_is_never_written_through_a_link(run_dir, outside):
    store, timelines = RunStore(run_dir), run_dir / "timelines"
    timelines.mkdir(exist_ok=True)
    (timelines / "main-1.csv").symlink_to(outside)
    store.put_file("timelines/main-1.csv", b"t_s,phase\n")
    assert not (timelines / "main-1.csv").is_symlink()
    for refused in ("../escaped.csv", "run.json", "timelines/.."):
        with pytest.raises(ValueError):
            store.put_file(refused, b"")
    run_json = (run_dir / "run.json").read_bytes()
    (timelines / "main-2.csv").symlink_to(run_dir / "run.json")  # a link inside the run directory is replaced
    written = store.put_file("timelines/main-2.csv", b"t_s,phase\n")
    assert not (timelines / "main-2.csv").is_symlink() and (timelines / "main-2.csv").read_bytes() == b"t_s,phase\n"
    assert outside.read_text() == "not the run's" and (run_dir / "run.json").read_bytes() == run_json
    assert written == store.path("timelines/main-2.csv") and not (run_dir.parent / "escaped.csv").exists()
