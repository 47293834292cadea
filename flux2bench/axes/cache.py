"""Step caches of diffusers that can serve the FLUX.2 transformer (``transformer.enable_cache``): they reuse or
predict block outputs across denoising steps, trading drift for speed. ``cache_options`` are passed to the config.

``Flux2Pipeline`` never enters ``transformer.cache_context(...)`` (the klein pipelines do), and the stateful hooks
(TaylorSeer) raise "No cache context is set" without one: for such pipelines the harness sets a context around
every transformer call with forward hooks, which is what ``cache_context`` does. ``Flux2Pipeline`` resets the
cache state at the end of each call (``maybe_free_model_hooks``), so every image starts fresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import Field

from flux2bench.axes.base import (ONE_PER_BLOCK, UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan,
                                  LoadsPipeline, Settings)
from flux2bench.errors import Unsupported
from flux2bench.models import MODELS

if TYPE_CHECKING:
    from flux2bench.case import Case

CONFIGS = {"taylorseer": "TaylorSeerCacheConfig", "magcache": "MagCacheConfig",
           "pab": "PyramidAttentionBroadcastConfig", "fastercache": "FasterCacheConfig",
           "firstblock": "FirstBlockCacheConfig"}
# Found on the tiny FLUX.2 pipeline with diffusers 0.42.1.
REFUSED = {
    "firstblock": "FirstBlockCache fails on FLUX.2's fused last single-stream block ('unsupported operand type(s) for "
                  "-: Tensor and list'; diffusers issue 14280, fix pending in PR 14359)",
}
# Options a config needs to work on FLUX.2, unless the scenario sets them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "pab": {"spatial_attention_block_skip_range": 2},
    # FLUX.2-dev is guidance-distilled: there is no unconditional batch to skip (the default fails on chunk(2)).
    "fastercache": {"spatial_attention_block_skip_range": 2, "is_guidance_distilled": True, "tensor_format": "BCHW"},
}
NEEDS_TIMESTEP = ("pab", "fastercache")


CacheName = Literal["none", "taylorseer", "magcache", "pab", "fastercache", "firstblock"]
CacheOptions = dict[str, int | float | bool | str | list[float]]
assert get_args(CacheName) == ("none", *CONFIGS), "a cache is named in CONFIGS and in CacheName alike"


class CacheSettings(Settings):
    cache: Annotated[CacheName, UNKEYED_AT_DEFAULT] = "none"
    cache_options: Annotated[CacheOptions, ONE_PER_BLOCK, UNKEYED_AT_DEFAULT] = Field(
        {}, description="the diffusers cache config's fields")


class CacheAxis(Axis[CacheSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "cache"
    settings_model = CacheSettings
    drift_baseline_values = {"cache": "none"}

    def caches(self, case: Case) -> bool:
        """Whether a step cache reuses some steps' work (so that no one step stands for the others)."""
        return self.of(case).cache != "none"

    def step_cache(self, case: Case) -> CacheName:
        """The case's step cache (``none`` without one)."""
        return self.of(case).cache

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        cache = self.of(case).cache
        return ([f"cache={cache}"] if cache != "none" else []), []

    def check(self, case: Case, plan: LoadPlan) -> None:
        settings = self.of(case)
        cache, options = settings.cache, settings.cache_options
        if cache == "none":
            return
        if cache in REFUSED:
            raise Unsupported(REFUSED[cache])
        if cache == "magcache" and "mag_ratios" not in options and not options.get("calibrate"):
            raise Unsupported("MagCache needs mag_ratios calibrated for the model (diffusers ships them for FLUX.1 "
                              "only): run once with cache_options: {calibrate: true, num_inference_steps: STEPS}, "
                              "then pass the printed ratios as cache_options.mag_ratios")
        self.config(case, pipe=None)  # a bad option is refused before loading

    def config(self, case: Case, pipe: Any) -> Any:
        import diffusers

        settings = self.of(case)
        cache, options = settings.cache, settings.cache_options
        fields: dict[str, Any] = {**DEFAULTS.get(cache, {}), **options}
        if cache in NEEDS_TIMESTEP:
            fields["current_timestep_callback"] = lambda: pipe.current_timestep
        if cache == "magcache":
            fields.setdefault("num_inference_steps", case.steps)
        try:
            return getattr(diffusers, CONFIGS[cache])(**fields)
        except (TypeError, ValueError) as exc:
            raise Unsupported(f"cache {cache} with options {options}: {exc}") from None

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        cache = self.of(case).cache
        if cache == "none":
            return None
        config = self.config(case, pipe)
        pipe.transformer.enable_cache(config)
        context = "provided by the pipeline"
        if not MODELS[case.model].enters_cache_context:
            _set_context_per_call(pipe)
            context = "set around every transformer call by forward hooks (the pipeline enters none)"
        fields = {k: v for k, v in vars(config).items() if not callable(v)}
        return {"cache": cache, "config": type(config).__name__, "fields": _plain(fields), "cache_context": context,
                "method": "transformer.enable_cache"}


def _plain(value: Any) -> Any:
    """JSON-ready values for the record (tuples as lists, dtypes and other objects as text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def _set_context_per_call(pipe: Any) -> None:
    """Enter a diffusers cache context, with the scheduler's step, around every transformer call."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    def enter(module: Any, args: Any, kwargs: Any) -> None:
        scheduler, timestep = pipe.scheduler, pipe.current_timestep
        steps = getattr(scheduler, "timesteps", None)
        index = sigma = None
        if timestep is not None and steps is not None and len(found := (steps == timestep).nonzero()):
            index = int(found[0])
            sigma = float(scheduler.sigmas[index])
        _set_cache_context(module, CacheContext("cond", step_index=index, timestep=timestep, sigma=sigma,
                                                num_inference_steps=None if steps is None else len(steps)))

    pipe.transformer.register_forward_pre_hook(enter, with_kwargs=True)
    pipe.transformer.register_forward_hook(lambda module, args, kwargs, out: _set_cache_context(module, None),
                                           with_kwargs=True, always_call=True)


AXIS = CacheAxis()
