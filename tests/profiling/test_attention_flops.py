"""The attention share of a step's FLOPs (flux2bench.flops.attention_flops), which the profile rates attention by:
what torch's FLOP counter counts in attention's batched products (the math SDPA backend) on the tiny transformers."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flux2bench.flops import attention_flops, transformer_flops
from flux2bench.models import MODELS


@pytest.mark.parametrize("model,batch,image_tokens,text_tokens", [("tiny", 2, 64, 24), ("tiny-klein", 1, 256, 32)])
def test_the_attention_flops_are_the_batched_products_of_attention(model, batch, image_tokens, text_tokens):
    config = MODELS[model].config("transformer")
    transformer = Flux2Transformer2DModel.from_config(config).eval()
    inputs = dict(hidden_states=torch.randn(batch, image_tokens, config["in_channels"]),
                  encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"]),
                  timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(image_tokens, 4),
                  txt_ids=torch.zeros(text_tokens, 4),
                  guidance=torch.full((batch,), 4.0) if config["guidance_embeds"] else None)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    counted = counter.get_flop_counts()["Global"]
    attention = attention_flops(config, batch, image_tokens, text_tokens)
    assert attention == pytest.approx(counted[torch.ops.aten.bmm], rel=0.02)
    assert 0 < attention < transformer_flops(config, batch, image_tokens, text_tokens)
