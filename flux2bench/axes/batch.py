"""Batch size: images per pipeline call, through the pipeline's own batching (``num_images_per_prompt``).

Each image of a call has its own seed: a case seed ``s`` at batch ``B`` makes the images of seeds ``s .. s+B-1``,
each from its own ``torch.Generator``, so image ``s+i`` of a batch is the image a batch-1 case of seed ``s+i``
makes (within the numerics of a batched kernel). Precomputed prompt embeddings are passed once and repeated by the
pipeline, not recomputed. The transformer's batch is read from its calls, not assumed: a true-CFG model (klein base)
runs a conditional and an unconditional call per step, so each step processes twice the batch.

A batched case's drift is measured against the batch-1 case of the same setup (``own_drift_baseline``) that makes
the image of every seed of its batches, so that it shows what batching alone changes, image by image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from flux2bench.axes import compile as compile_axis
from flux2bench.axes.base import UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.errors import Unsupported

if TYPE_CHECKING:

    from flux2bench.case import Case


# The largest seed torch.Generator.manual_seed accepts: a case seed's last image seed (s + batch_size - 1) too.
MAX_SEED = 2**64 - 1
# Images per pipeline call: more than a 141 GB card holds at 64x64 with the smallest model.
MAX_BATCH = 4096


class BatchSettings(Settings):
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH), UNKEYED_AT_DEFAULT] = Field(
        1, description="images per pipeline call (seeds s, s+1, ... of each case seed s)")


class BatchAxis(Axis[BatchSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "batch"
    settings_model = BatchSettings
    drift_baseline_values = {"batch_size": 1}

    def size(self, case: Case) -> int:
        """Images per pipeline call."""
        return self.of(case).batch_size

    def image_seeds(self, case: Case, seed: int) -> list[int]:
        """The seeds of the images of one call started from case seed ``seed``."""
        return [seed + i for i in range(self.size(case))]

    def call_arguments(self, case: Case, seed: int) -> dict[str, Any]:
        """The pipeline's batching arguments of one call: the image count and one generator per image."""
        import torch

        return {"num_images_per_prompt": self.size(case),
                "generator": [torch.Generator(device="cpu").manual_seed(s) for s in self.image_seeds(case, seed)]}

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        size = self.size(case)
        return [], ([f"batch={size}"] if size != 1 else [])

    def own_drift_baseline(self, case: Case) -> dict[str, Any] | None:
        """A batched case is compared with the batch-1 case of its own setup: the drift batching alone causes. That
        case makes, one per call, the image of every seed the batches make (seeds 0 and 1 for a batch of 2 from seed
        0), so that each image of a batch is compared with the same seed's unbatched image, not only the first."""
        if self.size(case) == 1:
            return None
        seeds = {s for seed in case.seeds for s in self.image_seeds(case, seed)}
        return {"batch_size": 1, "seeds": tuple(sorted(seeds))}

    def refusal(self, case: Case) -> tuple[str, str] | None:
        size = self.size(case)
        last = max(case.seeds) + size - 1
        if last > MAX_SEED:
            return "seeds", (f"seed {max(case.seeds)} at batch_size {size} makes image seed {last}, beyond the "
                             f"largest a generator takes ({MAX_SEED}); use seeds at most {MAX_SEED - size + 1}")
        return None

    def check(self, case: Case, plan: LoadPlan) -> None:
        seeds = [s for seed in case.seeds for s in self.image_seeds(case, seed)]
        if len(set(seeds)) < len(seeds):
            raise Unsupported(f"seeds {list(case.seeds)} at batch {self.size(case)} make some image seeds twice "
                              f"({seeds}); give seeds at least {self.size(case)} apart")

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any]:
        return {"batch_size": self.size(case), "seeds_per_call": [self.image_seeds(case, s) for s in case.seeds],
                "method": "num_images_per_prompt, one torch.Generator per image"}

    def observe(self, pipe: Any, case: Case, plan: LoadPlan) -> BatchObservation:
        return BatchObservation(pipe, case)


class BatchObservation:
    """The transformer's batch of every call of one case, and whether its batch shape compiled anew."""

    def __init__(self, pipe: Any, case: Case) -> None:
        self.case = case
        self.batches: list[int] = []
        self.compile_before = compile_axis.compile_counts()
        pipe.transformer.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None:
            self.batches.append(int(hidden.shape[0]))

    def found(self) -> dict[str, Any]:
        found = transformer_batch(self.batches, pipeline_calls(self.case) * self.case.steps)
        if compile_axis.AXIS.compiles(self.case):
            found["compiled_for_this_batch"] = compiled_for_batch(self.compile_before, compile_axis.compile_counts())
        return found


def pipeline_calls(case: Case) -> int:
    """Pipeline calls a case's worker makes: the warm-ups, then every (prompt, seed) in each repeat."""
    return case.warmup + case.repeats * len(case.prompts) * len(case.seeds)


def transformer_batch(batches: list[int], steps_run: int) -> dict[str, Any]:
    """What the transformer really processed, from the batch dimension of every call: its batch per call, calls
    per denoising step (2 under true CFG) and their product, the effective batch of a step."""
    if not batches or not steps_run:
        return {"transformer_batch": None, "reason": "no transformer call observed"}
    sizes = sorted(set(batches))
    per_step = len(batches) / steps_run
    return {"transformer_batch": sizes[0] if len(sizes) == 1 else sizes, "transformer_calls_per_step": per_step,
            "effective_batch": sizes[-1] * per_step,
            "effective_batch_method": "hidden_states.shape[0] of each transformer call x calls per denoising step"}


def compiled_for_batch(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Whether this case's batch shape had to be compiled anew (graphs compiled with inductor cache misses) or
    found its kernels in the run's inductor cache; the compile time itself is the case's first call."""
    delta = {name: after[name] - before.get(name, 0) for name in ("graphs", "fxgraph_miss", "fxgraph_hit")}
    return {"recompiled": delta["graphs"] > 0 and delta["fxgraph_miss"] > 0, **delta,
            "where_the_time_is": "latency.first_call_s (the warm-up); timed calls that compiled are counted in "
                                 "latency.compiled_graphs"}


AXIS = BatchAxis()
