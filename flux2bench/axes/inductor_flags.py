"""Inductor flags as a named preset, set in ``torch._inductor.config`` after the pipeline is loaded and quantized and
before anything is compiled, each recorded with the value it replaced:

- ``flux-fast``: the flags of Hugging Face's flux-fast recipe for the FLUX family on Hopper:
  ``conv_1x1_as_mm`` (1x1 convolutions as matrix products), ``coordinate_descent_tuning`` and
  ``coordinate_descent_check_all_directions`` (at a Triton kernel's first launch, after autotuning, search the
  neighbourhood of its best configuration), ``epilogue_fusion = False`` (no pointwise epilogues fused into
  matrix-product templates);
- ``torch-defaults``: the same four flags at torch's defaults. Quantization may have set some: torchao's FP8 and int8
  configs turn coordinate descent tuning on as they quantize (their ``set_inductor_config``), which holds most of an
  FP8 compilation's first call; this preset measures the setup without it.

The preset is set after loading so that it, not the quantization, decides. Whatever the preset, a compiled case
records the value of each of these flags as its compilation will find them (``in_effect``).

They change only what inductor compiles: a case that compiles nothing is refused (it would measure nothing of
them). A flag the installed torch no longer has is refused too, naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from flux2bench.axes import compile
from flux2bench.axes.base import UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.errors import Unsupported

if TYPE_CHECKING:
    from flux2bench.case import Case

PresetName = Literal["none", "flux-fast", "torch-defaults"]
PRESETS: dict[str, dict[str, bool]] = {
    "none": {},
    "flux-fast": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                  "coordinate_descent_check_all_directions": True, "epilogue_fusion": False},
    "torch-defaults": {"conv_1x1_as_mm": False, "coordinate_descent_tuning": False,
                       "coordinate_descent_check_all_directions": False, "epilogue_fusion": True},
}
FLAGS = tuple(sorted({name for flags in PRESETS.values() for name in flags}))
METHOD = "torch._inductor.config, set after loading and quantizing, before the first compilation"
IN_EFFECT_METHOD = ("torch._inductor.config after loading, quantizing and setting the preset, before the first "
                    "compilation (torch.compile's mode may override some inside the compilation)")


class InductorFlagsSettings(Settings):
    inductor_preset: Annotated[PresetName, UNKEYED_AT_DEFAULT] = "none"


class InductorFlagsAxis(Axis[InductorFlagsSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "inductor_flags"
    settings_model = InductorFlagsSettings
    drift_baseline_values = {"inductor_preset": "none"}

    def flags(self, case: Case) -> dict[str, bool]:
        """The inductor flags the case sets (none: whatever torch and the quantization left)."""
        return dict(PRESETS[self.of(case).inductor_preset])

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        preset = self.of(case).inductor_preset
        return ([f"inductor={preset}"] if preset != "none" else []), []

    def check(self, case: Case, plan: LoadPlan) -> None:
        if not (flags := self.flags(case)):
            return
        preset = self.of(case).inductor_preset
        if not compile.AXIS.compiles(case):
            raise Unsupported(f"inductor_preset: {preset} sets flags of the compiler; this case compiles nothing "
                              "(give it compile: regional or full)")
        import torch._inductor.config as inductor_config

        if missing := sorted(name for name in flags if not hasattr(inductor_config, name)):
            raise Unsupported(f"inductor_preset: {preset}: this torch's inductor has no flag {', '.join(missing)}")

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        if not compile.AXIS.compiles(case):
            return None
        import torch._inductor.config as inductor_config

        found: dict[str, Any] = {}
        if flags := self.flags(case):
            found = {"preset": self.of(case).inductor_preset, "flags": flags,
                     "before": {name: getattr(inductor_config, name) for name in flags}, "method": METHOD}
            for name, value in flags.items():
                setattr(inductor_config, name, value)
        in_effect = {name: getattr(inductor_config, name) for name in FLAGS if hasattr(inductor_config, name)}
        return {**found, "in_effect": in_effect, "in_effect_method": IN_EFFECT_METHOD}


AXIS = InductorFlagsAxis()
