"""The wall-time split of each case and the GPU-seconds held per timed GPU-second."""

from __future__ import annotations

import pandas as pd
import pytest

from flux2bench.metrics import BY_NAME
from flux2bench.overhead import (WorkerStart, complete, gpu_s_per_timed_s, run_overhead, worker_split,
                                 worker_starts)
from flux2bench.report import build_report
from flux2bench.results import Latency, WallSplit
from records import result, write_run

TOLERANCE_S = 1e-6


@pytest.fixture(scope="module")
def split_run(tiny_run):
    """The session's shared tiny run: its block ``split`` has prompt embeddings precomputed in a worker of their own,
    a warm-up and two timed images of two steps at 64x64 (conftest's TINY_RUN)."""
    return tiny_run


@pytest.fixture(scope="module")
def split(split_run) -> WallSplit:
    record = split_run["split"]
    assert record.status == "ok", f"{record.reason}\n{record.error}"
    return record.wall_split


def test_every_part_of_the_wall_is_recorded_and_none_is_negative(split):
    for part in ("artifacts_s", "worker_wall_s", *WallSplit.PARTS):
        value = getattr(split, part)
        assert value is not None and value >= 0, (part, value)
    assert split.process_start_s > 0 and split.imports_s > 0 and split.load_s > 0 and split.timed_s > 0
    assert split.cuda_init_s < 0.01  # on the CPU there is no context to create


def test_the_parts_add_up_to_the_worker_wall_the_runner_measured(split):
    parts = sum(getattr(split, part) for part in WallSplit.PARTS)
    assert parts == pytest.approx(split.worker_wall_s, abs=TOLERANCE_S)
    measured = parts - split.other_s
    assert measured <= split.worker_wall_s  # no part counted twice


def test_the_split_agrees_with_the_workers_other_clocks(split_run, split):
    """The parts are checked against readings taken apart from them: the denoising steps each timed call holds, the
    memory sampler's own clock (its timeline) and the runner's wall of the worker."""
    record = split_run["split"]
    assert sum(record.step_samples) < split.timed_s  # every timed step lies inside a timed call
    timeline = pd.read_csv(split_run.store.root / record.timeline)
    inference = timeline[timeline["phase"] == "inference"]["t_s"]
    # The sampler's clock starts before the load: its first inference sample comes after the load's seconds, and its
    # inference samples span no more than the worker's whole wall.
    assert inference.min() >= split.load_s
    assert inference.max() - inference.min() <= split.worker_wall_s
    assert timeline["t_s"].max() <= split.worker_wall_s  # the sampler lives inside the worker the runner timed
    assert split.compile_s == 0.0  # an eager case compiles nothing


def test_the_embedding_worker_counts_as_time_the_case_held(split_run, split):
    assert split.artifacts_s > 0
    held = split.artifacts_s + split.worker_wall_s
    assert gpu_s_per_timed_s(split_run["split"]) == pytest.approx(held / split.timed_s)
    assert gpu_s_per_timed_s(split_run["split"]) > 1


def test_a_compiled_case_counts_its_first_calls_time_beyond_a_timed_image_as_compilation():
    latency = Latency("fixture", load_s=3.0, warmup_s=[40.0, 1.2], stages={"image": [1.0, 1.1, 0.9]})
    split = worker_split(WorkerStart(spawned=10.0, started=10.5, imported=14.0), 0.4, latency, compiles=True)
    assert (split.process_start_s, split.imports_s, split.cuda_init_s) == (0.5, 3.5, 0.4)
    assert split.compile_s == pytest.approx(39.0)
    assert split.warmup_s == pytest.approx(2.2)
    assert split.timed_s == pytest.approx(3.0)
    eager = worker_split(None, 0.0, latency, compiles=False)
    assert eager.compile_s == 0.0 and eager.warmup_s == pytest.approx(41.2)
    assert eager.process_start_s is None and eager.imports_s is None


def test_what_no_part_holds_is_the_rest_of_the_runners_wall():
    split = worker_split(WorkerStart(None, 0.0, 2.0), 0.5, Latency("fixture", load_s=3.0, warmup_s=[1.0],
                                                                    stages={"image": [1.0]}), compiles=False)
    complete(split, worker_wall_s=10.0, artifacts_s=4.0)
    assert split.other_s == pytest.approx(10.0 - 2.0 - 0.5 - 3.0 - 1.0 - 1.0)
    assert split.held_s() == 14.0


def split_result(held: float, timed: float, gpu: str | None = "NVIDIA H100 80GB HBM3", **case):
    record = result(**case)
    record.wall_split = WallSplit("fixture", timed_s=timed, worker_wall_s=held)
    record.setup.gpu = gpu
    return record


def test_the_report_shows_each_cases_ratio_and_the_runs(tmp_path):
    records = [split_result(30.0, 3.0, block="a"), split_result(10.0, 5.0, block="b"), result(block="old")]
    assert BY_NAME["gpu_s_per_timed_s"].derive(records[0]).value == pytest.approx(10.0)
    old = BY_NAME["gpu_s_per_timed_s"].derive(records[2])
    assert old.value is None and "no wall-time split" in old.reason
    assert "40 GPU-s" in run_overhead(records)
    assert "5.0 GPU-s held per timed GPU-s over 2 cases" in run_overhead(records)
    built = build_report(write_run(tmp_path / "run", records))
    assert "GPU-s held per timed GPU-s" in built.markdown_text and "10.0" in built.markdown_text
    assert "5.0 GPU-s held per timed GPU-s" in built.markdown_text
    assert "wall_split" in built.plots


def test_a_run_without_splits_says_nothing_about_overhead(tmp_path):
    assert run_overhead([result()]) is None
    built = build_report(write_run(tmp_path / "run", [result()]))
    assert "GPU-s held" not in built.markdown_text


def test_the_first_timed_step_records_each_transformer_calls_tokens(split_run):
    record = split_run["split"]
    ((batch, image_tokens, text_tokens),) = record.latency.transformer_calls  # tiny: guidance embedded, one call
    assert (batch, image_tokens) == (1, (64 // 16) ** 2)  # the VAE's 8x and the 2x2 patches: one token per 16x16
    assert text_tokens > 0
    assert BY_NAME["step_tflop"].derive(record).value > 0


def _started(how: str | None):
    record = result()
    record.wall_split = WallSplit("test", worker_start=how)
    return record


def test_the_report_says_how_the_workers_started_and_why_the_fork_server_was_not_used():
    refused = {"fork_server": [{"usable": False, "reason": "CUDA fails in a forked child: boom", "imports_s": 9.0}]}
    sentence = worker_starts(refused, [_started("fresh"), _started("fresh"), _started(None)])
    assert sentence.startswith("Workers: 0 forked from the run's fork server, 2 started as fresh interpreters, 1 from")
    assert "not used: CUDA fails in a forked child: boom." in sentence
    used = {"fork_server": [{"usable": True, "reason": None, "imports_s": 13.25}]}
    assert "imports took 13.2 s, once" in worker_starts(used, [_started("fork-server")])
    assert worker_starts(used, [_started(None)]) is None  # older records say nothing about it
