"""The storages that hold a pipeline's weights, with their owner (component, storage dtype, quantized or not).

Quantized weights are tensor subclasses or parameters with side tensors: torchao's tensors flatten into their inner
tensors (``__tensor_flatten__``: data and scales), bitsandbytes' ``Params4bit`` keeps its 4-bit data as the
parameter's own storage and its ``quant_state`` (absmax, code, nested state) beside it. Every inner tensor counts
for the weight it belongs to.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from flux2bench.profiling.memory import Owner, WeightMap


def components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's modules by component name (transformer, text_encoder, vae)."""
    return {name: module for name, module in getattr(pipe, "components", {}).items()
            if isinstance(module, torch.nn.Module)}


def _is_subclass(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


def _side_tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors a quantization state object keeps (bitsandbytes' QuantState: absmax, code, a nested state2)."""
    if depth > 3:
        return
    for item in vars(value).values():
        if isinstance(item, torch.Tensor):
            yield item
        elif type(item).__name__ == "QuantState":
            yield from _side_tensors(item, depth + 1)


def inner_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s bytes."""
    if _is_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):
                yield from inner_tensors(inner)
        return
    yield tensor
    for item in getattr(tensor, "__dict__", {}).values():  # bitsandbytes keeps side tensors on the parameter
        if isinstance(item, torch.Tensor) and item is not tensor:
            yield item
        elif type(item).__name__ == "QuantState":
            yield from _side_tensors(item)


def owner_of(component: str, tensor: torch.Tensor) -> Owner:
    """The owner of a parameter or buffer: its storage dtype (the largest inner tensor's; bitsandbytes' format, e.g.
    nf4, beside it) and whether it is quantized."""
    inner = list(inner_tensors(tensor))
    largest = max(inner, key=lambda t: t.numel() * t.element_size())
    quant_state = getattr(tensor, "quant_state", None)
    quantized = _is_subclass(tensor) or quant_state is not None or len(inner) > 1
    dtype = str(largest.dtype).removeprefix("torch.")
    if quant_state is not None and getattr(quant_state, "quant_type", None):
        dtype = f"{dtype} ({quant_state.quant_type})"
    return Owner(component, dtype, quantized)


def weight_storages(pipe: Any, device_type: str = "cuda") -> Iterator[tuple[int, int, Owner]]:
    """(address, bytes, owner) of every storage on ``device_type`` that holds a weight of the pipeline."""
    for component, module in components(pipe).items():
        for tensor in [*module.parameters(), *module.buffers()]:
            owner = owner_of(component, tensor)
            for inner in inner_tensors(tensor):
                if inner.device.type == device_type:
                    storage = inner.untyped_storage()
                    yield storage.data_ptr(), storage.nbytes(), owner


def weight_map(pipe: Any, device_type: str = "cuda") -> WeightMap:
    return WeightMap(weight_storages(pipe, device_type))
