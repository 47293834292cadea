"""Compiled once: ``compile_cache: portable`` keeps the compiled transformer in the artifact cache as PyTorch's
portable compile cache artifacts ("Mega-Cache": ``torch.compiler.save_cache_artifacts`` after the measured calls,
``torch.compiler.load_cache_artifacts`` before the first one) together with the files of the case's Triton cache
folder, so that a later worker with the same key loads the compiled code instead of compiling it. The record says
which happened (``outcome``: ``compiled``, ``loaded``, ``partly loaded``; ``not_cacheable``: graphs compiled where
inductor's FX-graph cache, and so this one, cannot keep them), this worker's compile time, the time to
hand the artifacts to torch and put the kernel files in place (``load_s``: after loading, before the warm-up, so in
the time to first image and not in the first call), and for loaded code the compile time of the worker that made the
entry (``made_by``).

Why the Triton cache folder too: on an H100, FLUX.2-dev FP8 regional code loaded from the Mega-Cache alone still took
148 s in its first call, against 33 s for a worker on a warm local inductor and Triton cache. Kernels Triton builds
outside inductor's compile (at their first launch, for runtime autotuning) are written to that folder, which the
Mega-Cache does not carry; whether they are the difference is for a GPU run to show (docs/speed.md).

Why the Mega-Cache rather than AOTInductor packages (``torch.export`` + ``aoti_compile_and_package``): it serves every
compile the harness measures (regional and full, each mode, CUDA graphs re-recorded at load), keeps dynamo's guards
(code that does not fit the call is compiled again, never run), and needs no export of the transformer (an exported
graph has no hooks, so no step cache, no offload and no step clock, and a full-graph export of torchao's FP8 tensor
subclasses and of diffusers' attention dispatch is a project of its own). What it does not save: dynamo still traces
the model in the first call (the cached graphs are found by the traced graph's key), which an AOTInductor package
would skip.

The key (``flux2bench.compile_artifacts``) hashes the model's class and config, the image shapes, every axis option
of the case (a superset of what the compiled code depends on: precision, batch, compile mode, fullgraph, inductor
flags, attention, fused projections, step cache, offload, parallelism; an option it ignores, such as the text
encoder's precision, only makes another entry), and the torch, Triton, CUDA, Python and library versions and the
GPU (name and compute capability). Seeds, prompts and step counts are not in it.

The artifact cache is the run's ``--cache`` folder, else ``RUN_DIR/compile-cache/artifacts`` (compiled once per run
directory). The case compiles with an empty inductor and Triton cache of its own, so that its code comes from the
artifact cache or from compiling, never from a local cache another case of the run left warm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict

from flux2bench import child_env
from flux2bench.axes import attention_fp8, compile
from flux2bench.axes.base import UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.errors import Unsupported

if TYPE_CHECKING:
    import torch

    from flux2bench.case import Case
    from flux2bench.compile_artifacts import CompiledCode, Entry

MECHANISM = "torch.compiler.save_cache_artifacts / load_cache_artifacts (the Mega-Cache), in the artifact cache"
SHAPES = ("width", "height", "reference_images", "reference_image_size")
OUTCOME_METHOD = ("inductor's FX-graph cache counters over the measured calls: compiled (misses or bypasses only), "
                  "loaded (hits only), partly loaded (both), nothing compiled (neither); a bypassed graph is one the "
                  "cache cannot keep (not_cacheable)")
NOT_CACHEABLE = ("inductor's FX-graph cache bypassed them (setup.compile.events.fx_graph_cache_bypasses says why): "
                 "torch saves no artifacts of such graphs, so every run compiles them again")


class CompileCacheSettings(Settings):
    compile_cache: Annotated[Literal["none", "portable"], UNKEYED_AT_DEFAULT] = "none"


def isolated_caches(case: Case) -> Path:
    """The case's own inductor cache folder: beside the run's (``TORCHINDUCTOR_CACHE_DIR``), else a new one."""
    shared = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(shared) / "isolated" / case.key if shared else Path(tempfile.mkdtemp(prefix=f"{case.key}-"))


def triton_folder() -> Path:
    """The case's own Triton cache folder (``before_load`` names it)."""
    return Path(os.environ["TRITON_CACHE_DIR"])


def key_inputs(case: Case, transformer: Any, device: torch.device) -> dict[str, Any]:
    """What the compiled transformer depends on (see the module's docstring)."""
    from flux2bench.compile_artifacts import FORMAT, environment, model_config

    model = attention_fp8.AXIS.model_of(transformer)
    return {"format": FORMAT, "model": case.model,
            "transformer": {"class": type(model).__name__, "config": model_config(model.config)},
            "shapes": {name: getattr(case, name) for name in SHAPES},
            "options": dict(sorted(case.settings.items())), "environment": environment(device)}


def outcome(hits: int, misses: int, bypasses: int = 0) -> str:
    """What the case did to get its compiled code, from the graphs its calls found in the cache, compiled into it and
    compiled where the cache cannot keep them."""
    if misses or bypasses:
        return "partly loaded" if hits else "compiled"
    return "loaded" if hits else "nothing compiled"


class NotCacheable(BaseModel):
    graphs: compile.Count
    why: str


class CompileCacheRecord(BaseModel):
    """The compile cache axis's part of a record's setup, as the report reads it."""

    model_config = ConfigDict(extra="allow")
    outcome: str | None = None
    load_s: compile.Seconds | None = None
    compile_s: compile.Seconds | None = None
    not_cacheable: NotCacheable | None = None


class CompileCacheAxis(Axis[CompileCacheSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "compile_cache"
    settings_model = CompileCacheSettings
    record_model = CompileCacheRecord
    drift_baseline_values = {"compile_cache": "none"}

    def keeps(self, case: Case) -> bool:
        """Whether the case's compiled code is kept in, and loaded from, the artifact cache."""
        return self.of(case).compile_cache == "portable"

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        return [], (["compile-cache"] if self.keeps(case) else [])

    def check(self, case: Case, plan: LoadPlan) -> None:
        if not self.keeps(case):
            return
        if not compile.AXIS.compiles(case):
            raise Unsupported("compile_cache: portable keeps compiled code; this case compiles nothing (give it "
                              "compile: regional or full)")
        if not os.environ.get(child_env.ARTIFACT_CACHE):
            raise Unsupported("compile_cache: portable: this worker was given no artifact cache folder (the runner "
                              "gives every worker one)")

    def before_load(self, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        if not self.keeps(case):
            return None
        folder = isolated_caches(case)
        shutil.rmtree(folder, ignore_errors=True)  # a retried case starts empty too
        folder.mkdir(parents=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
        return {"local_caches": "empty, the case's own (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR)"}

    def observe(self, pipe: Any, case: Case, plan: LoadPlan) -> CompileCacheObservation | None:
        if not self.keeps(case):
            return None
        from flux2bench.artifact_cache import ArtifactCache
        from flux2bench.compile_artifacts import CompiledCode, StaleEntry, load_into_torch, put_kernels

        code = CompiledCode(ArtifactCache(Path(os.environ[child_env.ARTIFACT_CACHE])),
                            key_inputs(case, pipe.transformer, plan.device))
        entry = code.restore()
        loaded: dict[str, Any] = {}
        if entry.artifacts is not None:
            start = time.perf_counter()
            # The kernel files first: torch keeps what it loaded, so an entry found unusable after that would leave
            # the case loading part of it instead of compiling.
            try:
                kernels = put_kernels(entry.kernels, triton_folder())
                kinds = load_into_torch(entry.artifacts)[1]
                loaded = {"load_s": time.perf_counter() - start, "artifacts": kinds, "kernels": kernels}
            except StaleEntry as exc:
                shutil.rmtree(triton_folder(), ignore_errors=True)  # the case starts with an empty one again
                entry = code.discard(str(exc))
        return CompileCacheObservation(case, code, entry, loaded)


class CompileCacheObservation:
    """One case's compiled code: what the cache held, what the measured calls compiled, and what was stored."""

    def __init__(self, case: Case, code: CompiledCode, entry: Entry, loaded: dict[str, Any]):
        from flux2bench.trackers.compilation import compile_seconds

        self.case, self.code, self.entry, self.loaded = case, code, entry, loaded
        self.before = compile.compile_counts()
        self.seconds_before = compile_seconds()

    def found(self) -> dict[str, Any]:
        from flux2bench.trackers.compilation import compile_seconds

        counts = {name: value - self.before.get(name, 0) for name, value in compile.compile_counts().items()}
        hits, misses = counts["fxgraph_hit"], counts["fxgraph_miss"]
        found: dict[str, Any] = {"mechanism": MECHANISM, "key": self.code.key, "entry": self.entry.state,
                                 "outcome": outcome(hits, misses, counts["fxgraph_bypass"]),
                                 "outcome_method": OUTCOME_METHOD,
                                 "compile_s": compile_seconds() - self.seconds_before, **self.loaded}
        if counts["fxgraph_bypass"]:
            found["not_cacheable"] = {"graphs": counts["fxgraph_bypass"], "why": NOT_CACHEABLE}
        if self.loaded:
            found["made_by"] = self.entry.made_by
        if misses:
            found["stored"] = self._store(found["compile_s"], misses)
        return found

    def _store(self, compile_s: float, compiled: int) -> dict[str, Any] | None:
        """Store every artifact of this worker under the key (a fuller entry replaces a partial one)."""
        from flux2bench.compile_artifacts import kernels_in, kernels_size, saved_from_torch

        try:
            saved = saved_from_torch()
        except Exception as exc:  # noqa: BLE001 - the measurement stands; the next worker compiles again
            return {"not_stored": f"torch could not save its artifacts: {type(exc).__name__}: {exc}"}
        if saved is None:
            return None
        artifacts, kinds = saved
        made_by = {"case": self.case.key, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "compile_s": compile_s, "graphs_compiled": compiled}
        stored: dict[str, Any] = {"bytes": len(artifacts), "artifacts": kinds}
        try:
            kernels = kernels_in(triton_folder())
            stored["kernels"] = kernels_size(kernels)
            self.code.store(artifacts, made_by, kernels)
        except OSError as exc:  # the measurement stands; the next worker compiles again
            return {**stored, "not_stored": f"{type(exc).__name__}: {exc}"}
        return stored


AXIS = CompileCacheAxis()
