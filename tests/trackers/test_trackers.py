"""Measurement plumbing on the CPU: host memory peaks, the timeline, stage latency, the environment."""

from __future__ import annotations

import csv
import gc
import re
import time
from types import SimpleNamespace

import numpy as np
import pynvml
import pytest
import torch

from flux2bench.trackers.environment import LIBRARIES, capture_environment
from flux2bench.trackers.latency import STAGES, LatencyTracker
from flux2bench.trackers.memory import (
    GIB,
    RSS_METHOD,
    MemorySampler,
    MemoryTracker,
    peaks_from_timeline,
    read_proc_status,
    reset_rss_peak,
)

CPU = torch.device("cpu")
MIB = 2**20
BALLAST_MIB = 200
GPU_FIELDS = ("gpu_allocated_peak_gib", "gpu_reserved_peak_gib", "gpu_device_peak_gib", "host_pinned_peak_gib")

pytestmark = pytest.mark.skipif(not read_proc_status(), reason="needs Linux /proc/self/status")


def touch_and_free(mib: int, hold_s: float = 0.2) -> None:
    """Allocate ``mib`` MiB, write every page, keep it resident for ``hold_s`` (20 samples at 100 Hz), free it."""
    ballast = np.ones(mib * MIB // 8)
    time.sleep(hold_s)
    del ballast


# --- memory --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A 'load' phase that allocates nothing, then an 'inference' phase that touches and frees BALLAST_MIB."""
    gc.collect()  # earlier tests' garbage (pipelines hold reference cycles) must not be freed during the phases
    timeline = tmp_path_factory.mktemp("memory") / "timeline.csv"
    with open(timeline, "w") as f, MemorySampler(None, f) as sampler:
        with MemoryTracker(sampler, "load", CPU) as load:
            time.sleep(0.05)
        before = read_proc_status()
        with MemoryTracker(sampler, "inference", CPU) as inference:
            touch_and_free(BALLAST_MIB)
    return SimpleNamespace(load=load.result, inference=inference.result, before=before, timeline=timeline,
                           sampler=sampler)


def gib_to_mib(value: float) -> float:
    return value * GIB / MIB


def test_an_allocation_inside_a_phase_raises_the_rss_peak_by_its_size(measured):
    peak = measured.inference.host_rss_peak_gib
    assert peak.method == RSS_METHOD  # VmHWM, reset at the phase start, sees the peak though it was freed
    grew = gib_to_mib(peak.value - measured.before["VmRSS"])
    assert BALLAST_MIB * 0.9 <= grew <= BALLAST_MIB + 64


def test_an_allocation_inside_a_phase_raises_the_sampled_anonymous_peak_by_its_size(measured):
    peak = measured.inference.host_anon_peak_gib
    assert "RssAnon" in peak.method
    grew = gib_to_mib(peak.value - measured.before["RssAnon"])
    assert BALLAST_MIB * 0.9 <= grew <= BALLAST_MIB + 64


def test_each_phase_has_its_own_peak(measured):
    assert gib_to_mib(measured.inference.host_rss_peak_gib.value - measured.load.host_rss_peak_gib.value) > \
        BALLAST_MIB * 0.9


def test_the_rss_peak_is_reset_at_the_phase_start():
    if not reset_rss_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    touch_and_free(300, hold_s=0)  # a high-water mark from before the phase
    with MemorySampler(None) as sampler:
        before = read_proc_status()["VmRSS"]
        with MemoryTracker(sampler, "inference", CPU) as tracker:
            pass
    assert gib_to_mib(tracker.result.host_rss_peak_gib.value - before) < 50


@pytest.mark.parametrize("phase", ["load", "inference"])
def test_gpu_metrics_are_not_measured_on_the_cpu_and_say_why(measured, phase):
    memory = getattr(measured, phase)
    for name in GPU_FIELDS:
        metric = getattr(memory, name)
        assert metric.value is None, name
        assert metric.reason and metric.method, name


def test_nvml_failure_is_the_reason_for_a_missing_device_peak(monkeypatch):
    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    with MemorySampler(0) as sampler, MemoryTracker(sampler, "load", CPU) as tracker:
        pass
    metric = tracker.result.gpu_device_peak_gib
    assert metric.value is None
    assert metric.reason.startswith("NVML unavailable")


def test_the_timeline_has_the_documented_columns_and_both_phases(measured):
    with open(measured.timeline, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["t_s", "phase", "gpu_used_gib", "rss_gib", "anon_gib", "file_gib", "shared_gib"]
    phases = [row["phase"] for row in rows]
    assert {"load", "inference"} <= set(phases)
    assert phases.index("inference") > max(i for i, p in enumerate(phases) if p == "load")  # in order
    times = [float(row["t_s"]) for row in rows]
    assert times == sorted(times)
    assert all(row["gpu_used_gib"] == "" and float(row["rss_gib"]) > 0 for row in rows)
    inference_rss = max(float(row["rss_gib"]) for row in rows if row["phase"] == "inference")
    assert gib_to_mib(inference_rss - measured.before["VmRSS"]) > BALLAST_MIB * 0.9


def test_peaks_from_timeline_are_the_maxima_per_phase(tmp_path):
    timeline = tmp_path / "timeline.csv"
    timeline.write_text("t_s,phase,gpu_used_gib,rss_gib,anon_gib,file_gib\n"
                        "0.00,start,,9.0,9.0,9.0\n"
                        "0.01,load,1.0,2.0,1.5,0.5\n"
                        "0.02,load,3.0,2.5,1.0,0.7\n"
                        "0.03,inference,2.0,4.0,3.5,0.4\n"
                        "0.04,inference,,3.0,2.0,0.6\n")
    peaks = peaks_from_timeline(timeline, reason="worker killed")
    assert set(peaks) == {"load", "inference"}  # samples before the first phase belong to neither
    load, inference = peaks["load"], peaks["inference"]
    assert (load.gpu_device_peak_gib.value, load.host_rss_peak_gib.value, load.host_anon_peak_gib.value,
            load.host_file_peak_gib.value) == (3.0, 2.5, 1.5, 0.7)
    assert (inference.gpu_device_peak_gib.value, inference.host_rss_peak_gib.value,
            inference.host_anon_peak_gib.value, inference.host_file_peak_gib.value) == (2.0, 4.0, 3.5, 0.6)
    assert "timeline" in inference.host_rss_peak_gib.method
    for name in ("gpu_allocated_peak_gib", "gpu_reserved_peak_gib", "host_pinned_peak_gib"):
        assert getattr(inference, name).value is None and getattr(inference, name).reason == "worker killed"


def test_a_column_without_samples_is_missing_not_zero(tmp_path):
    timeline = tmp_path / "timeline.csv"
    timeline.write_text("t_s,phase,gpu_used_gib,rss_gib,anon_gib,file_gib\n0.01,inference,,1.0,0.5,0.5\n")
    metric = peaks_from_timeline(timeline, reason="killed")["inference"].gpu_device_peak_gib
    assert metric.value is None and metric.reason == "no sample"


# --- latency --------------------------------------------------------------------------------------------

TEXT_S, REFERENCE_S, STEP_S, DECODE_S = 0.03, 0.02, 0.015, 0.04
STEPS = 3
SLACK_S = 0.05  # a sleep never returns early; on a busy machine it may return this much late


class SleepyTransformer(torch.nn.Module):
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        time.sleep(STEP_S)
        return latents


class SleepyVae(torch.nn.Module):
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        time.sleep(DECODE_S)
        return latents


class SleepyPipeline:
    """The stages LatencyTracker instruments, each sleeping a known time; ``calls_per_step`` 2 is true CFG."""

    def __init__(self, calls_per_step: int = 1):
        self.transformer = SleepyTransformer()
        self.vae = SleepyVae()
        self.calls_per_step = calls_per_step

    def encode_prompt(self, prompt: str) -> None:
        time.sleep(TEXT_S)

    def prepare_image_latents(self, images: list) -> None:
        time.sleep(REFERENCE_S)

    def __call__(self, callback_on_step_end) -> None:
        self.encode_prompt("a fox")
        self.prepare_image_latents([])
        latents = torch.zeros(1)
        for step in range(STEPS):
            for _ in range(self.calls_per_step):
                latents = self.transformer(latents)
            callback_on_step_end(self, step, 1000 - step, {"latents": latents})
        self.vae.decode(latents)


def timed_run(pipe: SleepyPipeline, warmup: int = 1, images: int = 2) -> LatencyTracker:
    tracker = LatencyTracker(CPU)
    with tracker.instrument(pipe):
        for _ in range(warmup):
            with tracker.image(record=False):
                pipe(tracker.step_callback)
        for _ in range(images):
            with tracker.image():
                pipe(tracker.step_callback)
    return tracker


@pytest.fixture(scope="module")
def latency():
    return timed_run(SleepyPipeline()).latency


def assert_about(measured: float, expected: float, slack: float = SLACK_S) -> None:
    assert expected <= measured <= expected + slack, f"{measured:.4f} s, expected {expected:.4f} s"


def test_every_stage_has_one_sample_per_timed_image(latency):
    assert set(latency.stages) == set(STAGES)
    assert all(len(samples) == 2 for samples in latency.stages.values())


@pytest.mark.parametrize("stage, expected", [("text_encoding", TEXT_S), ("reference_encoding", REFERENCE_S),
                                             ("vae_decode", DECODE_S), ("denoise", STEPS * STEP_S)])
def test_stage_durations_match_what_the_stages_took(latency, stage, expected):
    for sample in latency.stages[stage]:
        assert_about(sample, expected)


def test_the_image_time_covers_all_its_stages(latency):
    for sample in latency.stages["image"]:
        assert_about(sample, TEXT_S + REFERENCE_S + STEPS * STEP_S + DECODE_S, slack=2 * SLACK_S)


def test_steps_are_one_list_per_image_with_one_duration_per_step(latency):
    assert len(latency.steps) == 2
    for image in latency.steps:
        assert len(image) == STEPS
        for step in image:
            assert_about(step, STEP_S)


def test_warm_up_calls_are_kept_apart_from_the_samples(latency):
    assert len(latency.warmup_s) == 1
    assert_about(latency.warmup_s[0], TEXT_S + REFERENCE_S + STEPS * STEP_S + DECODE_S, slack=2 * SLACK_S)


def test_a_run_without_torch_compile_compiles_no_graph_in_its_timed_images(latency):
    assert latency.compiled_graphs == [0, 0]


def test_graphs_compiled_during_a_timed_image_are_counted_per_image_and_those_of_warm_up_not():
    tracker = LatencyTracker(CPU)
    add_one = torch.compile(lambda x: x + 1, backend="eager")
    for shape, record in [((2,), False), ((2,), True), ((3, 3), True)]:  # a new shape recompiles
        with tracker.image(record=record):
            add_one(torch.ones(shape))
    assert tracker.latency.compiled_graphs == [0, 1]


def test_a_second_transformer_call_in_a_step_counts_in_that_step():
    steps = timed_run(SleepyPipeline(calls_per_step=2), warmup=0, images=1).latency.steps
    assert len(steps) == 1 and len(steps[0]) == STEPS
    for step in steps[0]:
        assert_about(step, 2 * STEP_S)


def test_instrument_restores_the_pipeline_after_the_block():
    pipe = SleepyPipeline()
    tracker = timed_run(pipe, warmup=0, images=1)
    assert "encode_prompt" not in vars(pipe) and "prepare_image_latents" not in vars(pipe)
    assert "decode" not in vars(pipe.vae)
    assert pipe.encode_prompt.__func__ is SleepyPipeline.encode_prompt
    assert not pipe.transformer._forward_pre_hooks
    pipe(lambda *args: {})  # an uninstrumented call records nothing
    assert len(tracker.latency.stages["image"]) == 1 and len(tracker.latency.steps) == 1


def test_stage_calls_outside_an_image_are_not_recorded():
    pipe = SleepyPipeline()
    tracker = LatencyTracker(CPU)
    with tracker.instrument(pipe):
        pipe.encode_prompt("outside any image")
    assert tracker.latency.stages == {} and tracker.latency.steps == []


def test_timed_reports_the_elapsed_time_of_its_block():
    tracker = LatencyTracker(CPU)
    with tracker.timed() as elapsed:
        time.sleep(0.03)
    assert_about(elapsed(), 0.03)


# --- environment ----------------------------------------------------------------------------------------

ENVIRONMENT_KEYS = {"gpu_name", "gpu_memory_gib", "gpus", "driver", "cuda", "python", "platform", "cpu", "cpu_count",
                    "host_ram_gib", "machine_id", "host_label", "host_to_device", "versions", "git_commit",
                    "unavailable"}


@pytest.fixture
def without_nvml(monkeypatch):
    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)


def test_the_environment_has_the_documented_keys(without_nvml):
    env = capture_environment()
    assert set(env) == ENVIRONMENT_KEYS
    assert set(env["versions"]) == set(LIBRARIES)
    assert env["versions"]["torch"] is not None and env["versions"]["flux2bench"] is not None
    assert env["host_to_device"] is None and env["unavailable"]["host_to_device"] == "no GPU"
    assert env["cpu_count"] >= 1 and env["host_ram_gib"] > 0 and env["cpu"]
    assert env["git_commit"] is not None or "git_commit" in env["unavailable"]
    if env["git_commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["git_commit"])


def test_without_nvml_the_gpu_fields_are_none_and_the_reason_is_given(without_nvml):
    env = capture_environment()
    assert (env["gpu_name"], env["gpu_memory_gib"], env["gpus"], env["driver"]) == (None, None, [], None)
    assert env["unavailable"]["gpu"].startswith("NVML unavailable")


def test_the_environment_needs_no_cuda_context(without_nvml, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("capture_environment touched CUDA")

    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", no_cuda)
    assert capture_environment()["cuda"] == torch.version.cuda  # the build's CUDA version, not a device query
