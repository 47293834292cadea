"""Export to pytest-benchmark's JSON format: the layout it writes, its statistics, and its own tools reading it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from flux2bench.export import benchmark_stats, to_pytest_benchmark, write_pytest_benchmark
from flux2bench.store import RunStore
from records import phase
from runs import STEP_SHARE, STEPS, make_case, make_run, with_changes

pytest_benchmark_stats = pytest.importorskip("pytest_benchmark.stats")

OK_CASE = make_case("base-ok", image_s=[1.02, 1.00, 1.05, 1.01], label="flux2 bf16 offload=none",
                    gpu="NVIDIA H100",
                    memory=dict(gpu_allocated_peak_gib=18.0, gpu_reserved_peak_gib=20.0, host_rss_peak_gib=6.0))
OTHERS = [make_case("quant-drifted", status="drift_fail", image_s=[0.8, 0.81, 0.79]),
          make_case("big-oom", status="oom", reason="CUDA out of memory"), make_case("lazy-untimed", image_s=[])]
OK, DRIFTED, OOM, UNTIMED = (record.key for record in (OK_CASE, *OTHERS))


@pytest.fixture
def run_dir(tmp_path):
    ok = with_changes(OK_CASE, memory={**OK_CASE.memory, "load": phase(host_rss_peak_gib=31.5)})
    return make_run(tmp_path, "run", [ok, *OTHERS])


@pytest.fixture
def document(run_dir):
    return to_pytest_benchmark(RunStore.open(run_dir))


def benchmark(document, key):
    return next(b for b in document["benchmarks"] if b["extra_info"]["key"] == key)


def test_the_document_has_the_layout_pytest_benchmark_writes(document):
    assert list(document) == ["machine_info", "commit_info", "benchmarks", "datetime", "version"]
    assert set(document["commit_info"]) >= {"id", "time", "author_time", "dirty", "project", "branch"}
    assert document["datetime"] == "2025-06-01T12:00:00+00:00"
    first = document["benchmarks"][0]
    assert list(first) == ["group", "name", "fullname", "params", "param", "extra_info", "options", "stats"]
    assert list(first["stats"]) == [*pytest_benchmark_stats.Stats.fields, "data", "iterations"]


def test_only_cases_that_ran_with_timed_images_become_benchmarks(document):
    assert [b["extra_info"]["key"] for b in document["benchmarks"]] == [OK, DRIFTED]


def test_benchmarks_are_named_by_their_stable_case_key(document):
    ok = benchmark(document, OK)
    assert ok["name"] == f"{OK}[flux2 bf16 offload=none]"
    assert ok["fullname"] == f"scenarios/ci.yaml::{ok['name']}"
    assert ok["group"] == "base"


def test_stats_are_the_seconds_per_image(document):
    stats = benchmark(document, OK)["stats"]
    assert stats["data"] == [1.02, 1.00, 1.05, 1.01]
    assert (stats["rounds"], stats["iterations"], stats["min"], stats["max"]) == (4, 1, 1.00, 1.05)
    assert stats["median"] == pytest.approx(1.015)


def test_memory_peaks_and_seconds_per_step_are_in_extra_info(document):
    extra = benchmark(document, OK)["extra_info"]
    assert extra["inference_gpu_reserved_peak_gib"] == 20.0
    assert extra["load_host_rss_peak_gib"] == 31.5
    assert extra["inference_gpu_device_peak_gib"] is None  # not measured
    assert extra["s_per_step"] == pytest.approx(1.015 * STEP_SHARE / STEPS)
    assert extra["status"] == "ok"
    assert extra["gpu"] == "NVIDIA H100"  # each case's own: a resumed run may span several GPU models


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 20])
def test_stats_equal_pytest_benchmarks_own_computation(n):
    samples = (1.0 + np.random.default_rng(n).lognormal(0.0, 0.3, n)).tolist()
    theirs = pytest_benchmark_stats.Stats()
    for sample in samples:
        theirs.update(sample)
    assert benchmark_stats(samples) == {**theirs.as_dict(), "data": samples, "iterations": 1}


def test_pytest_benchmarks_compare_command_reads_the_export(run_dir, tmp_path, monkeypatch, capsys):
    cli = pytest.importorskip("pytest_benchmark.cli")
    out = write_pytest_benchmark(run_dir, tmp_path / "export" / "bench.json")
    monkeypatch.setattr(sys, "argv", ["pytest-benchmark", "compare", str(out), "--columns=min,median,rounds"])
    cli.main()
    table = capsys.readouterr().out
    assert f"{OK}[flux2 bf16 offload=none]" in table and DRIFTED in table


def test_write_pytest_benchmark_writes_json_and_refuses_a_missing_run(run_dir, tmp_path, document):
    out = write_pytest_benchmark(run_dir, tmp_path / "bench.json")
    assert json.loads(out.read_text()) == document
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        write_pytest_benchmark(tmp_path / "nowhere", tmp_path / "other.json")


def test_write_pytest_benchmark_from_python_writes_into_no_run_directory_but_its_own_file(run_dir):
    with pytest.raises(ValueError, match=f"output {run_dir / 'run.json'}: is a file of the run directory {run_dir}"):
        write_pytest_benchmark(run_dir, run_dir / "run.json")
    with pytest.raises(ValueError, match=f"the run directory {run_dir}; write elsewhere"):
        write_pytest_benchmark(run_dir, run_dir / "notes" / "new.json")
    assert write_pytest_benchmark(run_dir, run_dir / "pytest-benchmark.json").is_file()
