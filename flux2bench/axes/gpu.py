"""The GPU kind a case is measured on: ``gpu: [H100, H200, L40S]`` places each case on a GPU of that kind.

Kinds are named as Ray names accelerator types (``NVIDIA H100 80GB HBM3`` -> ``H100``, ``NVIDIA GeForce RTX 4090``
-> ``GeForce-RTX-4090``), so that a scenario's value is the resource a Ray cluster advertises
(``accelerator_type:H100``). The default, none, runs the case on whatever GPU the executor gives it, and stays out
of the case key, so that the keys of runs made before this axis existed do not change.

The axis places, it does not measure: the Ray executor asks for a node of the kind, and the local executor runs
the case only where this host's GPUs are of that kind (elsewhere the case waits for a resume on such a host).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, StringConstraints

from flux2bench.axes.base import UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, Settings

if TYPE_CHECKING:
    from flux2bench.case import Case

GpuKind = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]

# A data-centre model token after the vendor word: upper-case words, then a token holding a digit
# ("NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA RTX PRO 6000 Blackwell" -> "RTX PRO 6000").
_MODEL_TOKEN = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")


def kind_of(device_name: str | None) -> str | None:
    """The kind of a GPU from the name its driver reports, by Ray's naming rule for NVIDIA accelerator types.

    Consumer cards, whose product line is mixed case, keep their product name: ``NVIDIA GeForce RTX 4090`` ->
    ``GeForce-RTX-4090``.
    """
    if not device_name:
        return None
    match = _MODEL_TOKEN.match(device_name)
    token = match.group(1).replace(" ", "-") if match else None
    if token and len(token) > 1:
        return token
    product = re.sub(r"^NVIDIA\s+", "", device_name).strip()
    return product.replace(" ", "-") or None


def resource_name(kind: str) -> str:
    """The custom resource by which a Ray node advertises GPUs of ``kind``."""
    return f"accelerator_type:{kind}"


class GpuSettings(Settings):
    gpu: Annotated[GpuKind | None, UNKEYED_AT_DEFAULT] = Field(
        None, description="the GPU kind to measure on, as Ray names accelerator types (H100, H200, L40S, "
                          "GeForce-RTX-4090); default: any")


class GpuAxis(Axis[GpuSettings], ChoosesDriftBaseline):
    name = "gpu"
    settings_model = GpuSettings

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        kind = self.kind(case)
        return [], ([f"on={kind}"] if kind else [])

    def drift_baseline_identity(self, case: Case) -> tuple[str | None]:
        return (self.kind(case),)  # drift is measured against a baseline computed on the same kind of GPU

    def refusal(self, case: Case) -> tuple[str, str] | None:
        if self.kind(case) and case.device == "cpu":
            return "gpu", f"names a GPU kind ({self.kind(case)}), but device: cpu runs the case on the CPU"
        return None

    def kind(self, case: Case) -> str | None:
        """The GPU kind the case asks for, or None for any."""
        return self.of(case).gpu


AXIS = GpuAxis()
