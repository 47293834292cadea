"""What holds the device peak: the allocator's recorded history replayed to its peak, each live block given an owner.

The input is two snapshots in the format ``torch.cuda.memory._snapshot()`` returns: ``start`` (taken as recording
began: the blocks alive before the call, weights among them, with addresses) and ``end`` (taken after the call, with
``device_traces``: every alloc / free_requested / free_completed / segment_alloc / segment_free since ``start``).
Replaying the trace forward from ``start`` finds the moment the allocated bytes peak and the blocks alive then:
- blocks alive before the call are matched by address to the pipeline's weights (``WeightMap``) and named
  "weights: <component> <storage dtype>", or "allocated before the call (other)";
- blocks allocated during the call are attributed by their frames: offload hooks moving weights onto the GPU
  (weights of their component), else activations and temporaries, grouped by the code that made them.
The parts then add up to the device-level peak: allocated at the peak, the allocator's slack at that moment
(reserved minus allocated), segments reserved later in the call, and what lies outside the allocator (the
device-level peak minus the allocator's reserved peak: CUDA context, libraries' own allocations).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from flux2bench.profiling.record import Allocation, LoadMemory, MemoryPart, PeakMemory
from flux2bench.units import GIB

TOP_ALLOCATIONS = 10
# The replayed peak must match the allocator's own counter this closely, else the history is incomplete.
REPLAY_TOLERANCE = 0.01
OTHER_BEFORE = "allocated before the call (other)"
ACTIVATIONS = "activations and temporaries (allocated during the call)"
SLACK = "allocator slack (reserved minus allocated at the peak)"
RESERVED_LATER = "segments reserved later in the call"
OUTSIDE = "outside the allocator (CUDA context, library workspaces)"

# Where a frame's file lies tells which component's code allocated (first match, innermost frame first).
COMPONENT_PATHS = (("diffusers/models/transformers/", "transformer"), ("diffusers/models/autoencoders/", "vae"),
                   ("transformers/models/", "text_encoder"))
# Frames of the code that moves weights onto the GPU during a call (offload hooks): a file, and the functions in it
# that move (None: all of them).
WEIGHT_MOVERS = (("diffusers/hooks/group_offloading.py", None), ("accelerate/hooks.py", ("pre_forward", "init_hook")),
                 ("accelerate/utils/modeling.py", None))
# Frames of a hook's wrapper around its module's forward: what runs under them is the module's own work.
HOOK_WRAPPERS = (("diffusers/hooks/hooks.py", ("new_forward",)), ("accelerate/hooks.py", ("new_forward",)))
# The libraries whose innermost frame says what made an allocation (the first found, innermost frame first).
MAKERS = ("diffusers/", "transformers/", "bitsandbytes/", "torchao/", "accelerate/", "torch/nn/functional.py",
          "flux2bench/")
LIBRARIES = ("diffusers", "transformers", "bitsandbytes", "torchao", "accelerate", "torch", "flux2bench")
COMPILED = "torchinductor"  # frames of code torch.compile generated


@dataclass(frozen=True)
class Owner:
    """Whose weights a storage holds: the component, the dtype they are stored in, and whether quantized."""

    component: str
    dtype: str
    quantized: bool = False

    @property
    def label(self) -> str:
        return f"weights: {self.component} {self.dtype}" + (" (quantized)" if self.quantized else "")


class WeightMap:
    """The device storages of a pipeline's weights by address: ``owner(address, size)`` names the weights a block
    of the allocator holds (the owner of most of its bytes), or None."""

    def __init__(self, storages: Iterable[tuple[int, int, Owner]]):
        unique = {address: (address, size, owner) for address, size, owner in storages if size > 0}
        self.storages = sorted(unique.values(), key=lambda s: s[0])
        self._starts = [s[0] for s in self.storages]

    def owner(self, address: int, size: int) -> Owner | None:
        held: dict[Owner, int] = defaultdict(int)
        at = bisect.bisect_left(self._starts, address)
        while at < len(self.storages) and self.storages[at][0] < address + size:
            start, nbytes, owner = self.storages[at]
            held[owner] += min(start + nbytes, address + size) - start
            at += 1
        return max(held, key=held.__getitem__) if held else None

    def bytes_by_owner(self) -> dict[Owner, int]:
        totals: dict[Owner, int] = defaultdict(int)
        for _, nbytes, owner in self.storages:
            totals[owner] += nbytes
        return dict(totals)


@dataclass
class LiveBlock:
    size: int
    part: str  # a memory part's name
    made_by: str | None = None  # blocks allocated during the call: the code that made them
    component: str | None = None
    module: str | None = None


@dataclass
class Replay:
    """The allocator's state at its peak: allocated and reserved bytes, and the blocks alive."""

    allocated: int
    reserved: int
    live: list[LiveBlock] = field(default_factory=list)


def frame_path(filename: str) -> str:
    """A frame's file relative to its library (``diffusers/models/attention_dispatch.py``), wherever the library was
    installed (site-packages or a folder on PYTHONPATH), or as it is."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    for library in LIBRARIES:
        if f"/{library}/" in filename:
            return library + "/" + filename.rsplit(f"/{library}/", 1)[1]
    return filename


def _in(frame: dict[str, Any], places: tuple[tuple[str, tuple[str, ...] | None], ...]) -> bool:
    path, name = frame_path(frame.get("filename", "")), frame.get("name", "")
    return any(file in path and (names is None or name in names) for file, names in places)


def maker_frame(frames: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The innermost frame in a library that matters, past the wrappers offload hooks put around forwards."""
    for frame in frames:
        if _in(frame, HOOK_WRAPPERS):
            continue
        if any(marker in frame_path(frame.get("filename", "")) for marker in MAKERS):
            return frame
    return None


def made_by(frames: list[dict[str, Any]]) -> str:
    """The code that made an allocation: its maker frame, marked when it ran inside code torch.compile generated."""
    compiled = any(COMPILED in f.get("filename", "") for f in frames)
    frame = maker_frame(frames)
    if frame is not None:
        text = f"{frame_path(frame.get('filename', ''))}:{frame.get('line', '?')} {frame.get('name', '?')}"
        return f"compiled graph under {text}" if compiled else text
    if frames:
        first = frames[0]
        return f"{frame_path(first.get('filename', '?'))}:{first.get('line', '?')} {first.get('name', '?')}"
    return "no Python frames recorded"


def component_of(frames: list[dict[str, Any]]) -> str | None:
    for frame in frames:
        path = frame_path(frame.get("filename", ""))
        for marker, component in COMPONENT_PATHS:
            if marker in path:
                return component
    return None


def moves_weights(frames: list[dict[str, Any]]) -> bool:
    """Whether the code that made an allocation is an offload hook moving weights: its maker frame is. A hook also
    wraps its module's forward, so an activation made under a hook has the module's code as its maker."""
    frame = maker_frame(frames)
    return frame is not None and _in(frame, WEIGHT_MOVERS)


def _start_state(start: dict[str, Any], weights: WeightMap) -> tuple[dict[int, LiveBlock], int]:
    """The blocks alive in the ``start`` snapshot, each given its owner, and the bytes reserved then."""
    live, reserved = {}, 0
    for segment in start["segments"]:
        reserved += segment["total_size"]
        for block in segment["blocks"]:
            if block["state"] == "inactive":
                continue
            owner = weights.owner(block["address"], block["size"])
            live[block["address"]] = LiveBlock(block["size"], owner.label if owner else OTHER_BEFORE,
                                               component=owner.component if owner else None)
    return live, reserved


def _made_in_call(entry: dict[str, Any]) -> LiveBlock:
    frames = entry.get("frames") or []
    component = component_of(frames)
    module = entry.get("user_metadata") or None
    if moves_weights(frames):
        part = f"weights: {component or 'unknown component'}, moved onto the GPU during the call (offload)"
    else:
        part = ACTIVATIONS
    return LiveBlock(entry["size"], part, made_by(frames), component, module)


def _events(trace: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, entry in enumerate(trace):
        if entry["action"] in ("alloc", "free_completed", "segment_alloc", "segment_free", "segment_map",
                               "segment_unmap"):
            yield index, entry


def replay(start: dict[str, Any], trace: list[dict[str, Any]], weights: WeightMap) -> Replay:
    """Replay ``trace`` forward from ``start`` to the first moment the allocated bytes are highest."""
    live, reserved = _start_state(start, weights)
    allocated = sum(block.size for block in live.values())
    peak_at, peak = -1, allocated
    for index, entry in _events(trace):
        allocated, reserved = _apply(entry, allocated, reserved)
        if allocated > peak:
            peak_at, peak = index, allocated
    live, reserved = _start_state(start, weights)
    for index, entry in _events(trace):
        if index > peak_at:
            break
        if entry["action"] == "alloc":
            live[entry["addr"]] = _made_in_call(entry)
        elif entry["action"] == "free_completed":
            live.pop(entry["addr"], None)
        _, reserved = _apply(entry, 0, reserved)
    return Replay(sum(block.size for block in live.values()), reserved, list(live.values()))


def _apply(entry: dict[str, Any], allocated: int, reserved: int) -> tuple[int, int]:
    action, size = entry["action"], entry["size"]
    if action == "alloc":
        return allocated + size, reserved
    if action == "free_completed":
        return allocated - size, reserved
    if action in ("segment_alloc", "segment_map"):
        return allocated, reserved + size
    return allocated, reserved - size  # segment_free, segment_unmap


@dataclass
class Counters:
    """What the allocator and NVML measured over the call, in bytes (None where not measured), and why not."""

    allocated_peak: int
    reserved_peak: int
    device_peak: int | None
    device_reason: str | None = None


def device_trace(snapshot: dict[str, Any], device_index: int) -> list[dict[str, Any]]:
    traces = snapshot.get("device_traces") or []
    return traces[device_index] if device_index < len(traces) else []


def peak_memory(start: dict[str, Any], end: dict[str, Any], device_index: int, weights: WeightMap,
                counters: Counters, top_n: int = TOP_ALLOCATIONS) -> PeakMemory:
    """The parts of the call's device peak; raises ValueError when the history does not replay to the allocator's
    own peak (a history cut short by its entry limit)."""
    state = replay(start, device_trace(end, device_index), weights)
    if abs(state.allocated - counters.allocated_peak) > REPLAY_TOLERANCE * max(counters.allocated_peak, 1):
        raise ValueError(f"the recorded allocator history replays to a peak of {state.allocated / GIB:.3f} GiB, the "
                         f"allocator counted {counters.allocated_peak / GIB:.3f} GiB: the history is incomplete")
    parts = _allocated_parts(state) + _reserve_parts(state, counters)
    total, basis = _total(counters)
    return PeakMemory(
        total_gib=total / GIB, total_basis=basis, allocated_peak_gib=counters.allocated_peak / GIB,
        reserved_peak_gib=counters.reserved_peak / GIB, replayed_allocated_peak_gib=state.allocated / GIB,
        replayed_reserved_gib=state.reserved / GIB,
        device_peak_gib=None if counters.device_peak is None else counters.device_peak / GIB,
        parts=parts, top=top_allocations(state.live, top_n), method=METHOD)


METHOD = ("one extra pipeline call under torch.cuda.memory._record_memory_history; its trace replayed forward from "
          "the snapshot taken as recording began, to the first moment the allocated bytes peak")


def _total(counters: Counters) -> tuple[int, str]:
    if counters.device_peak is not None and counters.device_peak >= counters.reserved_peak:
        return counters.device_peak, "device-level peak (NVML) during the call"
    why = counters.device_reason or "the sampled device-level peak is below the allocator's reserved peak"
    return counters.reserved_peak, f"the allocator's reserved peak ({why})"


def _allocated_parts(state: Replay) -> list[MemoryPart]:
    sizes: dict[str, int] = defaultdict(int)
    for block in state.live:
        sizes[block.part] += block.size
    ordered = sorted(sizes, key=lambda name: (not name.startswith("weights"), name == ACTIVATIONS, name))
    return [MemoryPart(name, "weights" if name.startswith("weights") else "allocated", sizes[name] / GIB,
                       _PART_METHODS["weights" if name.startswith("weights") else name]) for name in ordered]


_PART_METHODS = {
    "weights": "live blocks at the peak matched by address to the pipeline's parameters and buffers (inner tensors "
               "of quantized ones included), or allocated during the call by offload hooks",
    OTHER_BEFORE: "live blocks at the peak, alive before the call, that hold no weight of the pipeline",
    ACTIVATIONS: "live blocks at the peak allocated during the call, not by offload hooks",
}


def _reserve_parts(state: Replay, counters: Counters) -> list[MemoryPart]:
    parts = [MemoryPart(SLACK, "slack", (state.reserved - state.allocated) / GIB,
                        "reserved bytes (segment events replayed) minus allocated bytes at the allocated peak")]
    later = counters.reserved_peak - state.reserved
    if later < 0:
        raise ValueError("the replayed reserved bytes exceed the allocator's reserved peak: inconsistent history")
    parts.append(MemoryPart(RESERVED_LATER, "reserved_later", later / GIB,
                            "torch.cuda.max_memory_reserved over the call minus the reserved bytes at the peak"))
    total, _ = _total(counters)
    parts.append(MemoryPart(OUTSIDE, "outside", (total - counters.reserved_peak) / GIB,
                            "device-level peak (NVML, during the call) minus torch.cuda.max_memory_reserved"))
    return parts


def top_allocations(live: list[LiveBlock], top_n: int = TOP_ALLOCATIONS) -> list[Allocation]:
    """The live blocks allocated during the call, grouped by the code (and module) that made them, largest first."""
    groups: dict[tuple, list[LiveBlock]] = defaultdict(list)
    for block in live:
        if block.made_by is not None:
            groups[(block.made_by, block.component, block.module, block.part.startswith("weights"))].append(block)
    ranked = sorted(groups.items(), key=lambda item: -sum(b.size for b in item[1]))[:top_n]
    return [Allocation(sum(b.size for b in blocks) / GIB, len(blocks), made, component, module, weights)
            for (made, component, module, weights), blocks in ranked]


def load_memory(weights: WeightMap, allocated_peak_gib: float | None, moves_weights_: bool) -> LoadMemory:
    """The load phase: the weights resident on the GPU as the profile starts, against the load's allocator peak."""
    by_owner = weights.bytes_by_owner()
    parts = [MemoryPart(owner.label, "weights", size / GIB, "sum of the device storages of the component's "
                        "parameters and buffers (inner tensors of quantized ones included)")
             for owner, size in sorted(by_owner.items(), key=lambda item: -item[1])]
    resident = sum(by_owner.values()) / GIB
    where = ("an offload mode moves this case's weights, so the weights resident after the timed calls are not those "
             "the load left; " if moves_weights_ else "")
    return LoadMemory(parts, resident, allocated_peak_gib, transient_gib(resident, allocated_peak_gib),
                      METHOD_LOAD.format(where=where))


def transient_gib(resident_gib: float, allocated_peak_gib: float | None) -> float | None:
    """The load's allocator peak beyond the weights resident after it, where the peak is known and not below them."""
    if allocated_peak_gib is None or allocated_peak_gib < resident_gib:
        return None
    return allocated_peak_gib - resident_gib


METHOD_LOAD = ("{where}the load is timed, so no allocation history is recorded for it: the weights resident on the GPU "
               "when the profile starts, per component and storage dtype, against the load phase's allocator peak "
               "(torch.cuda.max_memory_allocated); the difference was transient during loading (quantization "
               "temporaries, copies)")
