"""The model registry: what each ``model:`` of a scenario is and how its pipeline is assembled.

Each model is a directory of public config.json values shipped in ``flux2bench/configs/<name>/`` (one file per
component, ``_class_name`` naming the diffusers class) plus ``pipeline.json``: the pipeline class, the hub
repository ``weights: pretrained`` loads by default, pipeline options (``is_distilled``), the published step
count and guidance scale, and how guidance works (``embedded`` in the transformer, classifier-free ``cfg`` with
two transformer calls per step, or ``none`` for step-distilled models). Sources of the values are in
``configs/KLEIN_SOURCES.md`` and ``shared`` reference notes named there.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Literal

from flux2bench.text_encoders import FAMILIES

COMPONENTS = ("text_encoder", "transformer", "vae")
# Pipelines that wrap each transformer call in ``transformer.cache_context(...)`` themselves.
ENTERS_CACHE_CONTEXT = ("Flux2KleinPipeline",)
PIPELINE_OPTIONS = ("is_distilled",)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pipeline: str  # diffusers pipeline class name
    hub_id: str | None  # what ``weights: pretrained`` loads when the scenario gives no ``source``
    steps: int  # the published number of steps
    guidance_scale: float
    guidance: Literal["embedded", "cfg", "none"]
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    def config(self, component: str) -> dict[str, Any]:
        """The shipped config.json values of one component (``_class_name`` names the diffusers class)."""
        return copy.deepcopy(_read(self.name, component))

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline)

    @property
    def enters_cache_context(self) -> bool:
        return self.pipeline in ENTERS_CACHE_CONTEXT

    @property
    def family(self) -> str:
        return self.config("text_encoder")["model_type"]

    def text_encoder(self) -> Any:
        return FAMILIES[self.family][0](self.config("text_encoder"))

    def tokenizer(self) -> Any:
        return FAMILIES[self.family][1]()


@cache
def _read(model: str, component: str) -> dict[str, Any]:
    return json.loads((resources.files("flux2bench") / "configs" / model / f"{component}.json").read_text())


def _spec(name: str) -> ModelSpec:
    pipeline = _read(name, "pipeline")
    return ModelSpec(name, pipeline["_class_name"], pipeline["hub_id"], pipeline["num_inference_steps"],
                     pipeline["guidance_scale"], pipeline["guidance"],
                     {key: pipeline[key] for key in PIPELINE_OPTIONS if key in pipeline})


def import_model_classes(spec: ModelSpec) -> None:
    """Import the library classes ``spec``'s pipeline is built from (diffusers' pipeline, transformer and VAE,
    transformers' text encoder), without building anything."""
    import diffusers
    import transformers

    spec.pipeline_class()
    for component in ("transformer", "vae"):
        getattr(diffusers, spec.config(component)["_class_name"])
    for architecture in spec.config("text_encoder").get("architectures", []):
        getattr(transformers, architecture)


MODELS: dict[str, ModelSpec] = {name: _spec(name) for name in (
    "flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b",
    "tiny", "tiny-klein", "tiny-klein-base")}
