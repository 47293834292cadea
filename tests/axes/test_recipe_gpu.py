"""The recipe's axes on a CUDA GPU with the tiny pipeline: CUDA graphs recorded and counted, compiled code loaded by
a second run instead of compiled, and the FP8 attention and FlashAttention-4 kernels agreeing with SDPA where the
machine has them (skipped, saying what is missing, where it does not)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from flux2bench.axes import attention, attention_fp8, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.runner import Runner, SupervisorConfig, start_run

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda", 0)
TINY_GPU = """
defaults: {model: tiny, device: cuda, resolution: 64, steps: 2, warmup: 1, repeats: 2, prompts: a red fox,
           compile: regional, compile_fullgraph: true, drift_baseline: "off"}
"""


def plan(case) -> LoadPlan:
    return registry.plan_load(case, LoadPlan(device=CUDA, home=CUDA))


@pytest.fixture(scope="module")
def modes(run_scenario):
    return run_scenario(TINY_GPU + textwrap.dedent("""
        blocks:
          graphs: {compile: full, compile_mode: max-autotune}
          plain: {compile_mode: max-autotune-no-cudagraphs}
    """), "modes")


def test_max_autotune_records_cuda_graphs_and_counts_them(modes):
    graphs = modes["graphs"]
    assert graphs.status == "ok", graphs.reason
    counted = graphs.setup.axes["compile"]["events"]["cudagraphs"]
    assert counted["recordings"] > 0 and counted["skips"] == 0


def test_a_mode_without_cuda_graphs_counts_none(modes):
    plain = modes["plain"]
    assert plain.status == "ok", plain.reason
    assert "cudagraphs" not in plain.setup.axes["compile"]["events"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-compile-cache")
    scenario = root / "scenario.yaml"
    scenario.write_text(TINY_GPU + textwrap.dedent("""
        blocks:
          kept: {compile_cache: portable}
    """))
    results = []
    for name in ("first", "second"):
        store, cases = start_run(scenario, run_dir=root / name)
        (result,) = Runner(store, SupervisorConfig(cache=root / "cache")).run(cases)
        results.append(result)
    return results


def test_a_second_run_loads_the_compiled_code_and_its_first_call_is_shorter(two_runs):
    first, second = two_runs
    assert first.status == second.status == "ok", (first.reason, second.reason)
    assert first.setup.axes["compile_cache"]["outcome"] == "compiled"
    assert second.setup.axes["compile_cache"]["outcome"] == "loaded"
    assert second.latency.first_call_s < first.latency.first_call_s
    kernels = first.setup.axes["compile_cache"]["stored"]["kernels"]  # Triton's own cache folder travels too
    assert kernels["files"] > 0 and second.setup.axes["compile_cache"]["kernels"] == kernels


def test_fp8_attention_agrees_with_sdpa_where_hopper_and_fa3_are_here(tiny_case):
    if torch.cuda.get_device_capability(CUDA)[0] != attention_fp8.HOPPER:
        pytest.skip("FP8 attention (FA3) runs on Hopper only")
    if (missing := attention_fp8._missing_software()) is not None:
        pytest.skip(missing)
    case = tiny_case(attention_precision="fp8", device="cuda")
    attention_fp8.AXIS.check(case, plan(case))
    assert attention_fp8.agreement_with_sdpa(CUDA) <= attention_fp8.TOLERANCE


def test_fa4_agrees_with_sdpa_where_it_is_installed(tiny_case):
    if (missing := attention.fa4_missing(CUDA)) is not None:
        pytest.skip(missing)
    case = tiny_case(attention="fa4", device="cuda")
    attention.AXIS.check(case, plan(case))
    import torch.nn.attention as torch_attention

    assert torch_attention.current_flash_attention_impl() == "FA4"
