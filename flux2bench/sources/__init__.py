"""Model sources: where a case's pipeline comes from.

- ``pretrained``: ``from_pretrained`` on a hub repo id or a local directory, the path real users take
  (``flux2bench.sources.pretrained``).
- ``synthetic``: the exact architecture from the shipped configs with random weights, allocated where they
  will live (``flux2bench.sources.synthetic``). Memory and compute are those of the real model; images are not.
- ``checkpoint``: the same synthetic weights written once to a diffusers folder on disk and loaded like
  ``pretrained`` (``flux2bench.axes.checkpoint``).
"""

from __future__ import annotations

from typing import Any

from flux2bench.axes.base import LoadPlan
from flux2bench.axes.checkpoint import checkpoint_path, checkpoints_root
from flux2bench.models import MODELS
from flux2bench.sources.pretrained import pretrained_pipeline
from flux2bench.sources.synthetic import synthetic_pipeline


def load_pipeline(case, plan: LoadPlan) -> Any:
    """The case's pipeline as ``plan`` says: each held component in its precision on its device, the rest None."""
    spec = MODELS[case.model]
    if case.weights == "synthetic":
        return synthetic_pipeline(spec, plan)
    if case.weights == "checkpoint":
        return pretrained_pipeline(spec, str(checkpoint_path(case, checkpoints_root())), plan)
    return pretrained_pipeline(spec, case.source or spec.hub_id, plan)
