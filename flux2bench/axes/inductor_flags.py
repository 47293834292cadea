"""Inductor flags as a named preset: ``inductor_preset: flux-fast`` sets the ``torch._inductor.config`` flags of
Hugging Face's flux-fast recipe for the FLUX family on Hopper before anything is compiled, and records each flag's
value before and after.

- ``conv_1x1_as_mm``: 1x1 convolutions as matrix products;
- ``coordinate_descent_tuning`` and ``coordinate_descent_check_all_directions``: after autotuning, search the
  neighbourhood of each Triton kernel's best configuration;
- ``epilogue_fusion = False``: no pointwise epilogues fused into matrix-product templates.

Whatever the preset, a compiled case records the value of each of these flags as its compilation will find them,
after loading: quantization may set some (torchao's FP8 and int8 configs turn coordinate descent tuning on, its
``set_inductor_config``), and a first call's compile time is read against them.

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

PresetName = Literal["none", "flux-fast"]
PRESETS: dict[str, dict[str, bool]] = {
    "none": {},
    "flux-fast": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                  "coordinate_descent_check_all_directions": True, "epilogue_fusion": False},
}


FLAGS = tuple(sorted({name for flags in PRESETS.values() for name in flags}))
IN_EFFECT_METHOD = ("torch._inductor.config after loading and quantizing, before the first compilation (torch.compile's "
                    "mode may override some inside the compilation)")


class InductorFlagsSettings(Settings):
    inductor_preset: Annotated[PresetName, UNKEYED_AT_DEFAULT] = "none"


class InductorFlagsAxis(Axis[InductorFlagsSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "inductor_flags"
    settings_model = InductorFlagsSettings
    drift_baseline_values = {"inductor_preset": "none"}

    def flags(self, case: Case) -> dict[str, bool]:
        """The inductor flags the case sets (none: torch's defaults)."""
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

    def before_load(self, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        if not (flags := self.flags(case)):
            return None
        import torch._inductor.config as inductor_config

        before = {name: getattr(inductor_config, name) for name in flags}
        for name, value in flags.items():
            setattr(inductor_config, name, value)
        return {"preset": self.of(case).inductor_preset, "flags": flags, "before": before,
                "method": "torch._inductor.config, set before the first compilation"}

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        if not compile.AXIS.compiles(case):
            return None
        import torch._inductor.config as inductor_config

        return {"in_effect": {name: getattr(inductor_config, name) for name in FLAGS if hasattr(inductor_config, name)},
                "in_effect_method": IN_EFFECT_METHOD}


AXIS = InductorFlagsAxis()
