"""FP8 attention (``attention_precision: fp8``, torchao's FP8_FA3) and FlashAttention-4 (``attention: fa4``): what
they need is checked before loading, each refusal with its reason; the pipeline runs with the transformer wrapped
the way torchao wraps it. The kernels themselves run on a Hopper GPU (tests/axes/test_recipe_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pydantic import ValidationError

from conftest import TINY
from flux2bench.axes import attention, attention_fp8, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.errors import MachineLacks, Unsupported
from flux2bench.scenario import Block
from flux2bench.sources import load_pipeline

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def plan(case, device=CPU) -> LoadPlan:
    return registry.plan_load(case, LoadPlan(device=device, home=device))


# --- FP8 attention ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["fp4", "int8", True])
def test_attention_precision_takes_bf16_or_fp8(value):
    with pytest.raises(ValidationError):
        Block.model_validate({**TINY, "attention_precision": value})

def test_fp8_attention_replaces_sdpa_so_another_backend_is_refused_whatever_the_machine(tiny_case):
    case = tiny_case(attention_precision="fp8", attention="fa3")
    with pytest.raises(Unsupported, match="only attention: sdpa calls") as refused:
        attention_fp8.AXIS.check(case, plan(case, CUDA))
    assert not isinstance(refused.value, MachineLacks)


def test_fp8_attention_on_the_cpu_is_a_machine_that_lacks_it(tiny_case):
    case = tiny_case(attention_precision="fp8")
    with pytest.raises(MachineLacks, match="need a CUDA GPU"):
        attention_fp8.AXIS.check(case, plan(case))


@pytest.fixture
def a_gpu(monkeypatch):
    """``a_gpu(major, minor)``: this process sees a CUDA GPU of that compute capability."""
    def set_capability(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


def test_fp8_attention_off_hopper_is_a_machine_that_lacks_it(tiny_case, a_gpu):
    a_gpu(8, 9)
    case = tiny_case(attention_precision="fp8")
    with pytest.raises(MachineLacks, match="Hopper .SM 9.x. only; this GPU is SM 8.9"):
        attention_fp8.AXIS.check(case, plan(case, CUDA))


def test_fp8_attention_without_an_fa3_build_says_what_is_missing(tiny_case, a_gpu, monkeypatch):
    a_gpu(9)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "flash_attn_interface" else real(name, *args))
    case = tiny_case(attention_precision="fp8")
    with pytest.raises(MachineLacks, match="no FlashAttention-3 build .flash_attn_interface."):
        attention_fp8.AXIS.check(case, plan(case, CUDA))


def test_fp8_attention_has_its_label_a_bf16_drift_baseline_and_no_key_at_its_default(tiny_case):
    assert "attn=fp8" in tiny_case(attention_precision="fp8").label
    assert tiny_case(attention_precision="bf16").key == tiny_case().key
    assert registry.drift_baseline_values()["attention_precision"] == "bf16"


def test_the_pipeline_runs_with_its_transformer_wrapped_as_torchao_wraps_it(tiny_case, monkeypatch):
    """torchao's wrapper proxies the transformer's attributes; the pipeline holds it, and what compiles the model
    finds the model inside."""
    from torchao.prototype import attention as torchao_attention
    from torchao.prototype.attention.shared_utils.wrapper import _LowPrecisionAttentionWrapper

    calls = []

    class CountingWrapper(_LowPrecisionAttentionWrapper):  # torchao's base: its attribute proxy, a counting forward
        def forward(self, *args, **kwargs):
            calls.append(1)
            return self._orig_mod(*args, **kwargs)

    monkeypatch.setattr(torchao_attention, "apply_low_precision_attention",
                        lambda model, backend: CountingWrapper(model))
    case = tiny_case(attention_precision="fp8")
    pipe = load_pipeline(case, plan(case))
    model = pipe.transformer
    applied = attention_fp8.AXIS.apply(pipe, case, plan(case))
    assert applied["method"].startswith("torchao.prototype.attention.apply_low_precision_attention")
    assert isinstance(pipe.transformer, CountingWrapper) and attention_fp8.AXIS.model_of(pipe.transformer) is model
    assert attention_fp8.AXIS.model_of(model) is model
    with torch.inference_mode():
        pipe(prompt="a red fox", width=64, height=64, num_inference_steps=2, output_type="latent")
    assert len(calls) == 2


# --- FlashAttention-4 --------------------------------------------------------------------------------------------

def test_fa4_is_torchs_flash_sdpa_through_diffusers_native_flash_backend():
    assert attention.backend_name("fa4") == "_native_flash"


def test_fa4_on_the_cpu_is_a_machine_that_lacks_it(tiny_case):
    case = tiny_case(attention="fa4")
    with pytest.raises(MachineLacks, match="attention 'fa4': FlashAttention-4 needs a CUDA GPU"):
        attention.AXIS.check(case, plan(case))


def test_fa4_without_its_package_says_how_to_install_it(tiny_case, a_gpu, monkeypatch):
    a_gpu(9)
    real = importlib.util.find_spec

    def find(name, *args):
        if name.startswith("flash_attn"):
            raise ModuleNotFoundError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find)
    case = tiny_case(attention="fa4")
    with pytest.raises(MachineLacks, match="pip install flash-attn-4"):
        attention.AXIS.check(case, plan(case, CUDA))


def test_fa4_whose_cute_dsl_does_not_import_says_so_not_that_it_is_missing(a_gpu, monkeypatch):
    a_gpu(9)
    real = importlib.util.find_spec

    def find(name, *args):  # flash_attn is there; its interface imports cutlass, which is not on sys.path
        if name == attention.FA4_MODULE:
            raise ModuleNotFoundError("No module named 'cutlass'")
        return object() if name == "flash_attn" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find)
    why = attention.fa4_missing(CUDA)
    assert why.startswith("flash-attn-4 is installed") and "No module named 'cutlass'" in why and ".pth" in why


def test_an_fa4_kernel_that_fails_its_check_names_the_versions_that_met(monkeypatch):
    # flash-attn-4 4.0.0b40 under torch 2.11 on an H100: torch's FA4 glue unpacks two values from the package's
    # _flash_attn_fwd, which returns five
    def fails(*args):
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(attention, "agreement_with_sdpa", fails)
    monkeypatch.setattr(attention, "fa4_versions", lambda: "flash-attn-4 4.0.0b40, torch 2.11.0")
    with pytest.raises(MachineLacks, match=r"ValueError: too many values to unpack \(expected 2\) "
                                           r"\(flash-attn-4 4.0.0b40, torch 2.11.0\)"):
        attention.AXIS._verify("fa4", "_native_flash", CUDA)


def test_fa4_off_hopper_and_blackwell_is_a_machine_that_lacks_it(a_gpu, monkeypatch):
    a_gpu(8, 0)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    import torch.nn.attention as torch_attention

    monkeypatch.setattr(torch_attention, "list_flash_attention_impls", lambda: ["FA3", "FA4"])
    assert attention.fa4_missing(CUDA) == "FlashAttention-4 runs on SM 9.x and 10.x; this GPU is SM 8.x"
    monkeypatch.setattr(torch_attention, "list_flash_attention_impls", lambda: ["FA3"])
    assert "cannot register FA4" in attention.fa4_missing(CUDA)
