"""Batch size: images per pipeline call, each with its own seed; the per-image arithmetic, the drift of a batched
case against batch 1 of its own setup, and the report's throughput figures. One real tiny run (five workers)
serves the tests that need images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux2bench.axes import batch
from flux2bench.axes.base import LoadPlan
from flux2bench.drift_baseline import pick_drift_baseline
from flux2bench.drift import mae, psnr
from flux2bench.errors import Unsupported
from flux2bench.metrics import BY_NAME, images_per_hour_per_gpu, s_per_call, s_per_image
from flux2bench.report import build_report
from flux2bench.report.fits import fits_on, throughput_cost_column
from flux2bench.report.frame import results_frame
from flux2bench.report.plots import _plot_throughput, batch_series, vram_per_added_image
from flux2bench.results import Energy
from flux2bench.runner.drift_plan import drift_baselines_to_run
from flux2bench.scenario import ScenarioError, load_cases
from conftest import TINY
from records import gpu_result, result, write_run

# --- the axis: expansion, keys, labels, seeds ---------------------------------------------------------------


def test_batch_size_expands_and_batch_1_keeps_the_key_a_block_without_it_has(write_scenario):
    plain = load_cases(write_scenario("blocks:\n  main: {model: tiny, steps: 4, seeds: 0}\n", "plain.yaml"))
    batched = load_cases(write_scenario(
        "blocks:\n  main: {model: tiny, steps: 4, seeds: 0, batch_size: [1, 2, 4]}\n", "batched.yaml"))
    assert [c.settings["batch_size"] for c in batched] == [1, 2, 4]
    assert batched[0].key == plain[0].key and batched[0].label == plain[0].label
    assert len({c.key for c in batched}) == 3
    assert batched[2].label.endswith("batch=4")


def test_a_batch_size_below_one_is_refused(write_scenario):
    with pytest.raises(ScenarioError, match="batch_size"):
        load_cases(write_scenario("blocks:\n  main: {batch_size: 0}\n"))


def test_each_image_of_a_call_has_its_own_seed_and_generator(tiny_case):
    case = tiny_case(batch_size=3, seeds=[10, 20])
    assert batch.AXIS.image_seeds(case, 20) == [20, 21, 22]
    arguments = batch.AXIS.call_arguments(case, 20)
    assert arguments["num_images_per_prompt"] == 3
    firsts = [g.initial_seed() for g in arguments["generator"]]
    assert firsts == [20, 21, 22]


def test_seeds_whose_batches_overlap_cannot_run(tiny_case):
    plan = LoadPlan(device=torch.device("cpu"), home=torch.device("cpu"))
    with pytest.raises(Unsupported, match="apart"):
        batch.AXIS.check(tiny_case(batch_size=2, seeds=[0, 1]), plan)
    batch.AXIS.check(tiny_case(batch_size=2, seeds=[0, 2]), plan)


def test_the_effective_batch_counts_every_transformer_call_of_a_step():
    cfg = batch.transformer_batch([4, 4] * 6, steps_run=6)  # true CFG: two calls of batch 4 per step
    assert (cfg["transformer_batch"], cfg["transformer_calls_per_step"], cfg["effective_batch"]) == (4, 2.0, 8.0)
    assert batch.transformer_batch([], steps_run=6)["transformer_batch"] is None


def test_a_compiled_batch_recompiled_when_it_compiled_graphs_the_inductor_cache_lacked():
    before = {"graphs": 2, "fxgraph_miss": 3, "fxgraph_hit": 0}
    assert batch.compiled_for_batch(before, {"graphs": 4, "fxgraph_miss": 5, "fxgraph_hit": 0})["recompiled"]
    warm = batch.compiled_for_batch(before, {"graphs": 4, "fxgraph_miss": 3, "fxgraph_hit": 2})
    assert not warm["recompiled"] and warm["fxgraph_hit"] == 2


# --- per-image arithmetic --------------------------------------------------------------------------------


def test_a_call_of_four_images_shares_its_time_and_energy_among_them():
    record = result(s_per_image=2.0, batch_size=4)  # the fixture's image stage is the call
    record.energy = Energy("fixture", per_image_j=[400.0, 440.0, 420.0])
    frame = results_frame([record])
    assert s_per_call(record) == 2.0 and s_per_image(record) == 0.5
    assert BY_NAME["images_per_hour"].value(record) == 7200 and images_per_hour_per_gpu(record) == 7200
    assert frame.at[record.key, "batch"] == 4 and frame.at[record.key, "s_per_image"] == 0.5
    assert frame.at[record.key, "images_per_hour_per_gpu"] == 7200
    assert frame.at[record.key, "energy_j"] == 105.0


def test_a_run_of_one_image_per_call_on_one_gpu_has_no_batch_or_throughput_column():
    frame = results_frame([result(s_per_image=2.0), result(s_per_image=1.0, precision="fp8")])
    assert "batch" not in frame and "images_per_hour_per_gpu" not in frame


def test_images_per_hour_per_gpu_counts_every_gpu_of_a_parallel_case():
    record = result(s_per_image=2.0, batch_size=2, gpus=2, parallel="ulysses")
    assert BY_NAME["images_per_hour"].value(record) == 3600 and images_per_hour_per_gpu(record) == 1800


# --- drift baselines ---------------------------------------------------------------------------------------


def test_a_batched_case_is_compared_with_batch_1_of_its_own_setup_not_the_bf16_baseline():
    bf16 = result(block="a", seeds=(0, 1, 2, 3))
    fp8 = result(block="b", precision="fp8", seeds=(0, 1, 2, 3))
    fp8_batched = result(block="c", precision="fp8", batch_size=4, seeds=(0,))
    assert pick_drift_baseline(fp8_batched.case, [bf16, fp8]) is fp8
    assert pick_drift_baseline(fp8_batched.case, [bf16]) is None
    assert pick_drift_baseline(fp8.case, [bf16, fp8, fp8_batched]) is bf16


def test_the_runner_runs_a_missing_batch_1_case_of_the_setup_once():
    fp8_batched = result(block="c", precision="fp8", batch_size=4, seeds=(0,))
    (wanted,) = drift_baselines_to_run([fp8_batched.case], [fp8_batched], attempt=0)
    assert wanted.block == "c.baseline"
    assert wanted.settings["batch_size"] == 1 and wanted.settings["precision"] == "fp8"
    assert drift_baselines_to_run([fp8_batched.case], [fp8_batched], attempt=1) == []
    ran = result(block="c.baseline", status="oom", precision="fp8", seeds=(0, 1, 2, 3))
    assert drift_baselines_to_run([fp8_batched.case], [fp8_batched, ran], attempt=0) == []


# --- the report ------------------------------------------------------------------------------------------


def _block(peaks_by_batch: dict[int, float], call_s: dict[int, float], **changes):
    return [gpu_result(device=peak, s_per_image=call_s[b], batch_size=b, **changes)
            for b, peak in peaks_by_batch.items()]


def test_vram_growth_per_added_image_is_the_slope_over_a_setups_batch_sizes():
    members = _block({1: 20.0, 2: 22.0, 4: 26.0}, {1: 1.0, 2: 1.6, 4: 3.0})
    assert vram_per_added_image(members) == pytest.approx(2.0)
    assert vram_per_added_image(members[:1]) is None


def test_a_setups_batch_sizes_are_gathered_across_blocks_and_setups_kept_apart():
    small = _block({1: 20.0, 2: 22.0}, {1: 1.0, 2: 1.6}, block="fp8-small")
    large = _block({8: 36.0}, {8: 6.0}, block="fp8-large")
    bf16 = _block({1: 60.0, 2: 64.0}, {1: 2.0, 2: 3.8}, block="bf16", precision="bf16", attention="_native_math")
    series = batch_series(small + large + bf16)
    assert sorted(series) == ["attention=_native_math", "attention=sdpa"]
    assert [r.batch_size for r in series["attention=sdpa"]] == [1, 2, 8]


def test_the_throughput_plot_needs_a_setup_at_two_batch_sizes(tmp_path):
    assert _plot_throughput([result(batch_size=1)], tmp_path / "x.png") is not None
    members = _block({1: 20.0, 2: 22.0}, {1: 1.0, 2: 1.6})
    assert _plot_throughput(members, tmp_path / "t.png") is None and (tmp_path / "t.png").stat().st_size > 0


def test_fits_on_gives_the_fastest_setup_and_the_best_throughput_that_fits_with_its_cost():
    members = _block({1: 20.0, 4: 30.0, 8: 50.0}, {1: 1.0, 4: 2.0, 8: 3.6})
    fits = fits_on(members, gpu_sizes_gb=(24, 48, 80), host_ram_gb=(), prices={"h100": 3.6}).set_index("size_gb")
    assert fits.at[24, "throughput_batch"] == 1 and fits.at[24, "images_per_hour_per_gpu"] == 3600
    assert fits.at[48, "throughput_batch"] == 4 and fits.at[48, "images_per_hour_per_gpu"] == 7200
    assert fits.at[80, "throughput_batch"] == 8 and fits.at[80, "images_per_hour_per_gpu"] == 8000
    assert fits.at[80, "s_per_call"] == 1.0  # the fastest wait for an image stays batch 1
    assert fits.at[80, throughput_cost_column("h100")] == pytest.approx(3.6 / 8000 * 1000)
    unbatched = fits_on(members[:1], gpu_sizes_gb=(24,), host_ram_gb=())
    assert "throughput_setup" not in unbatched  # the fastest setup is then also the best throughput


def test_the_report_shows_the_best_throughput_per_card_and_the_throughput_plot(tmp_path):
    members = _block({1: 20.0, 4: 30.0}, {1: 1.0, 4: 2.0})
    built = build_report(write_run(tmp_path / "run", members), prices={"h100": 3.6})
    fits_header = next(line for line in built.markdown_text.splitlines() if line.startswith("| memory"))
    assert "best throughput that fits | batch | images/h per GPU" in fits_header
    assert "| images/call |" in built.markdown_text and "| images/h per GPU |" in built.markdown_text
    assert built.plots["throughput_batch"].is_file()


# --- a real run: per-seed images equal to batch 1, drift against batch 1, the transformer's batch (slow) -----

# Blocks over the smallest tiny case (TINY, one step): batch 1 and 2 of seed 0, batch 1 of seed 1, and a true-CFG
# model at batch 2, whose batch-1 case the runner runs as its drift baseline.
SCENARIO = f"""
    defaults: {json.dumps(TINY)}
    blocks:
      seed0:
        seeds: 0
        batch_size: [1, 2]
      seed1:
        seeds: 1
      klein-base:
        model: tiny-klein-base
        seeds: 0
        batch_size: 2
"""


@pytest.fixture(scope="module")
def run(run_scenario):
    return run_scenario(SCENARIO, "batch")


def _output(run, record, seed):
    (output,) = [o for o in record.outputs if o.seed == seed]
    root = run.store.root
    return load_file(str(root / output.latents))["latents"], Image.open(root / output.image)


def _by_batch(run, block, size):
    (record,) = [r for r in run.results if r.block == block and r.batch_size == size]
    return record


@pytest.mark.slow
def test_each_image_of_a_batch_equals_the_batch_1_image_of_its_seed_within_bf16_noise(run):
    batched = _by_batch(run, "seed0", 2)
    assert batched.status == "ok" and sorted(o.seed for o in batched.outputs) == [0, 1]
    singles = {0: _by_batch(run, "seed0", 1), 1: run["seed1"]}
    for seed, single in singles.items():
        latents, image = _output(run, batched, seed)
        single_latents, single_image = _output(run, single, seed)
        torch.testing.assert_close(latents, single_latents, rtol=1.6e-2, atol=1.6e-2)  # bf16's resolution
        # The batched VAE decode rounds differently in bf16: a level or a few of 255 here and there.
        assert psnr(image, single_image).value > 40 and mae(image, single_image).value < 1.0
    other_latents, _ = _output(run, batched, 1)
    assert not torch.allclose(_output(run, batched, 0)[0], other_latents)  # distinct seeds, distinct images


@pytest.mark.slow
def test_the_record_says_the_seeds_and_the_transformer_batch(run):
    batched = _by_batch(run, "seed0", 2).setup.axes["batch"]
    assert batched["seeds_per_call"] == [[0, 1]]
    assert (batched["transformer_batch"], batched["effective_batch"]) == (2, 2.0)
    cfg = run["klein-base"].setup.axes["batch"]
    assert (cfg["transformer_batch"], cfg["transformer_calls_per_step"], cfg["effective_batch"]) == (2, 2.0, 4.0)


@pytest.mark.slow
def test_the_drift_of_a_batched_case_is_measured_against_batch_1_of_the_same_setup(run):
    batched = _by_batch(run, "seed0", 2)
    reference = next(r for r in run.store.results() if r.block == "seed0.baseline")  # seeds 0 and 1, one per call
    assert reference.batch_size == 1 and reference.case.seeds == (0, 1)
    assert batched.drift.baseline_key == reference.key
    assert batched.drift.metrics["latent_cosine"].value > 0.999 and batched.drift.metrics["psnr"].value > 40
    assert batched.drift.metrics["psnr"].method.endswith("; mean over 2 images")
    baseline = next(r for r in run.store.results() if r.block == "klein-base.baseline")
    assert baseline.batch_size == 1 and baseline.case.model == "tiny-klein-base"
    assert run["klein-base"].drift.baseline_key == baseline.key
