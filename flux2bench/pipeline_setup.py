"""Pipeline setup: where components are loaded, and the offload, attention and memory-cap settings.

Every function here takes a ``Case`` and a loaded (or about to be loaded) pipeline and applies one
concern the way diffusers documents it; ``describe`` of each returns what was really applied, which
the worker stores next to the measurements.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from flux2bench.quantization import check_offload_supported, check_precision_supported, quantizes_on_the_gpu
from flux2bench.scenario import Case
from flux2bench.sources import Unsupported

COMPONENTS = ("text_encoder", "transformer", "vae")
GIB = 2**30


def resolve_device(case: Case) -> torch.device:
    if case.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if case.device == "cuda":
        raise Unsupported("the case asks for device: cuda and no CUDA GPU is visible")
    return torch.device("cpu")


def check_supported(case: Case, device: torch.device) -> None:
    """Reject, before any loading, what cannot run here; the message says which and why."""
    if device.type != "cuda":
        if case.offload != "none":
            raise Unsupported(f"offload: {case.offload} moves weights between host and an accelerator; no CUDA GPU here")
        if case.max_vram_gib is not None:
            raise Unsupported("max_vram_gib caps the CUDA allocator; no CUDA GPU here")
    for precision in held_precisions(case):
        check_precision_supported(precision, device)
        check_offload_supported(precision, case.offload)


def held_precisions(case: Case) -> set[str]:
    """The precisions of the components the measured pipeline holds."""
    return {case.precision} | ({case.text_encoder_precision} if case.text_encoder == "local" else set())


def placement(case: Case, device: torch.device) -> dict[str, torch.device]:
    """Where each component's weights are created: on the GPU, or in host RAM when an offload mode moves them.

    A pipeline with a torchao-quantized component is loaded onto the GPU in every offload mode, as diffusers'
    torchao guide loads it (``device_map="cuda"`` quantizes each layer on the GPU; quantizing the 32B transformer
    on the CPU takes many minutes); the offload mode then moves it.
    """
    quantized_on_gpu = device.type == "cuda" and any(map(quantizes_on_the_gpu, held_precisions(case)))
    home = device if case.offload == "none" or quantized_on_gpu else torch.device("cpu")
    return {name: home for name in COMPONENTS}


def skipped_components(case: Case) -> tuple[str, ...]:
    """Components the measured pipeline does not hold (precomputed prompt embeddings replace the text encoder)."""
    return ("text_encoder",) if case.text_encoder == "precomputed" else ()


def cap_vram(case: Case, device: torch.device) -> dict[str, Any] | None:
    """Emulate a smaller card by capping this process's CUDA allocator; returns what was set."""
    if case.max_vram_gib is None:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = case.max_vram_gib * GIB / total
    if fraction > 1:
        raise Unsupported(f"max_vram_gib {case.max_vram_gib} is more than this GPU's {total / GIB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {
        "max_vram_gib": case.max_vram_gib,
        "fraction": fraction,
        "method": "torch.cuda.set_per_process_memory_fraction",
        "limits": "caps the PyTorch caching allocator only; the CUDA context (~0.5 GiB), cuBLAS workspaces and "
                  "memory taken outside PyTorch's allocator are not counted against the cap",
    }


def apply_offload(pipe: Any, case: Case, device: torch.device) -> dict[str, Any]:
    if case.offload == "none":
        pipe.to(device)
    elif case.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif case.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        options = dict(
            offload_type="leaf_level" if case.offload == "group_leaf" else "block_level",
            use_stream=case.use_stream, record_stream=case.record_stream, low_cpu_mem_usage=case.low_cpu_mem_usage,
        )
        if case.offload == "group_block":
            options["num_blocks_per_group"] = case.num_blocks_per_group
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), **options)
        return {"offload": case.offload, "method": "pipe.enable_group_offload", **options}
    method = {"none": "pipe.to", "model": "pipe.enable_model_cpu_offload",
              "sequential": "pipe.enable_sequential_cpu_offload"}[case.offload]
    return {"offload": case.offload, "method": method}


def attention_backend_name(requested: str) -> str:
    """Map the scenario's attention name to a diffusers backend name."""
    if requested == "sdpa":
        return "native"
    if requested == "fa3":
        return "_flash_3" if importlib.util.find_spec("flash_attn_interface") else "_flash_3_hub"
    return requested


def check_attention_available(case: Case) -> None:
    """Fail fast, before a 100 GB load, when diffusers cannot run the requested backend here."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    backend = attention_backend_name(case.attention)
    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except Exception as exc:  # unknown name (ValueError) or missing package (RuntimeError)
        raise Unsupported(f"attention {case.attention!r} (diffusers backend {backend!r}) is not available: {exc}") from exc


def apply_attention(pipe: Any, case: Case) -> dict[str, Any]:
    backend = attention_backend_name(case.attention)
    try:
        pipe.transformer.set_attention_backend(backend)
    except Exception as exc:  # e.g. a hub kernel that cannot be downloaded
        raise Unsupported(f"attention {case.attention!r} (diffusers backend {backend!r}) is not available: {exc}") from exc
    return {"requested": case.attention, "backend": backend, "method": "transformer.set_attention_backend"}
