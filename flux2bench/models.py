"""The model registry: what each ``model:`` of a scenario is and how its pipeline is assembled.

A ``ModelSpec`` names the diffusers pipeline class, the directory of public config.json values shipped in
``flux2bench/configs/<name>/``, the hub repository ``weights: pretrained`` loads by default, and how the text
encoder and tokenizer are built for synthetic weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

COMPONENTS = ("text_encoder", "transformer", "vae")


def _mistral3_text_encoder(config: dict[str, Any]) -> Any:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration(Mistral3Config.from_dict(config))


def _tekken_tokenizer(spec: ModelSpec) -> Any:
    """The Tekken tokenizer shipped inside mistral-common, as a fast tokenizer with Mistral's chat template: the
    pipeline's ``apply_chat_template`` works as with the real PixtralProcessor, and save/load round-trips it.
    Prompts are padded to 512 tokens, so the tokenizer's vocabulary does not change the compute."""
    import mistral_common
    from transformers.integrations.mistral import convert_tekken_tokenizer

    return convert_tekken_tokenizer(str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pipeline: str  # diffusers pipeline class name
    hub_id: str | None  # what ``weights: pretrained`` loads when the scenario gives no ``source``
    text_encoder_factory: Any  # config dict -> text encoder module (built on the meta device by the caller)
    tokenizer_factory: Any  # ModelSpec -> tokenizer

    def config(self, component: str) -> dict[str, Any]:
        """The shipped config.json values of one component (``_class_name`` names the diffusers class)."""
        path = resources.files("flux2bench") / "configs" / self.name / f"{component}.json"
        return json.loads(path.read_text())

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline)

    def text_encoder(self) -> Any:
        return self.text_encoder_factory(self.config("text_encoder"))

    def tokenizer(self) -> Any:
        return self.tokenizer_factory(self)


MODELS: dict[str, ModelSpec] = {
    "flux2-dev": ModelSpec("flux2-dev", "Flux2Pipeline", "black-forest-labs/FLUX.2-dev", _mistral3_text_encoder,
                           _tekken_tokenizer),
    "tiny": ModelSpec("tiny", "Flux2Pipeline", None, _mistral3_text_encoder, _tekken_tokenizer),
}
