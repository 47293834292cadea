"""torch.compile of the transformer: ``regional`` (diffusers ``compile_repeated_blocks``: the repeated double- and
single-stream blocks, one graph per block class) or ``full`` (``transformer.compile``: the whole model in place).

Compilation happens in the first pipeline call, so the compiled cases need a warm-up: the record's
``first_call_s`` holds the compilation, ``time_to_first_image_s`` the wait of a cold start. The runner points every
worker at one inductor cache per run directory (``RUN_DIR/compile-cache``), so a rerun of a run directory finds the
cache warm; whether it was cold or warm is read from inductor's cache counters and recorded.

dynamo's and inductor's counters (``torch._dynamo.utils.counters``, cumulative per process) are read here, for this
axis's record and for the latency tracker's count of graphs compiled during each timed image; where dynamo was never
imported nothing was compiled, and every count is 0 without importing it. The record also counts compilations,
recompilations, graph breaks and, in the modes that use CUDA graphs (``reduce-overhead``, ``max-autotune``), CUDA-graph
recordings and re-recordings (``flux2bench.trackers.compilation``).

CUDA graphs replay recorded kernels on fixed device addresses into static output buffers. Three setups break that, and
are refused before loading: an offload hook, which moves the weights to new addresses at every use; a step cache,
which keeps the outputs of one step for later steps while the next replay overwrites them; and regional compilation,
whose blocks' graphs pass their outputs to one another (measured: torch refuses it).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field


from flux2bench.axes import attention_fp8, cache, offload
from flux2bench.axes.base import (ONE_PER_BLOCK, UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan,
                                  LoadsPipeline, Settings)
from flux2bench.errors import MachineLacks, Unsupported
from flux2bench.trackers.compilation import METHOD as EVENTS_METHOD
from flux2bench.trackers.compilation import CompileEvents

if TYPE_CHECKING:

    from flux2bench.case import Case

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
MODES: tuple[CompileMode, ...] = get_args(CompileMode)
CUDA_GRAPH_MODES: tuple[CompileMode, ...] = ("reduce-overhead", "max-autotune")

CUDA_GRAPHS_AND_OFFLOAD = ("CUDA graphs replay kernels on the device addresses they recorded; offload: {mode} moves "
                           "the weights to new addresses at every use, so every call would re-record (or fall back "
                           "to running without CUDA graphs)")
CUDA_GRAPHS_AND_STEP_CACHE = ("CUDA graphs write each replay's outputs into static buffers that the next replay "
                              "overwrites; cache: {cache} keeps block outputs of one step for later steps, which would "
                              "read overwritten memory (torch refuses: 'accessing tensor output of CUDAGraphs that has "
                              "been overwritten by a subsequent run')")

CUDA_GRAPHS_AND_REGIONS = ("compile: regional compiles each transformer block as a region of its own, and the CUDA "
                           "graph trees of {mode} reject the output of one block's graph as it is passed to the next "
                           "('accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run', "
                           "raised as the next graph is recorded: FLUX.2 [klein] 4B and the tiny FLUX.2 on an H100, "
                           "torch 2.11, diffusers 0.42.1, reports/recipe-klein-4b-h100-20261207); for CUDA graphs "
                           "compile the whole transformer (compile: full), or keep regional compilation with "
                           "max-autotune-no-cudagraphs")

RECOMPILE_LIMIT_MESSAGE = "Dynamo recompile limit exceeded"


def _counters(group: str) -> Counter[str]:
    utils = sys.modules.get("torch._dynamo.utils")
    return utils.counters[group] if utils is not None else Counter()


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far (dynamo's ``unique_graphs``)."""
    return _counters("stats")["unique_graphs"]


def recompile_limit_hits() -> int:
    """Functions dynamo stopped recompiling (``torch._dynamo.config.recompile_limit``): a call that fits none of
    their compiled variants runs uncompiled from then on."""
    return sum(n for message, n in _counters("unimplemented").items() if message.startswith(RECOMPILE_LIMIT_MESSAGE))


def compile_counts() -> dict[str, int]:
    """inductor's FX-graph cache and AOT-autograd cache counters, the graphs compiled and the recompile-limit hits."""
    inductor, autograd = _counters("inductor"), _counters("aot_autograd")
    return {"fxgraph_hit": inductor["fxgraph_cache_hit"], "fxgraph_miss": inductor["fxgraph_cache_miss"],
            "fxgraph_bypass": inductor["fxgraph_cache_bypass"],
            "autograd_hit": autograd["autograd_cache_hit"], "autograd_miss": autograd["autograd_cache_miss"],
            "graphs": compiled_graphs(), "over_recompile_limit": recompile_limit_hits()}


def cache_state(hits: int, misses: int, bypasses: int = 0) -> str:
    """The inductor cache as a compilation found it: cold (misses only), warm (hits only), partial, bypassed (every
    graph it compiled was one the cache cannot keep) or none."""
    if hits:
        return "partial" if misses or bypasses else "warm"
    if misses:
        return "cold"
    return "bypassed" if bypasses else "none"


class CompileSettings(Settings):
    compile: Annotated[Literal["none", "regional", "full"], UNKEYED_AT_DEFAULT] = "none"
    compile_mode: Annotated[CompileMode, UNKEYED_AT_DEFAULT] = Field("default", description="torch.compile mode")
    compile_fullgraph: Annotated[bool, ONE_PER_BLOCK, UNKEYED_AT_DEFAULT] = Field(
        False, description="torch.compile fullgraph (fails where a step cache's hooks break the graph)")


Count = Annotated[int, Field(ge=0, strict=True)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


class CompileEventsRecord(BaseModel):
    """What torch.compile did over the measured calls (``CompileEvents.stop``), as the report and metrics read it;
    fields of earlier versions may be absent."""

    model_config = ConfigDict(extra="allow")
    compilations: Count | None = None
    recompilations: Count | None = None
    graph_breaks: Count | None = None
    graph_break_reasons: dict[str, Count] = {}
    fx_graph_cache_bypasses: dict[str, Count] = {}
    compile_s: Seconds | None = None
    timers_s: dict[str, Seconds] = {}
    cudagraphs: dict[str, Count] = {}


class CompileRecord(BaseModel):
    """The compile axis's part of a record's setup."""

    model_config = ConfigDict(extra="allow")
    mode: str | None = None
    cache_counters: dict[str, Count] = {}
    events: CompileEventsRecord | None = None


class CompileAxis(Axis[CompileSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "compile"
    settings_model = CompileSettings
    record_model = CompileRecord
    drift_baseline_values = {"compile": "none"}

    def compiles(self, case: Case) -> bool:
        """Whether the case runs the transformer compiled."""
        return self.of(case).compile != "none"

    def uses_cuda_graphs(self, case: Case) -> bool:
        """Whether the case's compiled code replays CUDA graphs (modes ``reduce-overhead`` and ``max-autotune``)."""
        return self.compiles(case) and self.of(case).compile_mode in CUDA_GRAPH_MODES

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        settings = self.of(case)
        compile_, mode = settings.compile, settings.compile_mode
        if compile_ == "none":
            return [], []
        return [f"compile={compile_}" + ("" if mode == "default" else f":{mode}")], []

    def check(self, case: Case, plan: LoadPlan) -> None:
        if self.of(case).compile == "none":
            return
        if case.warmup < 1:
            raise Unsupported("compile needs warmup >= 1: compilation happens in the first call, which would otherwise "
                              "be a timed image")
        if plan.device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
            raise MachineLacks("torch.compile on the CPU needs a C++ compiler (inductor builds C++ kernels); none on "
                              "PATH")
        if self.uses_cuda_graphs(case):
            self._check_cuda_graphs(case, plan)

    def _check_cuda_graphs(self, case: Case, plan: LoadPlan) -> None:
        mode = self.of(case).compile_mode
        if plan.device.type != "cuda":
            raise MachineLacks(f"compile_mode {mode} records CUDA graphs, which need a CUDA GPU (on the CPU inductor "
                               "skips them, and the case would measure another setup)")
        if offload.AXIS.moves_weights(case):
            raise Unsupported(CUDA_GRAPHS_AND_OFFLOAD.format(mode=offload.AXIS.mode(case)))
        if cache.AXIS.caches(case):
            raise Unsupported(CUDA_GRAPHS_AND_STEP_CACHE.format(cache=cache.AXIS.step_cache(case)))
        if self.of(case).compile == "regional":
            raise Unsupported(CUDA_GRAPHS_AND_REGIONS.format(mode=mode))

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        import torch

        settings = self.of(case)
        compile_, mode = settings.compile, settings.compile_mode
        if compile_ == "none":
            return None
        options: dict[str, Any] = {"fullgraph": settings.compile_fullgraph, "mode": None if mode == "default" else mode}
        if compile_ == "regional":
            pipe.transformer.compile_repeated_blocks(**options)
            method = "transformer.compile_repeated_blocks"
        else:
            # The forward, not the module's __call__ (transformer.compile): module hooks, such as the step clock's,
            # stay outside the graph (a clock synchronises the device, which dynamo cannot trace). Under FP8
            # attention the transformer is wrapped, and the wrapper's switching of attention kernels stays outside.
            model = attention_fp8.AXIS.model_of(pipe.transformer)
            model.forward = torch.compile(model.forward, **options)
            method = "torch.compile(transformer.forward)"
        return {"compile": compile_, "mode": mode, "fullgraph": options["fullgraph"], "method": method}

    def observe(self, pipe: Any, case: Case, plan: LoadPlan) -> CompileObservation | None:
        if not self.compiles(case):
            return None
        graphs_on = (plan.device.index or 0) if self.uses_cuda_graphs(case) and plan.device.type == "cuda" else None
        return CompileObservation(CompileEvents(graphs_on).start())


class CompileObservation:
    """The inductor cache's hits and misses, and what torch.compile did, over one case's measured calls (torch's
    counters are per process)."""

    def __init__(self, events: CompileEvents) -> None:
        self.before = compile_counts()
        self.events = events

    def found(self) -> dict[str, Any]:
        counts = {name: value - self.before.get(name, 0) for name, value in compile_counts().items()}
        hits, misses = counts["fxgraph_hit"], counts["fxgraph_miss"]
        return {"inductor_cache": cache_state(hits, misses, counts["fxgraph_bypass"]), "cache_counters": counts,
                "cache_method": "torch._dynamo.utils.counters (inductor fxgraph_cache_hit/miss/bypass) over this "
                                "worker's calls; cold: misses only, warm: hits only, bypassed: graphs the cache cannot "
                                "keep only (events.fx_graph_cache_bypasses says why); over_recompile_limit: functions "
                                "that hit dynamo's recompile limit (partly uncompiled from then on)",
                "events": self.events.stop(), "events_method": EVENTS_METHOD}


AXIS = CompileAxis()
