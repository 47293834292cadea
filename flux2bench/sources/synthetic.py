"""Synthetic weights: the exact architecture from the configs shipped in ``flux2bench/configs/<model>/`` (the public
config.json values), with random weights.

Modules are built on the meta device (no memory, no init cost) and each parameter is then allocated directly
where it will live (GPU, or host RAM for offload cases) in its final dtype and filled with scaled random normal
values; no fp32 copy is ever built. Quantized precisions go through the libraries' loaders (``quantized``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from flux2bench.axes.base import LoadPlan
from flux2bench.models import ModelSpec
from flux2bench.sources.quantized import build_quantized
from flux2bench.sources.random_weights import DTYPE, materialize

# Component order fixes each component's random seed (its index).
PIPELINE_COMPONENTS = ("scheduler", "tokenizer", "vae", "text_encoder", "transformer")


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A module built on the meta device with bf16 as the default dtype."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with init_empty_weights(include_buffers=False):
            return factory()
    finally:
        torch.set_default_dtype(previous)


def meta_module(spec: ModelSpec, component: str) -> torch.nn.Module:
    """One model component of ``spec`` on the meta device."""
    import diffusers

    if component == "text_encoder":
        module = build_on_meta(spec.text_encoder)
        # Built on the meta device, tied embeddings (Qwen3-4B) are two parameters until tied again, outside the
        # meta context (which re-creates every parameter it registers): else the vocabulary would count twice.
        if getattr(module.config, "tie_word_embeddings", False):
            module.tie_weights()
        return module
    config = spec.config(component)
    cls = getattr(diffusers, config.pop("_class_name"))
    return build_on_meta(lambda: cls.from_config(config))


def synthetic_component(spec: ModelSpec, component: str, device: torch.device | None, seed: int = 0,
                        precision: str = "bf16") -> Any:
    """One pipeline component with random weights on ``device`` (the scheduler and tokenizer included)."""
    import diffusers

    if component == "scheduler":
        config = spec.config("scheduler")
        return getattr(diffusers, config.pop("_class_name")).from_config(config)
    if component == "tokenizer":
        return spec.tokenizer()
    module = meta_module(spec, component)
    if precision != "bf16":
        return build_quantized(module, component, precision, device, seed)
    materialize(module, device, seed=seed)
    return module.eval()


def synthetic_pipeline(spec: ModelSpec, plan: LoadPlan) -> Any:
    """A pipeline of ``spec`` with synthetic weights as ``plan`` places them; skipped components are None."""
    placement = plan.placement
    components = {}
    for seed, name in enumerate(PIPELINE_COMPONENTS):
        skipped = name in plan.skip
        components[name] = None if skipped else synthetic_component(
            spec, name, placement.get(name), seed=seed, precision=plan.precisions.get(name, "bf16"))
    return spec.pipeline_class()(**components, **spec.pipeline_options)
