"""What torch.compile did during a worker's measured calls, read from torch's own instruments.

- compilations and recompilations: dynamo's compile-start callbacks (``torch._dynamo.callback_handler``); each
  compilation has the id ``frame/attempt``, and an attempt above 0 is a recompilation of a frame already compiled
  (a guard failed: a new shape, a changed global, a hook's state);
- graph breaks: ``torch._dynamo.utils.counters["graph_break"]``, by reason;
- CUDA graphs: recordings from the callbacks' ``CUDAGRAPH_RECORDING`` trigger (every graph the CUDA-graph trees
  record, first recordings and re-recordings alike), re-recordings counted against torch's re-record limit
  (``CUDAGraphTreeManager.num_rerecord``) and functions that run without CUDA graphs
  (``counters["inductor"]["cudagraph_skips"]``);
- compile time: ``torch._dynamo.utils.compilation_time_metrics`` of ``_compile.compile_inner``, every frame's
  tracing, AOT autograd and inductor (cache loads included), summed; and the largest of torch's other timers there
  (``timers_s``: seconds by torch's own names, such as kernel compilation or benchmarking at a kernel's first launch,
  which run outside ``compile_inner``), so that a long first call says where its time went. The timers nest (a
  timer's time may be in another's), so they are not added up;
- graphs inductor's FX-graph cache bypassed (``counters["inductor"]["fxgraph_cache_bypass"]``) and why: the reason
  inductor logs for each (``torch._inductor.codecache``, at INFO, read through a logger filter that lets nothing more
  through than before). Such a graph is compiled, but no cache keeps it, the portable compile cache included;
- max-autotune's choices: for each matrix product it benchmarks candidate kernels for (inductor's feedback savers,
  ``torch._inductor.select_algorithm.add_feedback_saver``), the operator, the input shapes, how many candidates ran,
  and the fastest, with whether it is an ATen kernel (cuBLAS: what the default mode calls) or a generated template,
  and the fastest template's time: whether the autotuning found anything the default mode lacks.

A count torch does not offer in the installed version is None, with the reason in ``unavailable``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from typing import Any

COMPILE_TIMER = "_compile.compile_inner"
TUNING_TIMER = "CachingAutotuner.coordinate_descent_tuning"  # a Triton kernel's tuning at its first launch
# max-autotune's choice among candidate kernels for each matrix product, one timer per operator ("mm", "scaled_mm"):
# compiling the candidates, then benchmarking them
AUTOTUNE_TIMER_ENDINGS = ("_template_precompiling", "_template_autotuning")
REASONS_KEPT = 5  # the most frequent graph-break reasons in a record
TIMERS_KEPT = 20  # torch's timers with the most seconds, in a record
TIMER_FLOOR_S = 0.05  # a timer with less is left out
BYPASS_LOGGER = "torch._inductor.codecache"
BYPASS_MESSAGE = "Bypassing FX Graph Cache because '%s'"
PRODUCTS_KEPT = 64  # autotuned matrix products in a record (FLUX.2-dev's regional compile has about a dozen shapes)


def _counter(group: str) -> Counter[str]:
    utils = sys.modules.get("torch._dynamo.utils")
    return Counter(utils.counters[group]) if utils is not None else Counter()


def timer_seconds() -> dict[str, float]:
    """Seconds so far of each of torch's compile timers (``compilation_time_metrics``), by name."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    return {str(name): float(sum(values)) for name, values in utils.compilation_time_metrics.items()}


def compile_seconds() -> float:
    """Seconds this process spent in dynamo's compile of frames so far (0 where nothing was compiled)."""
    return timer_seconds().get(COMPILE_TIMER, 0.0)


def _largest_timers(before: dict[str, float]) -> dict[str, float]:
    added = {name: seconds - before.get(name, 0.0) for name, seconds in timer_seconds().items()}
    kept = sorted(((s, n) for n, s in added.items() if s >= TIMER_FLOOR_S), reverse=True)[:TIMERS_KEPT]
    return {name: round(seconds, 3) for seconds, name in kept}


def _rerecords(device_index: int | None) -> int | None:
    """Re-recordings the CUDA-graph tree manager of the device counted against its limit (0 before it exists)."""
    if device_index is None:
        return None
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(device_index, create_if_none_exists=False)
    if manager is None:
        return 0
    return sum(count for per_node in manager.num_rerecord.values() for count in per_node.values())


def _shape(node: Any) -> str:
    try:
        return "x".join(str(size) for size in node.get_size())
    except Exception:  # a node without a size (a scalar): its name
        return type(node).__name__


def autotuned_product(timings: dict[Any, float], name: str, input_nodes: list[Any]) -> dict[str, Any] | None:
    """One matrix product max-autotune chose a kernel for, from inductor's ``timings`` (ms per candidate; failed
    candidates are infinite), or None where no candidate ran."""
    from torch._inductor.select_algorithm import ExternKernelCaller

    ran = {choice: ms for choice, ms in timings.items() if math.isfinite(ms)}
    if not ran:
        return None
    fastest = min(ran, key=ran.__getitem__)
    templates = [ms for choice, ms in ran.items() if not isinstance(choice, ExternKernelCaller)]
    return {"op": name, "shapes": ", ".join(_shape(node) for node in input_nodes), "candidates": len(ran),
            "fastest": str(getattr(fastest, "name", type(fastest).__name__)),
            "fastest_is_aten": isinstance(fastest, ExternKernelCaller), "fastest_ms": round(ran[fastest], 5),
            "fastest_template_ms": round(min(templates), 5) if templates else None}


class FxCacheBypasses(logging.Filter):
    """Collects, by reason, the FX-graph cache bypasses inductor logs while installed on its cache logger. inductor
    logs them at INFO: the logger is lowered to INFO while installed, and this filter passes on only the records the
    logger passed on before, so the logs read as without it."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: Counter[str] = Counter()
        self._logger = logging.getLogger(BYPASS_LOGGER)
        self._level = self._logger.level
        self._passed_from = self._logger.getEffectiveLevel()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == BYPASS_MESSAGE and record.args:
            self.reasons[str(record.args[0] if isinstance(record.args, tuple) else record.args)] += 1
        return record.levelno >= self._passed_from

    def install(self) -> FxCacheBypasses:
        self._logger.addFilter(self)
        if self._passed_from > logging.INFO:
            self._logger.setLevel(logging.INFO)
        return self

    def remove(self) -> None:
        self._logger.removeFilter(self)
        self._logger.setLevel(self._level)


class CompileEvents:
    """Counts what torch.compile does from ``start()`` to ``stop()``; ``device_index`` is the CUDA device whose
    CUDA graphs are counted (None: CUDA graphs not in use)."""

    def __init__(self, device_index: int | None = None):
        self.device_index = device_index
        self.compilations: list[str] = []
        self.cudagraph_recordings = 0
        self.unavailable: dict[str, str] = {}
        self._handler: Any = None
        self._before: dict[str, Any] = {}
        self.autotuned: list[dict[str, Any]] = []
        self.autotuned_left_out = 0
        self._savers: list[Any] | None = None
        self._bypasses: FxCacheBypasses | None = None

    def _saver(self, timings: dict[Any, float], name: str, input_nodes: list[Any], *_: Any) -> None:
        """Inductor's feedback after it benchmarked the candidates for one matrix product (a compile-time call)."""
        if (product := autotuned_product(timings, name, input_nodes)) is None:
            return
        if len(self.autotuned) < PRODUCTS_KEPT:
            self.autotuned.append(product)
        else:
            self.autotuned_left_out += 1

    def _callback(self, args: Any) -> None:
        trigger = args.callback_trigger.name
        if trigger == "DYNAMO":
            self.compilations.append(args.compile_id)
        elif trigger == "CUDAGRAPH_RECORDING":
            self.cudagraph_recordings += 1

    def start(self) -> CompileEvents:
        import torch._dynamo

        self._handler = getattr(torch._dynamo, "callback_handler", None)
        if self._handler is None:
            self.unavailable["compilations"] = "torch._dynamo has no callback_handler in this torch"
        else:
            self._handler.register_start_callback(self._callback)
        from torch._inductor import select_algorithm

        selector = getattr(select_algorithm, "get_algorithm_selector_cache", lambda: None)()
        if (savers := getattr(selector, "feedback_saver_fns", None)) is None:
            self.unavailable["autotuned"] = "torch's algorithm selector has no feedback savers in this torch"
        else:
            self._savers = savers
            savers.append(self._saver)
        self._bypasses = FxCacheBypasses().install()
        self._before = {"graph_breaks": _counter("graph_break"), "skips": _counter("inductor")["cudagraph_skips"],
                        "bypasses": _counter("inductor")["fxgraph_cache_bypass"],
                        "rerecords": _rerecords(self.device_index), "seconds": compile_seconds(),
                        "timers": timer_seconds()}
        return self

    def stop(self) -> dict[str, Any]:
        """The counts since ``start()``."""
        if self._handler is not None:
            self._handler.remove_start_callback(self._callback)
            self._handler = None
        if self._savers is not None:
            self._savers.remove(self._saver)
            self._savers = None
        reasons: Counter[str] = Counter()
        if self._bypasses is not None:
            self._bypasses.remove()
            reasons, self._bypasses = self._bypasses.reasons, None
        breaks = _counter("graph_break") - self._before["graph_breaks"]
        bypassed = _counter("inductor")["fxgraph_cache_bypass"] - self._before["bypasses"]
        listened = "compilations" not in self.unavailable
        found: dict[str, Any] = {
            "compilations": len(self.compilations) if listened else None,
            "recompilations": (sum(1 for compile_id in self.compilations if not compile_id.endswith("/0"))
                               if listened else None),
            "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": {reason.splitlines()[0]: n for reason, n in breaks.most_common(REASONS_KEPT)},
            "compile_s": compile_seconds() - self._before["seconds"],
            "timers_s": _largest_timers(self._before["timers"]),
        }
        if bypassed:
            if (unlogged := bypassed - sum(reasons.values())) > 0:
                reasons["(reason not logged)"] = unlogged
            found["fx_graph_cache_bypasses"] = dict(reasons)
        if self.autotuned or self.autotuned_left_out:
            found["autotuned"] = {"products": list(self.autotuned), "left_out": self.autotuned_left_out}
        if self.device_index is not None:
            rerecords = _rerecords(self.device_index)
            found["cudagraphs"] = {
                "recordings": self.cudagraph_recordings if listened else None,
                "rerecords_counted_against_limit": None if rerecords is None else rerecords - self._before["rerecords"],
                "skips": _counter("inductor")["cudagraph_skips"] - self._before["skips"]}
        if self.unavailable:
            found["unavailable"] = dict(self.unavailable)
        return found


METHOD = ("torch's own instruments over the measured calls: dynamo's compile-start callbacks (compilations; "
          "recompilations: compile ids frame/attempt with attempt > 0; CUDA-graph recordings), "
          "counters['graph_break'], counters['inductor']['fxgraph_cache_bypass'] with the reasons inductor logs, "
          "CUDAGraphTreeManager.num_rerecord and counters['inductor']['cudagraph_skips'], and "
          f"compilation_time_metrics['{COMPILE_TIMER}'] (compile_s; timers_s: the {TIMERS_KEPT} largest of its "
          f"timers, at least {TIMER_FLOOR_S} s each, nested, not to be added up); autotuned: each matrix product "
          "max-autotune benchmarked candidate kernels for, from inductor's feedback savers (select_algorithm), "
          f"the first {PRODUCTS_KEPT}")
