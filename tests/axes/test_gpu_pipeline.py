"""The tiny pipeline on a CUDA GPU, through isolated workers: every precision with each offload mode that
FLUX.2 can use with it, loaded where diffusers loads it, and measured."""

from __future__ import annotations

import pytest
import torch

from flux2bench.axes import registry
from flux2bench.axes.base import LoadPlan
from flux2bench.axes.precision import describe_quantization
from flux2bench.metrics import peak
from flux2bench.models import MODELS
from flux2bench.sources import load_pipeline
from flux2bench.sources.synthetic import synthetic_pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The parameter class that holds each precision's quantized weights.
QUANTIZED_PARAMETER = {"nf4": "Params4bit", "fp8": "Float8Tensor", "fp8_row": "Float8Tensor", "int8": "Int8Tensor"}


@pytest.fixture(scope="module")
def run(run_scenario):
    return run_scenario("""
        defaults: {model: tiny, device: cuda, resolution: 64, steps: 2, warmup: 1, repeats: 1, prompts: a red fox}
        blocks:
          gpu:
            precision: [bf16, nf4, fp8, fp8_row, int8]
            offload: [none, model]
    """, "gpu")


def results_of(run, precision):
    return [r for r in run.results if r.case.settings["precision"] == precision]


def offload_status(run, precision):
    return {r.case.settings["offload"]: r.status for r in results_of(run, precision)}


@pytest.mark.parametrize("precision", ["bf16", "nf4", "fp8", "fp8_row", "int8"])
def test_each_precision_runs_on_the_gpu_and_is_measured(run, precision):
    (result,) = [r for r in results_of(run, precision) if r.case.settings["offload"] == "none"]
    assert result.status == "ok", result.reason
    assert peak(result, "gpu_allocated_peak_gib", "inference").value > 0
    assert [len(steps) for steps in result.latency.steps] == [2]  # one timed image of two steps


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_bf16_and_nf4_run_with_model_offload(run, precision):
    assert offload_status(run, precision) == {"none": "ok", "model": "ok"}


@pytest.mark.parametrize("precision", ["fp8", "fp8_row"])
def test_fp8_with_model_offload_is_refused_before_loading_with_the_reason(run, precision):
    (result,) = [r for r in results_of(run, precision) if r.case.settings["offload"] == "model"]
    assert result.status == "unsupported"
    assert "Float8Tensor" in result.reason


@pytest.mark.parametrize("precision", ["nf4", "fp8", "fp8_row", "int8"])
def test_the_run_holds_the_quantized_weights(run, precision):
    for result in (r for r in results_of(run, precision) if r.status == "ok"):
        for component in ("transformer", "text_encoder"):
            types = result.setup.axes["quantization"][component]["parameter_types"]
            assert QUANTIZED_PARAMETER[precision] in types, (component, types)


@pytest.mark.parametrize("precision", ["fp8", "fp8_row", "int8"])
def test_a_pretrained_torchao_pipeline_is_quantized_on_the_gpu(tmp_path, tiny_case, precision):
    directory = tmp_path / "tiny-flux2"
    cpu = torch.device("cpu")
    synthetic_pipeline(MODELS["tiny"], LoadPlan(device=cpu, home=cpu)).save_pretrained(directory)
    case = tiny_case(weights="pretrained", source=str(directory), device="cuda", precision=precision)
    gpu = torch.device("cuda", 0)
    pipe = load_pipeline(case, registry.plan_load(case, LoadPlan(device=gpu, home=gpu)))
    assert describe_quantization(pipe.transformer)["parameter_types"].get(QUANTIZED_PARAMETER[precision])
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cuda"}


# --- the speed axes on the GPU ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast(run_scenario):
    devices = [str(i) for i in range(min(torch.cuda.device_count(), 2))]
    return run_scenario("""
        defaults: {model: tiny, device: cuda, resolution: 128, steps: 4, warmup: 1, repeats: 2, prompts: a red fox}
        blocks:
          eager: {}
          compiled: {compile: [regional, full], compile_fullgraph: true}
          cached: {cache: [taylorseer, pab, fastercache], steps: 12}
          split: {parallel: [ulysses, ring], gpus: 2, attention: _native_cudnn}
    """, "fast", devices=devices)


def of(run, block, **settings):
    return [r for r in run.results if r.block == block
            and all(r.case.settings[name] == value for name, value in settings.items())]


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_cases_run_and_their_first_call_holds_the_compilation(fast, mode):
    (result,) = of(fast, "compiled", compile=mode)
    assert result.status == "ok", result.reason
    assert result.latency.first_call_s > 2 * max(result.latency.stages["image"])
    assert result.setup.axes["compile"]["inductor_cache"] in ("cold", "warm", "partial")
    assert result.drift.baseline_key == of(fast, "eager")[0].key


def test_every_timed_image_on_the_gpu_has_its_energy(fast):
    (result,) = of(fast, "eager")
    assert result.energy.reason is None, result.energy.reason
    assert len(result.energy.per_image_j) == 2 and all(j > 0 for j in result.energy.per_image_j)


@pytest.mark.parametrize("name", ["taylorseer", "pab", "fastercache"])
def test_each_step_cache_runs_on_the_gpu(fast, name):
    (result,) = of(fast, "cached", cache=name)
    assert result.status == "ok", result.reason


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_context_parallelism_over_two_gpus_runs_and_records_both_ranks(fast, mode):
    (result,) = of(fast, "split", parallel=mode)
    assert result.status == "ok", result.reason
    assert [r.rank for r in result.ranks] == [0, 1]
    assert all(r.memory["inference"].gpu_allocated_peak_gib.value > 0 for r in result.ranks)
    assert result.drift.metrics["latent_cosine"].value > 0.99  # the same image as one GPU computes, to bf16


def test_fa3_agrees_with_sdpa_where_it_is_installed():
    import importlib.util

    from flux2bench.axes.attention import TOLERANCE, agreement_with_sdpa

    if importlib.util.find_spec("flash_attn_interface") is None:
        pytest.skip("flash_attn_interface is not installed")
    assert agreement_with_sdpa("_flash_3", torch.device("cuda", 0)) <= TOLERANCE
