"""Random weights for synthetic models: one pool of normal values, tiled into every parameter with its own scale.

A parameter's values depend only on the seed, its index among the model's parameters and its shape, so the bf16
model and a quantized one built with the same seed hold the same numbers (the quantized one quantizes them).
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.bfloat16
POOL_SIZE = 1 << 22
OFFSET_STRIDE = 7919  # parameter i starts at pool position i * OFFSET_STRIDE


def random_pool(seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = DTYPE) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(POOL_SIZE, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def init_scale(name: str, shape: torch.Size) -> tuple[float, float]:
    """(std, mean) in the spirit of the default init: 1/sqrt(fan_in) for matrices, ~1 for norm weights."""
    if len(shape) >= 2:
        return 1 / math.sqrt(math.prod(shape[1:])), 0.0
    if name.endswith("bias"):
        return 0.02, 0.0
    return 0.02, 1.0


def fill_(tensor: torch.Tensor, name: str, index: int, pool: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` (parameter number ``index``, called ``name``) with its random values, in place."""
    std, mean = init_scale(name, tensor.shape)
    flat = tensor.view(-1)
    offset, pos = index * OFFSET_STRIDE, 0
    while pos < flat.numel():
        start = (offset + pos) % pool.numel()
        n = min(flat.numel() - pos, pool.numel() - start)
        torch.mul(pool[start:start + n], std, out=flat[pos:pos + n])
        pos += n
    if mean:
        tensor.add_(mean)
    return tensor


def random_value(name: str, shape: torch.Size, index: int, pool: torch.Tensor) -> torch.Tensor:
    """The bf16 values of parameter number ``index``, on the pool's device."""
    return fill_(torch.empty(shape, dtype=DTYPE, device=pool.device), name, index, pool)


def materialize(module: torch.nn.Module, device: torch.device, seed: int = 0) -> None:
    """Allocate every meta parameter of ``module`` on ``device`` in bf16 and fill it with its random values; a
    parameter shared by several modules (tied embeddings) stays shared."""
    pool = random_pool(seed, device)
    made: dict[int, torch.nn.Parameter] = {}
    for index, (name, param) in enumerate(module.named_parameters()):
        if param.is_meta:
            value = torch.empty(param.shape, dtype=DTYPE if param.is_floating_point() else param.dtype, device=device)
            made[id(param)] = torch.nn.Parameter(fill_(value, name, index, pool), requires_grad=False)
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        if id(param) in made:
            owner_name, _, attr = name.rpartition(".")
            module.get_submodule(owner_name)._parameters[attr] = made[id(param)]
    module.to(device)  # buffers (rotary frequencies, batch-norm statistics) were built for real on the CPU
