"""Records and run.json are read back as user input: a record of the wrong types, of a model or batch no scenario
makes, or a case that ran without its timings, is set aside with its reason by ``report``, ``export`` and ``run
--resume`` (``compare`` cannot compare it), never an internal error; a damaged run.json (wrong types, a size that is
not a finite number above zero, a start that is no ISO 8601 time) is one line and exit 2; a record set aside never
replaces another."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.store import RunStore
from runs import make_case, make_run

MAIN = make_case("main-1", image_s=[1.0, 1.02, 0.98], memory={"gpu_device_peak_gib": 13.0})
OTHER = make_case("other-1", image_s=[2.0, 2.02, 1.98], memory={"gpu_device_peak_gib": 13.0})


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result.exit_code, " ".join(result.output.split())


def setting(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets the field at ``path`` (dotted) of a record or run.json."""
    *parents, last = path.split(".")

    def edit(data: dict[str, Any]) -> None:
        for part in parents:
            data = data[int(part)] if isinstance(data, list) else data[part]
        data[last] = value

    return edit


WRONG = {  # edit, what the reason names
    "status-a-number": (setting("status", 5), "status: Input should be 'ok'"),
    "peak-a-string": (setting("memory.inference.gpu_device_peak_gib.value", "13.0"),
                      "memory.inference.gpu_device_peak_gib.value: Input should be a valid number"),
    "latency-a-string": (setting("latency", "fast"), "latency: Input should be"),
    "gpu-a-number": (setting("setup.gpu", 5), "setup.gpu: Input should be a valid string"),
    "seeds-a-number": (setting("case.seeds", 5), "case: 'int' object is not iterable"),
    "unknown-model": (setting("case.model", "flux3-max"), "case: field 'model': Input should be 'flux2-dev'"),
    "batch-size-0": (setting("case.batch_size", 0), "case: field 'batch_size': Input should be greater than or equal to 1"),
    "width-a-string": (setting("case.width", "64"), "case: field 'resolution'"),
    "not-an-object": (lambda record: record.clear() or record.update(case=[]), "case: a JSON object"),
    "ok-without-timings": (setting("latency", None), "latency: a case with status ok was timed; this record has no "
                                                     "timings"),
    "schema-of-a-later-version": (setting("schema_version", 99), "schema_version: 99 is not a record this version "
                                                                 "of flux2bench reads (1 to 1)"),
    "started-yesterday": (setting("started_at", "yesterday"), "started_at: 'yesterday' is not an ISO 8601 time"),
    "a-rank-of-a-one-gpu-case": (setting("ranks", [{"rank": 1, "gpu": None, "status": "ok"}]),
                                 "ranks: rank 1 is not one of its case's 1 GPU(s) once"),
    # what an axis wrote into the setup, where the report reads it
    "compile-a-string": (setting("setup.compile", "regional"), "setup.compile: Input should be a valid dictionary"),
    "compile-counters-a-number": (setting("setup.compile", {"cache_counters": 7}),
                                  "setup.compile.cache_counters: Input should be a valid dictionary"),
    "compile-counter-negative": (setting("setup.compile", {"cache_counters": {"over_recompile_limit": -4}}),
                                 "setup.compile.cache_counters.over_recompile_limit: Input should be greater than or "
                                 "equal to 0"),
    "compile-timer-nan": (setting("setup.compile", {"events": {"timers_s": {"compile_s": float("nan")}}}),
                          "setup.compile.events.timers_s.compile_s: Input should be a finite number"),
    "compile-events-a-list": (setting("setup.compile", {"events": [1, 2]}),
                              "setup.compile.events: Input should be a valid dictionary"),
    "uncacheable-graphs-a-string": (setting("setup.compile_cache", {"not_cacheable": {"graphs": "2", "why": "x"}}),
                                    "setup.compile_cache.not_cacheable.graphs: Input should be a valid integer"),
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path, "run", [MAIN, OTHER])


def damage(run_dir: Path, name: str) -> Path:
    path = run_dir / "results" / f"{MAIN.key}.json"
    record = json.loads(path.read_text())
    WRONG[name][0](record)
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("name", WRONG)
def test_report_and_export_set_a_wrong_record_aside_with_its_reason(run_dir, name):
    damage(run_dir, name)
    reason = WRONG[name][1]
    code, output = invoke("report", run_dir)
    assert code == 0, output
    assert f"results/{MAIN.key}.json ({reason}" in (run_dir / "report.md").read_text()
    code, output = invoke("export", run_dir)
    assert code == 0 and reason in output, output
    assert [b["extra_info"]["key"] for b in json.loads((run_dir / "pytest-benchmark.json").read_text())[
        "benchmarks"]] == [OTHER.key]


@pytest.mark.parametrize("name", ["unknown-model", "batch-size-0", "peak-a-string"])
def test_compare_cannot_compare_a_wrong_record_and_names_it(run_dir, tmp_path, name):
    record = damage(run_dir, name)
    code, output = invoke("compare", make_run(tmp_path, "baseline", [MAIN, OTHER]), run_dir)
    assert code == 2 and f"cannot compare: current run: unreadable result record {record}: {WRONG[name][1]}" in output


def test_an_invalid_record_set_aside_twice_keeps_both_with_their_reasons(run_dir):
    store = RunStore(run_dir)
    damage(run_dir, "unknown-model")
    first = store.set_aside_invalid()
    (run_dir / "results" / f"{MAIN.key}.json").write_text(MAIN.to_json())
    damage(run_dir, "batch-size-0")
    second = store.set_aside_invalid()
    kept = sorted((run_dir / "invalid").glob("*.json"))
    assert [p.name for p in kept] == [f"{MAIN.key}-2.json", f"{MAIN.key}.json"]
    assert list(first) == [run_dir / "invalid" / f"{MAIN.key}.json"]
    assert list(second) == [run_dir / "invalid" / f"{MAIN.key}-2.json"]
    assert "flux3-max" in json.loads(kept[1].read_text())["case"]["model"]
    assert "model" in (run_dir / "invalid" / f"{MAIN.key}.reason").read_text()
    assert "batch_size" in (run_dir / "invalid" / f"{MAIN.key}-2.reason").read_text()
    assert set(store.records().valid) == {OTHER.key}


RUN_JSON = {  # edit of run.json, what the one line names
    "case-keys-text": (setting("case_keys", "main-1"), "case_keys: Input should be a valid list"),
    "environment-a-list": (setting("environment", []), "environment: Input should be a valid dictionary"),
    "versions-numbers": (setting("environment.versions", {"torch": 2.7}), "environment.versions.torch"),
    "fork-server-text": (setting("fork_server", [{"imports_s": "slow"}]), "fork_server.0.imports_s"),
    "negative-import": (setting("fork_server", [{"imports_s": -1.0}]), "fork_server.0.imports_s"),
    "nodes-a-list": (setting("nodes", []), "nodes: Input should be a valid dictionary"),
    # the machine's sizes bound the records' peaks, and tell hosts apart: each a finite number above zero
    "host-ram-infinite": (setting("environment.host_ram_gib", float("inf")),
                          "environment.host_ram_gib: Input should be a finite number"),
    "host-ram-a-string": (setting("environment.host_ram_gib", "125.8"),
                          "environment.host_ram_gib: Input should be a valid number"),
    "card-nan": (setting("environment.gpus.0.memory_gib", float("nan")),
                 "environment.gpus.0.memory_gib: Input should be a finite number"),
    "card-negative": (setting("environment.gpus.0.memory_gib", -1), "environment.gpus.0.memory_gib: Input should be "
                                                                    "greater than 0"),
    "card-zero": (setting("environment.gpu_memory_gib", 0),
                  "environment.gpu_memory_gib: Input should be greater than 0"),
    "resumed-host-ram-zero": (setting("resumed", [{"environment": {"host_ram_gib": 0.0}}]),
                              "resumed.0.environment.host_ram_gib: Input should be greater than 0"),
    "created-at-yesterday": (setting("created_at", "yesterday"), "created_at: 'yesterday' is not an ISO 8601 time"),
    # the host's measured bandwidth, which the report's "why" section divides by
    "bandwidth-a-string": (setting("environment.host_to_device", "fast"),
                           "environment.host_to_device: Input should be a valid dictionary"),
    "pinned-bandwidth-nan": (setting("environment.host_to_device", {"pinned_gib_s": float("nan")}),
                             "environment.host_to_device.pinned_gib_s: Input should be a finite number"),
    "pinned-bandwidth-a-string": (setting("environment.host_to_device", {"pinned_gib_s": "x"}),
                                  "environment.host_to_device.pinned_gib_s: Input should be a valid number"),
    "pageable-sample-negative": (setting("environment.host_to_device", {"pageable_samples_gib_s": [1.0, -1e-300]}),
                                 "environment.host_to_device.pageable_samples_gib_s.1: Input should be greater than 0"),
}


@pytest.mark.parametrize("command", ["report", "export", "compare", "resume"])
@pytest.mark.parametrize("name", RUN_JSON)
def test_a_run_json_of_wrong_types_is_one_line_and_exit_2(run_dir, name, command):
    path = run_dir / "run.json"
    meta = json.loads(path.read_text())
    RUN_JSON[name][0](meta)
    path.write_text(json.dumps(meta))
    args = {"report": ["report", run_dir], "export": ["export", run_dir], "compare": ["compare", run_dir, run_dir],
            "resume": ["run", "--resume", run_dir]}[command]
    code, output = invoke(*args)
    assert code == 2, output
    assert f"{path}: invalid run description: {RUN_JSON[name][1]}" in output
    assert output.count("error:") == 1 and "Traceback" not in output
