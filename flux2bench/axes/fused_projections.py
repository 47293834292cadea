"""Fused QKV projections: ``fuse_qkv: true`` calls diffusers' ``transformer.fuse_qkv_projections()``, which gives
each attention module that supports it one ``to_qkv`` (and ``to_added_qkv`` for the text stream) in place of three
matrix products.

On FLUX.2 (diffusers 0.42.1) that is the double-stream blocks' ``Flux2Attention``: its processors
(``Flux2AttnProcessor``, ``Flux2KVAttnProcessor``) read the fused layers once ``fused_projections`` is set. The
single-stream blocks' ``Flux2ParallelSelfAttention`` already computes Q, K, V and the feed-forward input in one
product (``_supports_qkv_fusion = False``): nothing to fuse there. diffusers keeps the unfused layers beside the fused
ones, so the fused transformer holds more weights; the record says how many bytes.

Fusing concatenates the layers' ``weight.data`` and copies the result into a new bf16 ``nn.Linear``, which a quantized
weight does not survive: with a quantized transformer the case is refused before loading. Found on the CPU with
torchao 0.18's own tensors: ``Int8Tensor`` has no ``aten.cat``; per-tensor ``Float8Tensor``s concatenate only with
equal scales; per-row ``Float8Tensor``s concatenate, but cannot be copied into a bf16 parameter. Fusing before
quantizing (as a hand-built pipeline can) is not what ``from_pretrained`` with a quantization config does.
Fusion runs before offload, so that offload hooks see the fused layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from flux2bench.axes import precision
from flux2bench.axes.base import UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.axes.quantization_backends import UNQUANTIZED
from flux2bench.errors import Unsupported

if TYPE_CHECKING:
    from flux2bench.case import Case

METHOD = "transformer.fuse_qkv_projections"
QUANTIZED = ("diffusers' fuse_projections concatenates the projections' weight.data and copies it into a new bf16 "
             "nn.Linear; {precision} weights do not survive that (torchao 0.18: Int8Tensor has no aten.cat, per-tensor "
             "Float8Tensors need equal scales, a per-row Float8Tensor cannot be copied into a bf16 parameter; "
             "bitsandbytes stores packed 4-bit bytes), and from_pretrained quantizes before anything can be fused")


class FusedProjectionsSettings(Settings):
    fuse_qkv: Annotated[bool, UNKEYED_AT_DEFAULT] = Field(
        False, description="diffusers' fuse_qkv_projections on the transformer (bf16 only)")


class FusedProjectionsAxis(Axis[FusedProjectionsSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "fused_projections"
    settings_model = FusedProjectionsSettings
    drift_baseline_values = {"fuse_qkv": False}

    def fuses(self, case: Case) -> bool:
        """Whether the case's transformer computes Q, K and V in one product per stream."""
        return self.of(case).fuse_qkv

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        return (["fused-qkv"] if self.fuses(case) else []), []

    def check(self, case: Case, plan: LoadPlan) -> None:
        held = precision.AXIS.held(case)["transformer"]
        if self.fuses(case) and held != UNQUANTIZED:
            raise Unsupported(f"fuse_qkv with a {held} transformer: " + QUANTIZED.format(precision=held))

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        if not self.fuses(case):
            return None
        from diffusers.models.attention import AttentionModuleMixin

        before = _parameter_bytes(pipe.transformer)
        pipe.transformer.fuse_qkv_projections()
        modules = [m for m in pipe.transformer.modules() if isinstance(m, AttentionModuleMixin)]
        fused = sorted({type(m).__name__ for m in modules if m._supports_qkv_fusion and m.fused_projections})
        if not fused:
            raise Unsupported("fuse_qkv: no attention module of this transformer supports QKV fusion")
        return {"method": METHOD,
                "fused": {name: sum(type(m).__name__ == name for m in modules) for name in fused},
                "already_fused": sorted({type(m).__name__ for m in modules if not m._supports_qkv_fusion}),
                "weights_added_bytes": _parameter_bytes(pipe.transformer) - before,
                "unfused_layers": "kept by diffusers beside the fused ones"}


def _parameter_bytes(module: Any) -> int:
    return int(sum(p.numel() * p.element_size() for p in module.parameters()))


AXIS = FusedProjectionsAxis()
