"""Attention backend of the transformer, through diffusers' attention dispatcher.

``sdpa`` is diffusers' ``native`` backend (``torch.nn.functional.scaled_dot_product_attention``); ``fa3`` is
FlashAttention-3: ``_flash_3`` where ``flash_attn_interface`` imports, else ``_flash_3_hub`` (a kernel fetched
from the Hugging Face hub by the ``kernels`` package). Any other diffusers backend name passes through as is.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Annotated, Any

from pydantic import AfterValidator

from flux2bench.axes.base import Axis, LoadPlan, Option
from flux2bench.errors import Unsupported

def _backend_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"{name!r} is not an attention backend name")
    return name


BackendName = Annotated[str, AfterValidator(_backend_name)]


def backend_name(requested: str) -> str:
    """Map the scenario's attention name to a diffusers backend name."""
    if requested == "sdpa":
        return "native"
    if requested == "fa3":
        return "_flash_3" if importlib.util.find_spec("flash_attn_interface") else "_flash_3_hub"
    return requested


def _unavailable(requested: str, backend: str, exc: Exception) -> Unsupported:
    return Unsupported(f"attention {requested!r} (diffusers backend {backend!r}) is not available: {exc}")


class AttentionAxis(Axis):
    name = "attention"
    options = (Option("attention", BackendName, "sdpa",
                      description="sdpa, fa3, or any diffusers attention backend name"),)
    baseline = {"attention": "sdpa"}

    def label(self, case):
        return [case.settings["attention"]], []

    def check(self, case, plan: LoadPlan) -> None:
        """Fail fast, before a 100 GB load, when diffusers cannot run the requested backend here."""
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        requested = case.settings["attention"]
        backend = backend_name(requested)
        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except Exception as exc:  # unknown name (ValueError) or missing package (RuntimeError)
            raise _unavailable(requested, backend, exc) from exc

    def apply(self, pipe: Any, case, plan: LoadPlan) -> dict[str, Any]:
        requested = case.settings["attention"]
        backend = backend_name(requested)
        try:
            pipe.transformer.set_attention_backend(backend)
        except Exception as exc:  # e.g. a hub kernel that cannot be downloaded
            raise _unavailable(requested, backend, exc) from exc
        return {"requested": requested, "backend": backend, "method": "transformer.set_attention_backend"}


AXIS = AttentionAxis()
