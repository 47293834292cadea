"""Text encoder: ``local`` (the pipeline holds it and encodes each prompt) or ``precomputed``.

``precomputed`` reproduces the announcement's "remote text encoder" without a network: a separate worker
process loads only the tokenizer and text encoder, encodes every prompt once and caches the embeddings in the
run directory; the measured process never holds the text encoder and passes ``prompt_embeds``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from flux2bench.axes import precision as precision_axis
from flux2bench.axes.base import ArtifactPlaces, Axis, LoadPlan, LoadsPipeline, MakesArtifact, Settings
from flux2bench.axes.precision import check_precision_supported
from flux2bench.models import MODELS
from flux2bench.safe_files import write_atomic

if TYPE_CHECKING:
    import torch

    from flux2bench.case import Case


NEGATIVE = "negative"  # the empty prompt's embeddings, for pipelines with classifier-free guidance


def embedding_cache_path(run_dir: Path, case: Case) -> Path:
    """Where a precomputed case's prompt embeddings are cached (shared by cases with equal text encoders)."""
    identity = json.dumps([case.model, case.weights, case.source, precision_axis.AXIS.of(case).text_encoder_precision,
                           case.prompts])
    return run_dir / "embeddings" / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.safetensors"


class TextEncoderSettings(Settings):
    text_encoder: Literal["local", "precomputed"] = "local"


class TextEncoderAxis(Axis[TextEncoderSettings], LoadsPipeline, MakesArtifact):
    name = "text_encoder"
    settings_model = TextEncoderSettings
    # Not part of the baseline: precomputed embeddings come from the same bf16 encoder, and gave bit-identical
    # latents to the local encoder in every workload measured (reports/h100-20261126-094024).

    def precomputed(self, case: Case) -> bool:
        """Whether the case's prompts are encoded beforehand, by a worker of their own."""
        return self.of(case).text_encoder == "precomputed"

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        return [], (["te=precomputed"] if self.precomputed(case) else [])

    def plan_load(self, case: Case, plan: LoadPlan) -> None:
        if self.precomputed(case):
            plan.skip.add("text_encoder")

    def artifact(self, case: Case, places: ArtifactPlaces) -> Path | None:
        return embedding_cache_path(places.run_dir, case) if self.precomputed(case) else None

    def make_artifact(self, case: Case, places: ArtifactPlaces, device: torch.device,
                      load_pipeline: Callable[[Case, LoadPlan], Any], progress: Callable[[str], None]) -> Path:
        """The separate text-encoding step: load only tokenizer + text encoder, encode every prompt, cache."""
        import torch
        from safetensors.torch import save

        precision = precision_axis.AXIS.held(case)["text_encoder"]
        check_precision_supported(precision, device)
        plan = LoadPlan(device=device, home=device, precisions={"text_encoder": precision},
                        skip={"transformer", "vae"})
        pipe = load_pipeline(case, plan)
        prompts = {f"prompt_{i}": p for i, p in enumerate(case.prompts)}
        if MODELS[case.model].guidance == "cfg":
            prompts[NEGATIVE] = ""  # what the pipeline encodes for the unconditional pass
        with torch.inference_mode():
            embeds = {name: pipe.encode_prompt(prompt=p, device=device)[0].cpu().contiguous()
                      for name, p in prompts.items()}
        path = embedding_cache_path(places.run_dir, case)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, save(embeds))  # whole or not at all: a worker killed mid-write leaves nothing to trust
        return path

    def prompt_inputs(self, case: Case, run_dir: Path, device: torch.device) -> list[dict[str, Any]]:
        """The pipeline's text arguments for each of the case's prompts."""
        if not self.precomputed(case):
            return [{"prompt": prompt} for prompt in case.prompts]
        from safetensors.torch import load_file

        path = embedding_cache_path(run_dir, case)
        if not path.exists():
            raise FileNotFoundError(f"precomputed prompt embeddings missing at {path}; the runner computes them first")
        tensors = {name: tensor.to(device) for name, tensor in load_file(str(path)).items()}
        negative = {"negative_prompt_embeds": tensors[NEGATIVE]} if NEGATIVE in tensors else {}
        return [{"prompt_embeds": tensors[f"prompt_{i}"], **negative} for i in range(len(case.prompts))]


AXIS = TextEncoderAxis()
