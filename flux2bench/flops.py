"""FLOPs of a denoising step, from the transformer's config and the token counts of its calls (flux2bench.metrics
holds them against the measured s/step and the card's dense peak).

A FLOP is one multiply or one add of a matrix product (2 per multiply-add), as ``torch.utils.flop_counter`` counts
them; norms, activations, RoPE and softmax are not counted. For diffusers' ``Flux2Transformer2DModel`` with width
``D`` (heads x head dim), MLP width ``M`` (``D * mlp_ratio``), ``I`` image tokens (the generated image's latents and
every reference image's), ``T`` text tokens and ``N = I + T``, per sample:
- each double-stream block: q, k, v and out projections of both streams ``8 N D^2``, the SwiGLU MLPs of both
  streams ``6 N D M``, attention over the joint sequence ``4 N^2 D`` (``Q K^T`` and ``A V``);
- each single-stream block: the fused qkv+MLP-in projection ``2 N D (3D + 2M)`` and the fused out projection
  ``2 N (D + M) D``, plus attention ``4 N^2 D``: the same total as a double-stream block;
- once: the input embedders ``2 I C_in D + 2 T J D``, the output projection ``2 I D C_out``, and per sample the
  timestep (and guidance) embedders, the three modulations and the output norm's projection.
A step is every transformer call it makes (two, or a doubled batch, for classifier-free guidance); the record
holds each call's batch and token counts, so no count is guessed from the case.
"""

from __future__ import annotations

from typing import Any

from flux2bench.axes import cache
from flux2bench.models import MODELS
from flux2bench.results import CaseResult, Metric

METHOD = ("matrix-product FLOPs of Flux2Transformer2DModel from its config and the batch and token counts of each "
          "transformer call of the first timed step (flux2bench.flops)")


def attention_flops(config: dict[str, Any], batch: int, image_tokens: int, text_tokens: int) -> int:
    """The attention part of ``transformer_flops``: ``Q K^T`` and ``A V`` over the joint sequence, every block."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n = image_tokens + text_tokens
    return batch * (config["num_layers"] + config["num_single_layers"]) * 4 * n * n * d


def transformer_flops(config: dict[str, Any], batch: int, image_tokens: int, text_tokens: int) -> int:
    """FLOPs of one ``Flux2Transformer2DModel`` forward (see the module's docstring)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    m = int(d * config["mlp_ratio"])
    n = image_tokens + text_tokens
    c_in = config["in_channels"] * config["patch_size"] ** 2
    c_out = (config["out_channels"] or config["in_channels"]) * config["patch_size"] ** 2
    block = 8 * n * d * d + 6 * n * d * m + 4 * n * n * d
    blocks = (config["num_layers"] + config["num_single_layers"]) * block
    embedders = 2 * image_tokens * c_in * d + 2 * text_tokens * config["joint_attention_dim"] * d
    output = 2 * image_tokens * d * c_out
    timestep = 2 * (config["timestep_guidance_channels"] * d + d * d)  # TimestepEmbedding: two linear layers
    conditioning = timestep * (2 if config["guidance_embeds"] else 1) + 2 * d * 15 * d + 2 * d * 2 * d
    return batch * (blocks + embedders + output + conditioning)


def step_flops(result: CaseResult) -> Metric:
    """FLOPs of one denoising step of the case, from the transformer calls its record holds."""
    calls = result.latency.transformer_calls if result.latency else []
    if not calls:
        return Metric.missing(METHOD, "no transformer call recorded (a record of an earlier version, or no timed "
                                      f"image: status {result.status})")
    if cache.AXIS.caches(result.case):
        return Metric.missing(METHOD, "a step cache computes some steps and reuses others: no one step's FLOPs")
    config = MODELS[result.case.model].config("transformer")
    return Metric(float(sum(transformer_flops(config, *call) for call in calls)), METHOD)


def step_attention_flops(result: CaseResult) -> Metric:
    """The attention part of ``step_flops``; the rest of a step's FLOPs are the other matrix products."""
    total = step_flops(result)
    if total.value is None:
        return total
    config = MODELS[result.case.model].config("transformer")
    calls = result.latency.transformer_calls if result.latency else []
    return Metric(float(sum(attention_flops(config, *call) for call in calls)), f"{METHOD}; attention: 4 N^2 D a block")
