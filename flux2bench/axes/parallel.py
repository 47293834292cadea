"""Context parallelism: one image split over ``gpus`` GPUs of one host, through diffusers'
``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=N))`` (or ``ring_degree=N``).

The runner starts one worker per GPU with the environment ``torchrun`` sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); every rank loads the whole pipeline and runs it with the same
inputs and seed, and only the transformer's sequence is split (its output is gathered on every rank). The record
is rank 0's, with every rank's memory peaks and energy beside it.
"""

from __future__ import annotations

import atexit
import os
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from flux2bench.axes import attention, offload
from flux2bench.axes.base import (UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline,
                                  PlacesWorker, Settings)
from flux2bench.errors import MachineLacks, Unsupported
from flux2bench.models import MODELS

if TYPE_CHECKING:

    from flux2bench.case import Case

TEXT_TOKENS = 512  # prompts are padded to this length
PATCH = 16  # pixels per image token side (VAE 8x, then 2x2 patches)
# Backends that return the log-sum-exp ring attention merges partial results with (diffusers 0.42.1).
RING_BACKENDS = ("fa3", "_native_cudnn", "_native_flash", "flash", "flash_hub", "_flash_3", "_flash_3_hub")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def sequence_tokens(case: Case) -> int:
    """Tokens of the transformer's joint sequence: text, image, and each reference image (at most 1024x1024)."""
    image = (case.width // PATCH) * (case.height // PATCH)
    ref_w, ref_h = case.reference_image_size
    scale = min(1.0, (1024 * 1024 / (ref_w * ref_h)) ** 0.5)
    reference = (int(ref_w * scale) // PATCH) * (int(ref_h * scale) // PATCH)
    return TEXT_TOKENS + image + case.reference_images * reference


class ParallelSettings(Settings):
    parallel: Annotated[Literal["none", "ulysses", "ring"], UNKEYED_AT_DEFAULT] = "none"
    gpus: Annotated[int, Field(ge=1), UNKEYED_AT_DEFAULT] = Field(1, description="GPUs one image is split over")


class ParallelAxis(Axis[ParallelSettings], LoadsPipeline, PlacesWorker, ChoosesDriftBaseline):
    name = "parallel"
    settings_model = ParallelSettings
    drift_baseline_values = {"parallel": "none", "gpus": 1}

    def gpus(self, case: Case) -> int:
        return self.of(case).gpus

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        settings = self.of(case)
        parallel, gpus = settings.parallel, settings.gpus
        return ([f"{parallel}x{gpus}"] if parallel != "none" else []), []

    def check(self, case: Case, plan: LoadPlan) -> None:
        import torch

        settings = self.of(case)
        parallel, gpus = settings.parallel, settings.gpus
        if parallel == "none":
            if gpus > 1:
                raise Unsupported(f"gpus: {gpus} needs parallel: ulysses or ring")
            return
        if gpus < 2:
            raise Unsupported(f"parallel: {parallel} needs gpus: 2 or more")
        if plan.device.type != "cuda":
            raise MachineLacks("context parallelism needs CUDA GPUs: diffusers 0.42.1's enable_parallelism divides the "
                              "rank by torch.accelerator.device_count(), which is 0 on a CPU-only machine")
        if (visible := torch.cuda.device_count()) < gpus:
            raise MachineLacks(f"parallel: {parallel} over {gpus} GPUs, but {visible} are visible")
        if offload.AXIS.moves_weights(case):
            raise Unsupported("context parallelism keeps the transformer on every GPU; offload is not combined with it")
        self._check_shapes(case, parallel, gpus)

    @staticmethod
    def _check_shapes(case: Case, parallel: str, gpus: int) -> None:
        heads = MODELS[case.model].config("transformer")["num_attention_heads"]
        if parallel == "ulysses" and heads % gpus:
            raise Unsupported(f"ulysses over {gpus} GPUs splits the {heads} attention heads; {heads} is not divisible")
        tokens = sequence_tokens(case)
        if tokens % gpus or TEXT_TOKENS % gpus:
            raise Unsupported(f"the joint sequence of {tokens} tokens (text {TEXT_TOKENS}) does not split evenly over "
                              f"{gpus} GPUs")
        if parallel == "ring" and (backend := attention.AXIS.requested(case)) not in RING_BACKENDS:
            raise Unsupported(f"ring attention merges partial results by their log-sum-exp, which attention "
                              f"{backend!r} does not return; use one of {', '.join(RING_BACKENDS)}")

    def before_load(self, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        import torch

        if self.of(case).parallel == "none":
            return None
        torch.cuda.set_device(plan.device)
        torch.distributed.init_process_group("nccl", device_id=plan.device)
        atexit.register(torch.distributed.destroy_process_group)
        return {"rank": rank(), "world_size": torch.distributed.get_world_size(), "backend": "nccl"}

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        settings = self.of(case)
        parallel, gpus = settings.parallel, settings.gpus
        if parallel == "none":
            return None
        from diffusers import ContextParallelConfig

        degree = {"ulysses_degree" if parallel == "ulysses" else "ring_degree": gpus}
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))
        return {"parallel": parallel, "gpus": gpus, **degree, "method": "transformer.enable_parallelism"}


AXIS = ParallelAxis()
