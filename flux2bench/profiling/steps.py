"""Where a denoising step goes: the events of a PyTorch profiler trace (Chrome trace format) grouped into categories.

The step is the profiler step span (``ProfilerStep#N``, from one ``callback_on_step_end`` to the next, the device
synchronised at both ends). Its work items are, on a GPU, the kernels, copies and memsets that ran inside the span,
each with the chain of CPU operators that launched it (matched through the trace's correlation ids); on a CPU, the
aten operators that call no other (leaf operators). ``CATEGORY_RULES`` names each item's category from its name and
its chain, first match wins. Time is counted by sweeping the span: an instant where several categories run at once
(kernels of several streams, a copy behind a kernel) counts for the first of them in ``CATEGORY_ORDER`` (compute before
communication before copies, so that a copy hidden behind compute is not charged to the step), an instant where
none runs is idle. The exclusive times and idle therefore add up to the span; each category's busy time (the union of
its own intervals, overlap included) is kept beside it.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flux2bench.profiling.record import Group, Rate, StepCategory, StepTime
from flux2bench.units import GIB

STEP_ANNOTATION = re.compile(r"^ProfilerStep#(\d+)$")
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
CHAIN_CATEGORIES = ("cpu_op", "user_annotation")
# Compute first: where a copy or a collective runs behind a kernel, the instant is the kernel's.
CATEGORY_ORDER: tuple[Group, ...] = ("matmul", "attention", "quantize", "elementwise", "other", "communication",
                                     "copy")
QUANTIZED_TYPES = re.compile(r"Float8|c10::Char|signed char|int8", re.IGNORECASE)
FLOAT_TYPES = re.compile(r"BFloat16|Half|^float$|^double$", re.IGNORECASE)
CASTS = ("aten::copy_", "aten::_to_copy", "aten::to")


@dataclass
class WorkItem:
    """One kernel, copy or memset on the GPU (or one leaf operator on the CPU), with the operators that launched it
    (outermost first) and the input types of each."""

    name: str
    start: float  # microseconds, the trace's clock
    end: float
    chain: list[str] = field(default_factory=list)
    chain_types: list[list[str]] = field(default_factory=list)  # the input types of each operator of the chain
    bytes: float = 0.0  # copies

    @property
    def innermost(self) -> str:
        return self.chain[-1] if self.chain else ""

    @property
    def input_types(self) -> list[str]:
        return self.chain_types[-1] if self.chain_types else []


@dataclass(frozen=True)
class Rule:
    """A category for the items whose ``field`` matches ``pattern``: ``kernel`` (the item's own name), ``op`` (any
    operator of its chain), ``innermost`` (the operator that launched it) or ``cast`` (a copy into or out of a
    quantized dtype, from the innermost operator's input types). ``{dtype}`` in the name is the matrix product's."""

    group: Group
    name: str
    field: str
    pattern: str = ""

    def matches(self, item: WorkItem) -> bool:
        if self.field == "cast":
            return is_quantized_cast(item)
        texts = {"kernel": [item.name], "op": item.chain, "innermost": [item.innermost]}[self.field]
        return any(re.search(self.pattern, text, re.IGNORECASE) for text in texts)


MATMUL_OPS = (r"^aten::(mm|addmm|bmm|baddbmm|_scaled_mm|_int_mm|_addmm_activation|_weight_int8pack_mm|"
              r"_scaled_grouped_mm|_grouped_mm)$")
CATEGORY_RULES: tuple[Rule, ...] = (
    Rule("communication", "communication (NCCL)", "kernel", r"nccl|all_?to_?all|allreduce|allgather|reducescatter"),
    Rule("communication", "communication (NCCL)", "op", r"^(c10d|_c10d_functional|nccl)|all_to_all|all_gather"),
    Rule("copy", "copy HtoD", "kernel", r"^Memcpy HtoD"),
    Rule("copy", "copy DtoH", "kernel", r"^Memcpy DtoH"),
    Rule("copy", "copy DtoD", "kernel", r"^Memcpy (DtoD|PtoP)"),
    Rule("other", "memset", "kernel", r"^Memset"),
    Rule("attention", "attention math", "op", r"_scaled_dot_product_attention_math"),
    Rule("attention", "attention cuDNN", "op", r"_scaled_dot_product_cudnn_attention|_cudnn_attention"),
    Rule("attention", "attention cuDNN", "kernel", r"cudnn.*(sdpa|fmha|attn|attention)"),
    Rule("attention", "attention FlashAttention-3", "op", r"flash_attn_3|_flash_3|flash_attn_interface"),
    Rule("attention", "attention FlashAttention-3", "kernel", r"flash.*sm90|sm90.*flash|FlashAttnFwdSm90"),
    Rule("attention", "attention flash", "op", r"_scaled_dot_product_flash_attention|_flash_attention_forward"),
    Rule("attention", "attention flash", "kernel", r"flash"),
    Rule("attention", "attention efficient", "op", r"_scaled_dot_product_efficient_attention|_efficient_attention"),
    Rule("attention", "attention efficient", "kernel", r"fmha|efficient_attention|AttentionKernel|mem_eff"),
    Rule("attention", "attention flex", "kernel", r"flex_attention"),
    Rule("attention", "attention (other kernels of SDPA)", "op", r"scaled_dot_product_attention"),
    # A matrix product launched inside a quantization library's operator (bitsandbytes dequantizes NF4 weights, then
    # multiplies in bf16) is a matrix product; the library's own kernels around it stay its quantization.
    Rule("matmul", "matmul {dtype}", "innermost", MATMUL_OPS),
    Rule("matmul", "matmul nf4 (bitsandbytes, dequantized in the kernel)", "kernel", r"gemm_4bit|gemv_4bit"),
    Rule("quantize", "quantize/dequantize (torchao)", "op", r"^torchao::"),
    Rule("quantize", "quantize/dequantize (bitsandbytes)", "op", r"^bitsandbytes::"),
    Rule("quantize", "quantize/dequantize (bitsandbytes)", "kernel", r"kDequantize|kQuantize|dequantize|quantize"),
    Rule("quantize", "casts into or out of fp8/int8", "cast"),
    Rule("matmul", "matmul {dtype}", "op", MATMUL_OPS),
    Rule("matmul", "matmul {dtype}", "kernel", r"gemm|gemv|nvjet|xmma|wgmma|s16816|s1688|cublas|cutlass|_mm_kernel"),
    Rule("matmul", "convolution {dtype}", "innermost", r"^aten::(cudnn_convolution|convolution|_convolution|conv)"),
    Rule("elementwise", "elementwise, norms, RoPE, activations", "kernel",
         r"elementwise|vectorized|reduce_kernel|triton_(poi|red|per)_|norm|softmax|gelu|silu|rotary|rope|cat|index|"
         r"copy|fill|where|unrolled"),
    Rule("elementwise", "elementwise, norms, RoPE, activations", "innermost", r"^aten::"),
)
OTHER = Rule("other", "other", "kernel")


def is_quantized_cast(item: WorkItem) -> bool:
    """A copy between a floating dtype and fp8/int8: quantizing activations or dequantizing weights."""
    if item.innermost not in CASTS or len(item.input_types) < 2:
        return False
    kinds = item.input_types[:2]
    return any(QUANTIZED_TYPES.search(t) for t in kinds) and any(FLOAT_TYPES.search(t) for t in kinds)


def matmul_dtype(item: WorkItem) -> str:
    """The format a matrix product multiplies in: from its operator, else its kernel's name, else its input types."""
    ops = " ".join(item.chain)
    if "_scaled_mm" in ops or re.search(r"e4m3|e5m2|fp8|f8f8", item.name, re.IGNORECASE):
        return "fp8"
    if re.search(r"_int_mm|int8", ops) or re.search(r"i8i8|s8s8|imma|int8", item.name, re.IGNORECASE):
        return "int8"
    products = [types for op, types in zip(item.chain, item.chain_types) if re.search(MATMUL_OPS, op)]
    for text in (products[-1] if products else item.input_types):
        for pattern, dtype in ((r"BFloat16", "bf16"), (r"Half", "fp16"), (r"Float8", "fp8"),
                               (r"Char|int8", "int8"), (r"^float$", "fp32")):
            if re.search(pattern, text):
                return dtype
    if re.search(r"bf16|bfloat16", item.name, re.IGNORECASE):
        return "bf16"
    return "(dtype unknown)"


def categorise(item: WorkItem, rules: tuple[Rule, ...] = CATEGORY_RULES) -> tuple[Group, str]:
    rule = next((r for r in rules if r.matches(item)), OTHER)
    return rule.group, rule.name.replace("{dtype}", matmul_dtype(item)) if "{dtype}" in rule.name else rule.name


def read_trace(path: Path) -> dict[str, Any]:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            data = json.load(f)
    except (ValueError, EOFError, gzip.BadGzipFile) as exc:  # not JSON, cut short, not gzip
        raise ValueError(f"{path} is not a readable Chrome trace: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{path.name} is not a Chrome trace (no traceEvents list)")
    return data


def _complete(events: list[dict[str, Any]], categories: tuple[str, ...]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in categories and "dur" in e]


def step_span(events: list[dict[str, Any]], step_index: int | None = None) -> tuple[int, float, float]:
    """(index, start, end) of the profiled step: the ``ProfilerStep#N`` span (the one numbered ``step_index``, else
    the last)."""
    steps = [(int(m.group(1)), e) for e in _complete(events, ("user_annotation", "cpu_op"))
             if (m := STEP_ANNOTATION.match(str(e.get("name", ""))))]
    if step_index is not None:
        steps = [s for s in steps if s[0] == step_index]
    if not steps:
        raise ValueError("the trace has no profiler step span (ProfilerStep#N)")
    index, event = max(steps, key=lambda s: (s[0], s[1]["ts"]))
    return index, float(event["ts"]), float(event["ts"]) + float(event["dur"])


class _Chains:
    """The operators open on a thread at a time (outermost first), from the nesting of the trace's CPU events."""

    def __init__(self, events: list[dict[str, Any]]):
        self.ops: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for event in _complete(events, CHAIN_CATEGORIES):
            if not STEP_ANNOTATION.match(str(event.get("name", ""))):
                self.ops[(event.get("pid"), event.get("tid"))].append(event)
        self.starts: dict[tuple, list[float]] = {}
        self.parents: dict[tuple, list[int]] = {}
        for thread, ops in self.ops.items():
            ops.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
            self.starts[thread] = [float(e["ts"]) for e in ops]
            self.parents[thread] = _parents(ops)

    def at(self, thread: tuple, time: float) -> tuple[list[str], list[list[str]]]:
        """The names and input types of the operators open on ``thread`` at ``time``, outermost first."""
        ops, parents = self.ops.get(thread, []), self.parents.get(thread, [])
        index = bisect.bisect_right(self.starts.get(thread, []), time) - 1
        while index >= 0 and _end(ops[index]) < time:
            index = parents[index]
        return self.chain(thread, index) if index >= 0 else ([], [])

    def chain(self, thread: tuple, index: int) -> tuple[list[str], list[list[str]]]:
        """The names and input types of operator ``index`` of ``thread`` and of those it runs in, outermost first."""
        ops, parents, names, types = self.ops[thread], self.parents[thread], [], []
        while index >= 0:
            names.append(str(ops[index]["name"]))
            types.append([str(t) for t in (ops[index].get("args") or {}).get("Input type", [])])
            index = parents[index]
        return names[::-1], types[::-1]


def _end(event: dict[str, Any]) -> float:
    return float(event["ts"]) + float(event["dur"])


def _parents(ops: list[dict[str, Any]]) -> list[int]:
    """The index of each operator's enclosing operator (-1 for none); ``ops`` sorted by start, outer first."""
    parents, open_ = [], []
    for index, op in enumerate(ops):
        while open_ and _end(ops[open_[-1]]) <= float(op["ts"]):
            open_.pop()
        parents.append(open_[-1] if open_ else -1)
        open_.append(index)
    return parents


def device_items(events: list[dict[str, Any]], start: float, end: float) -> list[WorkItem]:
    """The GPU's kernels, copies and memsets inside ``[start, end]``, each with the operators that launched it."""
    launches = {(e.get("args") or {}).get("correlation"): e for e in _complete(events, LAUNCH_CATEGORIES)}
    chains = _Chains(events)
    items = []
    for event in _complete(events, DEVICE_CATEGORIES):
        ts, dur = float(event["ts"]), float(event["dur"])
        if ts + dur <= start or ts >= end:
            continue
        args = event.get("args") or {}
        launch = launches.get(args.get("correlation"))
        names, types = chains.at((launch.get("pid"), launch.get("tid")), float(launch["ts"])) if launch else ([], [])
        items.append(WorkItem(str(event["name"]), max(ts, start), min(ts + dur, end), names, types,
                              float(args.get("bytes", 0) or 0)))
    return items


def cpu_items(events: list[dict[str, Any]], start: float, end: float) -> list[WorkItem]:
    """The aten operators' own time inside ``[start, end]``: each operator's interval minus those of the operators it
    calls, with the chain of operators it runs in."""
    chains = _Chains(events)
    items = []
    for thread, ops in chains.ops.items():
        parents = chains.parents[thread]
        children: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for index, parent in enumerate(parents):
            if parent >= 0:
                children[parent].append(ops[index])
        for index, op in enumerate(ops):
            if op.get("cat") != "cpu_op":
                continue
            names, types = chains.chain(thread, index)
            cursor = float(op["ts"])
            for child in [*children[index], None]:
                stop = _end(op) if child is None else float(child["ts"])
                lo, hi = max(cursor, start), min(stop, end)
                if hi > lo:
                    items.append(WorkItem(str(op["name"]), lo, hi, names, types))
                if child is not None:
                    cursor = max(cursor, _end(child))
    return items


@dataclass
class Sweep:
    """Exclusive and busy microseconds per category over a span, idle, and the items of each category."""

    exclusive: dict[tuple[Group, str], float]
    busy: dict[tuple[Group, str], float]
    idle: float
    items: dict[tuple[Group, str], list[WorkItem]]


def sweep(items: list[WorkItem], start: float, end: float,
          categorised: Callable[[WorkItem], tuple[Group, str]] = categorise) -> Sweep:
    groups: dict[tuple[Group, str], list[WorkItem]] = defaultdict(list)
    for item in items:
        if item.end > item.start:
            groups[categorised(item)].append(item)
    order = sorted(groups, key=lambda c: (CATEGORY_ORDER.index(c[0]), c[1]))
    points = sorted((t, delta, order.index(category)) for category, members in groups.items() for item in members
                    for t, delta in ((item.start, 1), (item.end, -1)))
    active = [0] * len(order)
    exclusive, busy = [0.0] * len(order), [0.0] * len(order)
    idle, previous = 0.0, start
    for t, delta, at in [*points, (end, 0, 0)]:
        span = t - previous
        if span > 0:
            running = [i for i, n in enumerate(active) if n > 0]
            if running:
                exclusive[running[0]] += span
                for i in running:
                    busy[i] += span
            else:
                idle += span
            previous = t
        active[at] += delta
    return Sweep(dict(zip(order, exclusive)), dict(zip(order, busy)), idle, {c: groups[c] for c in order})


def categories(result: Sweep) -> list[StepCategory]:
    """The record's categories (milliseconds), then idle."""
    rows = []
    for (group, name), exclusive in result.exclusive.items():
        members = result.items[(group, name)]
        moved = sum(item.bytes for item in members) if group == "copy" else None
        busy_ms = result.busy[(group, name)] / 1e3
        rate = moved / GIB / (busy_ms / 1e3) if moved and busy_ms > 0 else None
        rows.append(StepCategory(name, group, exclusive / 1e3, busy_ms, len(members), bytes=moved, gib_per_s=rate))
    return rows + [StepCategory("idle", "idle", result.idle / 1e3, result.idle / 1e3, 0)]


def group_busy_ms(result: Sweep, group: Group) -> float:
    """The union of a group's intervals (all its categories together), in milliseconds: recomputed by a sweep of
    its items alone, since its categories may overlap one another."""
    members = [item for (g, _), items in result.items.items() if g == group for item in items]
    if not members:
        return 0.0
    start, end = min(i.start for i in members), max(i.end for i in members)
    alone = sweep(members, start, end, lambda item: (group, group))
    return sum(alone.busy.values()) / 1e3


@dataclass
class StepFlops:
    """FLOPs of one step on one GPU (``flux2bench.flops``), split into attention and the other matrix products, and
    the card's dense peaks for the formats they multiply in: (TFLOP/s or None, source or why none)."""

    matmul: float
    attention: float
    method: str
    matmul_peak: tuple[float | None, str]
    attention_peak: tuple[float | None, str]


def rates(result: Sweep, flops: StepFlops) -> list[Rate]:
    found = []
    for group, count, (peak, source) in (("matmul", flops.matmul, flops.matmul_peak),
                                         ("attention", flops.attention, flops.attention_peak)):
        busy = group_busy_ms(result, group)
        if busy > 0 and count > 0:
            found.append(Rate(group, count / 1e12, busy, count / 1e12 / (busy / 1e3), peak,
                              None if peak is not None else source))
    return found


STEP_METHOD = ("torch.profiler around one extra pipeline call, its schedule driven from callback_on_step_end (the "
               "device synchronised before each profiler step) so that one step in the middle of the call is "
               "recorded; items categorised by CATEGORY_RULES (flux2bench.profiling.steps); an instant where several "
               "categories run counts for the first in the order {order}; idle: the step's span where nothing runs")


def step_time(trace: dict[str, Any], activity: str, timed_step_ms: float | None, flops: StepFlops | None = None,
              flops_reason: str | None = None, step_index: int | None = None) -> StepTime:
    """The categories of the profiled step in ``trace`` (a Chrome trace's JSON)."""
    events = trace["traceEvents"]
    index, start, end = step_span(events, step_index)
    items = device_items(events, start, end) if activity == "cuda" else cpu_items(events, start, end)
    result = sweep(items, start, end)
    found = rates(result, flops) if flops is not None else []
    return StepTime(activity, index, (end - start) / 1e3, categories(result), timed_step_ms, found,
                    flops.method if flops else None,
                    flops_reason if flops is None else (None if found else "no matrix product or attention ran"),
                    method=STEP_METHOD.format(order=", ".join(CATEGORY_ORDER)) + _activity_note(activity))


def _activity_note(activity: str) -> str:
    if activity == "cuda":
        return "; GPU kernels, copies and memsets, each with the CPU operators that launched it (correlation ids)"
    return ("; no CUDA here: the CPU's leaf aten operators stand for the kernels, and idle is the CPU's time outside "
            "them (Python and framework work)")
