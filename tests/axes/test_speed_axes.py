"""The speed axes: torch.compile, step caches and context parallelism, plus energy and time to first image.

What the CPU can run runs for real on the tiny pipeline (regional compilation, TaylorSeer); context parallelism
needs CUDA GPUs, so its launch of one worker per rank and the merge of their records run with the fault worker's
fake pipeline, and its refusals are checked directly. GPU runs are in tests/axes/test_gpu_pipeline.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from flux2bench.axes import cache, compile, parallel, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.errors import Unsupported
from flux2bench.results import Energy
from flux2bench.trackers.energy import EnergyMeter
from flux2bench.trackers.latency import LatencyTracker

from conftest import REPO

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def plan(case, device=CPU) -> LoadPlan:
    return registry.plan_load(case, LoadPlan(device=device, home=device))


class RecordingTransformer:
    def __init__(self):
        self.calls = []

    def forward(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class RecordingPipeline:
    def __init__(self):
        self.transformer = RecordingTransformer()


# --- keys -----------------------------------------------------------------------------------------------------

def test_the_new_axes_at_their_defaults_leave_every_case_key_as_it_was(tiny_case):
    """A committed run's key: the speed axes, added later, enter keys only when set."""
    from flux2bench.scenario import load_cases

    run = REPO / "reports" / "h100-20261126-111007"
    cases = load_cases(run / "scenario.yaml")
    committed = json.loads((run / "run.json").read_text())["case_keys"]
    assert sorted(c.key for c in cases) == sorted(committed)
    assert tiny_case(compile="regional").key != tiny_case().key


# --- compile ---------------------------------------------------------------------------------------------------

def test_regional_compile_calls_diffusers_and_records_what_it_did(tiny_case):
    case = tiny_case(compile="regional", compile_fullgraph=True, warmup=1)
    pipe = RecordingPipeline()
    applied = compile.AXIS.apply(pipe, case, plan(case))
    assert pipe.transformer.calls == [("compile_repeated_blocks", (), {"fullgraph": True, "mode": None})]
    assert applied == {"compile": "regional", "mode": "default", "fullgraph": True,
                       "method": "transformer.compile_repeated_blocks"}


def test_full_compile_compiles_the_forward_so_that_module_hooks_stay_eager(tiny_case, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append((fn, options)) or "compiled forward")
    case = tiny_case(compile="full", warmup=1)
    pipe = RecordingPipeline()
    forward = pipe.transformer.forward
    applied = compile.AXIS.apply(pipe, case, plan(case))
    assert compiled == [(forward, {"fullgraph": False, "mode": None})]
    assert pipe.transformer.forward == "compiled forward"
    assert applied["method"] == "torch.compile(transformer.forward)"


def test_compile_passes_its_mode(tiny_case):
    case = tiny_case(compile="regional", compile_mode="max-autotune-no-cudagraphs", warmup=1)
    pipe = RecordingPipeline()
    compile.AXIS.apply(pipe, case, plan(case))
    assert pipe.transformer.calls[0][2]["mode"] == "max-autotune-no-cudagraphs"
    assert "compile=regional:max-autotune-no-cudagraphs" in case.label


def test_compile_without_a_warmup_is_refused(tiny_case):
    case = tiny_case(compile="regional", warmup=0)
    with pytest.raises(Unsupported, match="warmup >= 1"):
        compile.AXIS.check(case, plan(case))


@pytest.mark.parametrize("hits, misses, bypasses, state", [(0, 2, 0, "cold"), (2, 0, 0, "warm"), (2, 2, 0, "partial"),
                                                             (0, 0, 0, "none"), (0, 0, 1, "bypassed"),
                                                             (0, 2, 1, "cold"), (2, 0, 1, "partial")])
def test_the_inductor_cache_state_is_read_from_its_counters(hits, misses, bypasses, state):
    assert compile.cache_state(hits, misses, bypasses) == state


def test_a_function_that_reaches_dynamos_recompile_limit_is_counted_once():
    class State:  # a step counter dynamo specialises on, as it does on a step cache's hook state
        step = 0

    def add_step(x):
        return x + State.step

    compiled = torch.compile(add_step, backend="eager")
    before = compile.recompile_limit_hits()
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
        for State.step in range(5):
            assert compiled(torch.zeros(1)).item() == State.step
    assert compile.recompile_limit_hits() - before == 1


COMPILED = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 2, repeats: 1, warmup: 1, timeout_s: 600,
           prompts: a red fox, compile: regional, compile_fullgraph: true, drift_baseline: "off"}
blocks:
  first: {seeds: 0}
  second: {seeds: 1}
"""


@pytest.fixture(scope="module")
def compiled(run_scenario):
    return run_scenario(COMPILED, "compiled")


@pytest.mark.slow
def test_regional_compilation_runs_on_the_cpu_and_its_time_is_in_the_first_call(compiled):
    first = compiled["first"]
    assert first.status == "ok", first.reason
    assert first.setup.axes["compile"]["method"] == "transformer.compile_repeated_blocks"
    latency = first.latency
    assert latency.first_call_s == latency.warmup_s[0] > 3 * latency.stages["image"][0]
    assert latency.time_to_first_image_s > latency.load_s + latency.first_call_s


@pytest.mark.slow
def test_the_run_directorys_compile_cache_is_cold_first_and_warm_for_the_next_worker(compiled):
    first, second = compiled["first"], compiled["second"]
    assert first.setup.axes["compile"]["inductor_cache"] == "cold"
    assert second.setup.axes["compile"]["inductor_cache"] == "warm"
    assert second.latency.first_call_s < first.latency.first_call_s
    assert (compiled.store.root / "compile-cache").is_dir()


# --- caches ----------------------------------------------------------------------------------------------------

def test_first_block_cache_is_refused_with_the_upstream_issue(tiny_case):
    case = tiny_case(cache="firstblock")
    with pytest.raises(Unsupported, match="issue 14280"):
        cache.AXIS.check(case, plan(case))


def test_magcache_without_calibrated_ratios_is_refused_saying_how_to_get_them(tiny_case):
    case = tiny_case(cache="magcache")
    with pytest.raises(Unsupported, match="calibrate: true"):
        cache.AXIS.check(case, plan(case))
    ratios = tiny_case(cache="magcache", cache_options={"mag_ratios": [1.0] * 4, "num_inference_steps": 4})
    cache.AXIS.check(ratios, plan(ratios))


def test_an_unknown_cache_option_is_refused_before_loading(tiny_case):
    case = tiny_case(cache="taylorseer", cache_options={"no_such_field": 1})
    with pytest.raises(Unsupported, match="no_such_field"):
        cache.AXIS.check(case, plan(case))


def test_faster_cache_is_configured_for_a_guidance_distilled_model(tiny_case):
    config = cache.AXIS.config(tiny_case(cache="fastercache"), pipe=None)
    assert config.is_guidance_distilled and config.spatial_attention_block_skip_range == 2
    assert callable(config.current_timestep_callback)


CACHED = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 8, repeats: 1, warmup: 0, timeout_s: 300,
           prompts: a red fox}
blocks:
  cached:
    cache: [taylorseer, pab]
"""


@pytest.fixture(scope="module")
def cached(run_scenario):
    return run_scenario(CACHED, "cached")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["taylorseer", "pab"])
def test_a_step_cache_runs_on_flux2_with_the_context_the_harness_provides_and_drifts(cached, name):
    (result,) = [r for r in cached.results if r.case.settings["cache"] == name]
    assert result.status == "ok", result.reason
    applied = result.setup.axes["cache"]
    assert applied["method"] == "transformer.enable_cache" and "forward hooks" in applied["cache_context"]
    assert result.drift.baseline_key is not None
    assert result.drift.metrics["latent_rel_l2"].value > 0  # the cache changed the computation: it acted


# --- context parallelism ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("axes, reason", [
    ({"gpus": 2}, "gpus: 2 needs parallel"),
    ({"parallel": "ulysses"}, "needs gpus: 2 or more"),
    ({"parallel": "ulysses", "gpus": 2}, "CUDA GPUs"),
])
def test_what_context_parallelism_cannot_run_is_refused_with_the_reason(tiny_case, axes, reason):
    case = tiny_case(**axes)
    with pytest.raises(Unsupported, match=reason):
        parallel.AXIS.check(case, plan(case))


def test_a_case_needing_more_gpus_than_are_visible_is_refused(tiny_case, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    case = tiny_case(parallel="ulysses", gpus=2, device="cuda")
    with pytest.raises(Unsupported, match="over 2 GPUs, but 1 are visible"):
        parallel.AXIS.check(case, LoadPlan(device=CUDA, home=CUDA))


@pytest.mark.parametrize("axes, reason", [
    ({"parallel": "ulysses", "gpus": 4}, "2 attention heads"),  # the tiny transformer has 2 heads
    ({"parallel": "ring", "gpus": 2}, "log-sum-exp"),
    ({"parallel": "ulysses", "gpus": 2, "resolution": 48}, "does not split evenly"),
])
def test_shapes_and_backends_context_parallelism_cannot_split_are_refused(tiny_case, monkeypatch, axes, reason):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    case = tiny_case(**axes, device="cuda")
    with pytest.raises(Unsupported, match=reason):
        parallel.AXIS.check(case, LoadPlan(device=CUDA, home=CUDA))


def test_the_joint_sequence_counts_text_image_and_reference_tokens(tiny_case):
    assert parallel.sequence_tokens(tiny_case(resolution=1024)) == 512 + 4096
    refs = tiny_case(resolution=1024, reference_images=10, reference_image_size="1024x1024")
    assert parallel.sequence_tokens(refs) == 45568  # the published count for ten references


SPLIT = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 2, repeats: 1, warmup: 0, timeout_s: 120,
           prompts: "FAULT:none", drift_baseline: "off"}
blocks:
  two: {parallel: ulysses, gpus: 2}
  one: {}
"""


@pytest.fixture(scope="module")
def split(run_scenario, fault_worker):
    return run_scenario(SPLIT, "split", worker_module=fault_worker, devices=["a", "b", "c"])


def loads(run, name):
    return json.loads((run.store.root / "loads" / f"{name}.json").read_text())


def test_a_case_over_two_gpus_starts_one_worker_per_rank_with_torchruns_environment(split):
    key = split["two"].key
    (rank0,), (rank1,) = loads(split, key), loads(split, f"{key}.rank1")
    assert (rank0["rank"], rank1["rank"]) == ("0", "1")
    assert rank0["world_size"] == rank1["world_size"] == "2"
    assert rank0["master_port"] == rank1["master_port"] is not None
    assert rank0["cuda_visible_devices"] == rank1["cuda_visible_devices"] == "a,b"  # two devices held for it
    (single,) = loads(split, split["one"].key)
    assert single["rank"] is None and len(single["cuda_visible_devices"]) == 1


def test_the_record_is_rank_zeros_with_every_ranks_peaks_and_the_highest_reported(split):
    record = split["two"]
    assert record.status == "ok", record.reason
    assert [r.rank for r in record.ranks] == [0, 1]
    per_rank = [r.memory["inference"].host_rss_peak_gib.value for r in record.ranks]
    assert per_rank[1] > per_rank[0] + 0.05  # rank 1 holds 64 MiB more
    assert record.memory["inference"].host_rss_peak_gib.value == max(per_rank)
    assert record.memory["inference"].host_rss_peak_gib.method.startswith("highest of 2 ranks")
    assert len(record.outputs) == 1  # only rank 0 saves the image
    assert (split.store.root / "timelines" / f"{record.key}.rank1.csv.gz").is_file()


# --- energy and time to first image ----------------------------------------------------------------------------

def test_energy_is_null_with_the_reason_without_a_gpu():
    meter = EnergyMeter(None)
    assert meter.joules() is None
    assert meter.record() == Energy("NVML energy counter", [], "no CUDA device in this case")


class FakeMeter:
    def __init__(self):
        self.reads = iter([100.0, 103.5, 110.0, 112.0])
        self.unavailable = None

    def joules(self):
        return next(self.reads)

    def record(self):
        return Energy("fake counter")


def test_each_timed_image_gets_the_energy_the_counter_advanced_by():
    tracker = LatencyTracker(CPU, process_start=0.0, energy=FakeMeter())
    for _ in range(2):
        with tracker.image():
            pass
    assert tracker.energy.per_image_j == [3.5, 2.0]
    assert tracker.latency.first_call_s is not None and tracker.latency.time_to_first_image_s > 0


def test_parallel_ranks_energy_is_summed_and_peaks_are_the_highest():
    from flux2bench.results import summed_energy

    total = summed_energy([Energy("m", [1.0, 2.0]), Energy("m", [3.0, 4.0])])
    assert total.per_image_j == [4.0, 6.0] and total.method.startswith("sum over 2 GPUs")
    assert summed_energy([Energy("m", [], "no counter"), Energy("m", [1.0])]).reason == "no counter"
