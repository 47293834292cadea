"""FP8 attention: ``attention_precision: fp8`` runs the transformer's attention on FP8 (e4m3) queries, keys and
values with FlashAttention-3's FP8 kernels, through torchao's low-precision attention
(``torchao.prototype.attention.apply_low_precision_attention``, backend ``FP8_FA3``: per-head scales, torch's
``_scaled_dot_product_attention_quantized``).

torchao replaces ``torch.nn.functional.scaled_dot_product_attention`` for the duration of each transformer call,
so the case needs ``attention: sdpa`` (diffusers' ``native`` backend, which calls it; the other backends call their
own kernels). It wraps the transformer in a module that does the switching; the pipeline holds the wrapper, which
answers for the transformer's attributes, and ``model_of`` unwraps it for what compiles the model's forward. When
the transformer is compiled, torchao's pre-grad pass (inductor's ``pre_grad_custom_pass``, which it sets) fuses
the rotary embedding into the quantization where it finds the pattern; the record names it.

What it needs is checked before loading: a Hopper GPU (SM 9.x, FA3's FP8 kernels), torch 2.11 or later, an FA3
build that registers its kernels with torch (``flash_attn_interface``) and torchao's prototype module. On the GPU
its output on random inputs is compared with SDPA's first: FP8 rounding gives a relative L2 of a few percent; one
above 0.1 (an SQNR under 20 dB, torchao's own test bound) means a broken kernel and is refused.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Annotated, Any, Literal

from flux2bench.axes import attention
from flux2bench.axes.base import UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.errors import MachineLacks, Unsupported

if TYPE_CHECKING:
    import torch

    from flux2bench.case import Case

HOPPER = 9
TOLERANCE = 0.1
CHECK_SHAPE = (1, 4, 4608, 128)  # batch, heads, FLUX.2's 1024x1024 joint sequence, head dim (SDPA's layout)
KERNEL = "FlashAttention-3 FP8 (e4m3), per-head scales (torchao FP8_FA3)"
METHOD = "torchao.prototype.attention.apply_low_precision_attention(transformer, backend=FP8_FA3)"
WRAPPED = "_orig_mod"  # where torchao's wrapper holds the module it wraps


class AttentionFp8Settings(Settings):
    attention_precision: Annotated[Literal["bf16", "fp8"], UNKEYED_AT_DEFAULT] = "bf16"


def _torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _missing_software() -> str | None:
    """What of the software FP8 attention needs is missing here, or None."""
    if _torch_version() < (2, 11):
        return "torchao's low-precision attention needs torch 2.11 or later"
    if importlib.util.find_spec("flash_attn_interface") is None:
        return ("no FlashAttention-3 build (flash_attn_interface) is installed; FA3 is built from flash-attention's "
                "hopper/ folder, here with its FP8 forward kernels (docs/attention.md)")
    try:
        importlib.import_module("torchao.prototype.attention")
    except ImportError as exc:
        return f"torchao's low-precision attention does not import: {exc}"
    return None


def _sdpa_module() -> Any:
    """SDPA alone, as a module (what torchao wraps), for the check against SDPA."""
    import torch

    class Attention(torch.nn.Module):
        def forward(self, query: Any, key: Any, value: Any) -> Any:
            return torch.nn.functional.scaled_dot_product_attention(query, key, value)

    return Attention()


def agreement_with_sdpa(device: torch.device) -> float:
    """The relative L2 difference between FP8 attention and SDPA on random bf16 inputs."""
    import torch
    from torchao.prototype.attention import AttentionBackend, apply_low_precision_attention

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(CHECK_SHAPE, generator=generator, device=device, dtype=torch.bfloat16) for _ in range(3))
    with torch.inference_mode():
        reference = _sdpa_module()(q, k, v).float()
        fp8 = apply_low_precision_attention(_sdpa_module(), backend=AttentionBackend.FP8_FA3)(q, k, v).float()
    return float(torch.linalg.vector_norm(fp8 - reference) / torch.linalg.vector_norm(reference))


class AttentionFp8Axis(Axis[AttentionFp8Settings], LoadsPipeline, ChoosesDriftBaseline):
    name = "attention_fp8"
    settings_model = AttentionFp8Settings
    drift_baseline_values = {"attention_precision": "bf16"}

    def __init__(self) -> None:
        super().__init__()
        self._agreement: float | None = None

    def fp8(self, case: Case) -> bool:
        """Whether the case's attention runs on FP8 inputs."""
        return self.of(case).attention_precision == "fp8"

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        return (["attn=fp8"] if self.fp8(case) else []), []

    def model_of(self, transformer: Any) -> Any:
        """The transformer model itself: under FP8 attention the pipeline holds torchao's wrapper around it."""
        submodules = vars(transformer).get("_modules")  # a module's own children; nothing for other objects
        inner = submodules.get(WRAPPED) if isinstance(submodules, dict) else None
        return transformer if inner is None else inner

    def check(self, case: Case, plan: LoadPlan) -> None:
        if not self.fp8(case):
            return
        if (requested := attention.AXIS.requested(case)) != "sdpa":
            raise Unsupported(f"attention_precision: fp8 replaces torch's scaled_dot_product_attention, which only "
                              f"attention: sdpa calls; attention: {requested} calls its own kernel")
        if plan.device.type != "cuda":
            raise MachineLacks("attention_precision: fp8 runs FlashAttention-3's FP8 kernels, which need a CUDA GPU")
        self._check_machine(plan.device)

    def _check_machine(self, device: torch.device) -> None:
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        if major != HOPPER:
            raise MachineLacks(f"FlashAttention-3's FP8 kernels run on Hopper (SM 9.x) only; this GPU is "
                               f"SM {major}.{minor}")
        if (missing := _missing_software()) is not None:
            raise MachineLacks(f"attention_precision: fp8: {missing}")
        try:
            self._agreement = agreement_with_sdpa(device)
        except Exception as exc:  # a kernel that does not run here at all
            raise MachineLacks(f"FP8 attention does not run here (an FA3 build without FP8 kernels fails so): "
                               f"{type(exc).__name__}: {exc}") from exc
        if not self._agreement <= TOLERANCE:  # also catches NaN
            raise Unsupported(f"FP8 attention differs from SDPA on random inputs {CHECK_SHAPE}: relative L2 "
                              f"{self._agreement:.3g} > {TOLERANCE:g}")

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        if not self.fp8(case):
            return None
        import torch._inductor.config as inductor_config
        from torchao.prototype.attention import AttentionBackend, apply_low_precision_attention

        pipe.transformer = apply_low_precision_attention(pipe.transformer, backend=AttentionBackend.FP8_FA3)
        fusion = inductor_config.pre_grad_custom_pass
        applied: dict[str, Any] = {"attention_precision": "fp8", "kernel": KERNEL, "method": METHOD,
                                   "pre_grad_pass": None if fusion is None else type(fusion).__name__}
        if self._agreement is not None:
            applied["agreement_with_sdpa"] = {"relative_l2": self._agreement, "shape": list(CHECK_SHAPE),
                                              "tolerance": TOLERANCE}
        return applied


AXIS = AttentionFp8Axis()
