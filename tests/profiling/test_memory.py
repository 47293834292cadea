"""What holds the peak: the allocator's history, in the exact format torch.cuda.memory._snapshot() returns, replayed
to its peak, each live block given an owner, and the parts adding up to the device-level peak."""

from __future__ import annotations

import pytest
import torch

from flux2bench.profiling.memory import (ACTIVATIONS, OTHER_BEFORE, OUTSIDE, RESERVED_LATER, SLACK, Counters, Owner,
                                         WeightMap, frame_path, load_memory, made_by, moves_weights, peak_memory,
                                         replay)
from flux2bench.profiling.weights import inner_tensors, owner_of, weight_storages
from flux2bench.units import GIB

MIB = 2**20
A, B, C = 0x7F00_0000_0000, 0x7F10_0000_0000, 0x7F20_0000_0000  # segment addresses
BF16 = Owner("transformer", "bfloat16")
FP8 = Owner("transformer", "float8_e4m3fn", quantized=True)
ATTENTION = [{"filename": "/usr/lib/python3.12/site-packages/diffusers/models/attention_dispatch.py", "line": 812,
              "name": "_native_attention"},
             {"filename": "/usr/lib/python3.12/site-packages/diffusers/models/transformers/transformer_flux2.py",
              "line": 340, "name": "forward"}]
ONLOAD = [{"filename": "/usr/lib/python3.12/site-packages/torch/utils/_contextlib.py", "line": 120, "name": "ctx"},
          {"filename": "/usr/lib/python3.12/site-packages/diffusers/hooks/group_offloading.py", "line": 150,
           "name": "_onload_from_memory"},
          {"filename": "/usr/lib/python3.12/site-packages/diffusers/models/transformers/transformer_flux2.py",
           "line": 512, "name": "forward"}]
# An activation made by a module whose forward an offload hook wraps (leaf-level group offload hooks every conv):
# the hook's wrapper frames lie between torch's conv and the module that called it, as PyTorch records them.
HOOKED_CONV = [{"filename": "/tmp/site/torch/nn/modules/conv.py", "line": 548, "name": "_conv_forward"},
               {"filename": "/tmp/site/diffusers/hooks/hooks.py", "line": 217, "name": "new_forward"},
               {"filename": "/tmp/site/diffusers/hooks/hooks.py", "line": 217, "name": "new_forward"},
               {"filename": "/tmp/site/torch/nn/modules/module.py", "line": 1833, "name": "inner"},
               {"filename": "/tmp/site/diffusers/models/upsampling.py", "line": 186, "name": "forward"}]
# accelerate's model offload: its hook moves the whole model in pre_forward, and wraps forward in new_forward.
MODEL_TO_GPU = [{"filename": "/usr/lib/python3/site-packages/torch/nn/modules/module.py", "line": 1355, "name": "to"},
                {"filename": "/usr/lib/python3/site-packages/accelerate/hooks.py", "line": 700, "name": "pre_forward"}]
UNDER_MODEL_HOOK = [{"filename": "/usr/lib/python3/site-packages/torch/nn/modules/linear.py", "line": 125,
                     "name": "forward"},
                    {"filename": "/usr/lib/python3/site-packages/accelerate/hooks.py", "line": 175,
                     "name": "new_forward"},
                    {"filename": "/usr/lib/python3/site-packages/transformers/models/mistral/modeling_mistral.py",
                     "line": 80, "name": "forward"}]
GELU = [{"filename": "/usr/lib/python3.12/site-packages/torch/nn/functional.py", "line": 1700, "name": "gelu"}]


def block(address: int, size: int, state: str = "active_allocated") -> dict:
    return {"address": address, "size": size, "requested_size": size, "state": state, "frames": []}


def segment(address: int, total: int, blocks: list[dict]) -> dict:
    active = sum(b["size"] for b in blocks if b["state"] != "inactive")
    return {"device": 0, "address": address, "total_size": total, "stream": 0, "segment_type": "large",
            "segment_pool_id": (0, 0), "allocated_size": active, "active_size": active, "requested_size": active,
            "blocks": blocks}


def entry(action: str, addr: int, size: int, frames: list | None = None) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": 0, "frames": frames or [],
            "compile_context": "N/A"}


# Before the call: one 100 MiB segment with a bf16 weight, an fp8 weight, another block and free space.
START = {"segments": [segment(A, 100 * MIB, [block(A, 40 * MIB), block(A + 40 * MIB, 20 * MIB),
                                             block(A + 60 * MIB, 10 * MIB), block(A + 70 * MIB, 30 * MIB, "inactive")])],
         "device_traces": [[]]}
# The call: a new segment, attention's output, weights moved in by offload hooks (the peak: 70 + 32 + 16 MiB),
# then frees, a smaller activation, and a segment reserved after the peak.
TRACE = [entry("segment_alloc", B, 64 * MIB), entry("alloc", B, 32 * MIB, ATTENTION),
         entry("alloc", B + 32 * MIB, 16 * MIB, ONLOAD), entry("free_requested", B, 32 * MIB),
         entry("free_completed", B, 32 * MIB), entry("alloc", B, 8 * MIB, GELU),
         entry("free_completed", B + 32 * MIB, 16 * MIB), entry("segment_alloc", C, 36 * MIB),
         entry("alloc", C, 20 * MIB, GELU), entry("free_completed", C, 20 * MIB)]
END = {"segments": [], "device_traces": [TRACE]}
WEIGHTS = WeightMap([(A, 40 * MIB, BF16), (A + 40 * MIB, 16 * MIB, FP8), (A + 56 * MIB, 4 * MIB, FP8)])
COUNTERS = Counters(allocated_peak=118 * MIB, reserved_peak=200 * MIB, device_peak=250 * MIB)


def gib(mib: float) -> float:
    return mib * MIB / GIB


def parts_of(memory) -> dict[str, float]:
    return {part.name: part.gib for part in memory.parts}


def test_the_replay_stops_at_the_first_moment_the_allocated_bytes_peak():
    state = replay(START, TRACE, WEIGHTS)
    assert (state.allocated, state.reserved) == (118 * MIB, 164 * MIB)
    assert sorted(block.size // MIB for block in state.live) == [10, 16, 20, 32, 40]


def test_each_owner_of_the_peak_is_named_and_the_parts_add_up_to_the_device_peak():
    memory = peak_memory(START, END, 0, WEIGHTS, COUNTERS)
    assert parts_of(memory) == {
        BF16.label: gib(40), FP8.label: gib(20),
        "weights: transformer, moved onto the GPU during the call (offload)": gib(16),
        OTHER_BEFORE: gib(10), ACTIVATIONS: gib(32), SLACK: gib(164 - 118), RESERVED_LATER: gib(200 - 164),
        OUTSIDE: gib(250 - 200)}
    assert memory.total_gib == pytest.approx(gib(250)) == pytest.approx(sum(parts_of(memory).values()))
    assert memory.replayed_allocated_peak_gib == memory.allocated_peak_gib == gib(118)
    assert "NVML" in memory.total_basis


def test_the_largest_allocations_at_the_peak_name_the_code_that_made_them():
    top = peak_memory(START, END, 0, WEIGHTS, COUNTERS).top
    assert [(a.gib, a.count, a.made_by, a.component, a.weights) for a in top] == [
        (gib(32), 1, "diffusers/models/attention_dispatch.py:812 _native_attention", "transformer", False),
        (gib(16), 1, "diffusers/hooks/group_offloading.py:150 _onload_from_memory", "transformer", True)]


def test_only_the_hooks_own_copies_are_weights_an_activation_under_a_hook_is_an_activation():
    assert moves_weights(ONLOAD) and moves_weights(MODEL_TO_GPU)
    assert not moves_weights(HOOKED_CONV) and not moves_weights(UNDER_MODEL_HOOK)
    assert not moves_weights(ATTENTION) and not moves_weights([])


def test_frames_are_named_from_their_library_wherever_it_was_installed():
    assert made_by(HOOKED_CONV) == "diffusers/models/upsampling.py:186 forward"
    assert frame_path("/work/.whl-bnb/bitsandbytes/backends/cuda/ops.py") == "bitsandbytes/backends/cuda/ops.py"
    assert frame_path("/home/me/model.py") == "/home/me/model.py"


def test_allocations_are_named_after_their_module_where_the_history_carries_it():
    labelled = [dict(e, user_metadata="transformer.transformer_blocks.0.attn") if e["action"] == "alloc" else e
                for e in TRACE]
    top = peak_memory(START, {"segments": [], "device_traces": [labelled]}, 0, WEIGHTS, COUNTERS).top
    assert {a.module for a in top} == {"transformer.transformer_blocks.0.attn"}


def test_without_a_device_level_peak_the_total_is_the_reserved_peak_and_nothing_lies_outside():
    memory = peak_memory(START, END, 0, WEIGHTS, Counters(118 * MIB, 200 * MIB, None, "NVML unavailable: no GPU"))
    assert memory.total_gib == gib(200) and parts_of(memory)[OUTSIDE] == 0
    assert "NVML unavailable" in memory.total_basis


def test_a_sampled_device_peak_below_the_reserved_peak_is_not_taken_as_the_total():
    memory = peak_memory(START, END, 0, WEIGHTS, Counters(118 * MIB, 200 * MIB, 190 * MIB))
    assert memory.total_gib == gib(200) and memory.device_peak_gib == gib(190)


def test_a_history_that_does_not_replay_to_the_allocators_own_peak_is_refused():
    with pytest.raises(ValueError, match="history is incomplete"):
        peak_memory(START, END, 0, WEIGHTS, Counters(160 * MIB, 200 * MIB, 250 * MIB))


def test_a_block_is_owned_by_whoever_holds_most_of_its_bytes():
    weights = WeightMap([(A + 4096, 10 * MIB, BF16), (A + 10 * MIB + 4096, 1 * MIB, FP8)])
    assert weights.owner(A, 12 * MIB) == BF16
    assert weights.owner(A + 20 * MIB, MIB) is None


def test_the_load_phase_is_the_resident_weights_against_its_allocator_peak():
    load = load_memory(WEIGHTS, allocated_peak_gib=gib(100), moves_weights_=False)
    assert {p.name: p.gib for p in load.weights} == {BF16.label: gib(40), FP8.label: gib(20)}
    assert (load.weights_gib, load.transient_gib) == (gib(60), gib(40))
    assert "no allocation history is recorded" in load.method


def test_a_quantized_weight_counts_every_inner_tensor():
    torchao = pytest.importorskip("torchao.quantization")
    layer = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    torchao.quantize_(layer, torchao.Int8WeightOnlyConfig())
    inner = list(inner_tensors(layer.weight))
    assert {t.dtype for t in inner} >= {torch.int8} and len(inner) >= 2
    assert owner_of("transformer", layer.weight) == Owner("transformer", "int8", quantized=True)


def test_a_bitsandbytes_4bit_weight_counts_its_quant_state():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    inner = list(inner_tensors(layer.weight))
    assert any(t is layer.weight.quant_state.absmax for t in inner)
    assert owner_of("transformer", layer.weight) == Owner("transformer", "uint8 (nf4)", quantized=True)


def test_the_storages_of_a_pipeline_are_found_on_their_device():
    class Pipe:
        components = {"transformer": torch.nn.Linear(8, 8), "vae": torch.nn.Conv2d(3, 3, 1), "scheduler": object()}

    found = list(weight_storages(Pipe(), device_type="cpu"))
    assert {owner for _, _, owner in found} == {Owner("transformer", "float32"), Owner("vae", "float32")}
    assert sum(size for _, size, _ in found) == (8 * 8 + 8 + 3 * 3 + 3) * 4
    assert list(weight_storages(Pipe(), device_type="cuda")) == []
