"""``fuse_qkv: true``: diffusers' fused QKV projections on FLUX.2, where its attention modules support them, and a
refusal with the reason, before loading, where the transformer's weights are quantized."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from conftest import TINY
from flux2bench.axes import fused_projections, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.errors import Unsupported
from flux2bench.scenario import Block
from flux2bench.sources import load_pipeline

CPU = torch.device("cpu")


def plan(case) -> LoadPlan:
    return registry.plan_load(case, LoadPlan(device=CPU, home=CPU))


def latents(pipe, case) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(prompt="a red fox", width=case.width, height=case.height, num_inference_steps=1,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_the_double_stream_attention_is_fused_and_computes_the_same(tiny_case):
    case = tiny_case(fuse_qkv=True)
    fused_projections.AXIS.check(case, plan(case))
    pipe = load_pipeline(case, plan(case))
    unfused = latents(pipe, case)
    applied = fused_projections.AXIS.apply(pipe, case, plan(case))
    assert applied["fused"] == {"Flux2Attention": 1}  # the tiny model's one double-stream block
    assert applied["already_fused"] == ["Flux2ParallelSelfAttention"]
    attention = pipe.transformer.transformer_blocks[0].attn
    assert attention.fused_projections and attention.to_qkv.weight.shape[0] == 3 * attention.to_q.weight.shape[0]
    # the fused layers are added beside the unfused ones, which diffusers keeps
    added = sum(p.numel() * p.element_size() for name, p in attention.named_parameters() if "qkv" in name)
    assert applied["weights_added_bytes"] == added > 0
    assert torch.allclose(latents(pipe, case), unfused, rtol=0, atol=1e-2)


def test_the_option_is_a_boolean():
    assert Block.model_validate({**TINY, "fuse_qkv": "yes"})
    with pytest.raises(ValidationError):
        Block.model_validate({**TINY, "fuse_qkv": "fused"})


def test_the_option_is_in_the_label_and_out_of_the_key_at_its_default(tiny_case):
    assert "fused-qkv" in tiny_case(fuse_qkv=True).label and "fused-qkv" not in tiny_case().label
    assert tiny_case(fuse_qkv=False).key == tiny_case().key != tiny_case(fuse_qkv=True).key


@pytest.mark.parametrize("precision", ["int8", "fp8", "fp8_row", "nf4"])
def test_a_quantized_transformer_is_refused_before_loading(tiny_case, precision):
    case = tiny_case(fuse_qkv=True, precision=precision)
    with pytest.raises(Unsupported, match=f"fuse_qkv with a {precision} transformer: diffusers' fuse_projections"):
        fused_projections.AXIS.check(case, plan(case))


def test_a_quantized_text_encoder_leaves_fusion_possible(tiny_case):
    case = tiny_case(fuse_qkv=True, text_encoder_precision="int8")
    fused_projections.AXIS.check(case, plan(case))


# What the refusal's reason says of torchao 0.18, checked with its own tensors: if a torchao release fuses its
# weights, these fail, and the refusal is to be revisited.

@pytest.mark.slow
def test_torchaos_int8_weights_cannot_be_fused_by_diffusers(tiny_case):
    case = tiny_case(precision="int8")
    pipe = load_pipeline(case, plan(case))
    with pytest.raises(NotImplementedError, match="aten.cat"):
        pipe.transformer.fuse_qkv_projections()


def float8(granularity):
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    return [Float8Tensor.from_hp(torch.randn(32, 32, dtype=torch.bfloat16), granularity=granularity)
            for _ in range(3)]


def test_per_tensor_float8_weights_cannot_be_concatenated():
    from torchao.quantization import PerTensor

    with pytest.raises(AssertionError):
        torch.cat(float8(PerTensor()))


def test_per_row_float8_weights_concatenate_but_cannot_be_copied_into_a_bf16_layer():
    from torchao.quantization import PerRow

    fused = torch.cat(float8(PerRow()))
    layer = torch.nn.Linear(32, 96, bias=False, dtype=torch.bfloat16)
    with pytest.raises(AttributeError), torch.no_grad():
        layer.weight.copy_(fused)
