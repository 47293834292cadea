"""Attention backend of the transformer, through diffusers' attention dispatcher.

``sdpa`` is diffusers' ``native`` backend (``torch.nn.functional.scaled_dot_product_attention``); ``fa3`` is
FlashAttention-3: ``_flash_3`` where ``flash_attn_interface`` imports, else ``_flash_3_hub`` (a kernel fetched
from the Hugging Face hub by the ``kernels`` package). ``fa4`` is FlashAttention-4 from its PyPI package
(``flash-attn-4``: CuTe DSL kernels compiled at run time, no build step), registered as the kernel of torch's flash
SDPA (``torch.nn.attention.activate_flash_attention_impl("FA4")``, process-wide: the worker runs one case) and called
through diffusers' ``_native_flash`` backend, which allows SDPA no other kernel. Any other diffusers backend name
passes through as is.
"""

from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING, Annotated, Any, Callable

from pydantic import AfterValidator, Field

from flux2bench.axes.base import Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.errors import MachineLacks, Unsupported

if TYPE_CHECKING:
    import torch

    from flux2bench.case import Case

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
    if requested == "fa4":
        return "_native_flash"
    return requested


FA4_MODULE = "flash_attn.cute.interface"  # what torch's FA4 registration imports
FA4_CAPABILITIES = (9, 10)  # Hopper and Blackwell datacenter GPUs, as torch's FA4 registration requires


def fa4_missing(device: torch.device) -> str | None:
    """Why FlashAttention-4 cannot run on ``device`` here, or None."""
    import torch
    import torch.nn.attention as torch_attention

    if device.type != "cuda":
        return "FlashAttention-4 needs a CUDA GPU"
    try:
        found = importlib.util.find_spec(FA4_MODULE) is not None
    except ImportError as exc:  # flash_attn.cute imports its interface, and with it the CuTe DSL
        if _installed("flash_attn"):
            return (f"flash-attn-4 is installed, but {FA4_MODULE} does not import ({type(exc).__name__}: {exc}); "
                    f"nvidia-cutlass-dsl puts its 'cutlass' package on sys.path from a .pth file, which Python reads "
                    f"in a site directory, not in a PYTHONPATH folder")
        found = False
    if not found:
        return f"the flash-attn-4 package is not installed ({FA4_MODULE} does not import): pip install flash-attn-4"
    listed: list[str] = getattr(torch_attention, "list_flash_attention_impls", lambda: [])()
    if "FA4" not in listed:
        return f"torch {torch.__version__} cannot register FA4 as its flash SDPA kernel (impls: {listed or 'none'})"
    if (major := torch.cuda.get_device_capability(device)[0]) not in FA4_CAPABILITIES:
        return f"FlashAttention-4 runs on SM 9.x and 10.x; this GPU is SM {major}.x"
    return None


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:
        return False


def fa4_versions() -> str:
    """The installed flash-attn-4 and torch, for a refusal: torch's FA4 registration calls the package's private
    ``_flash_attn_fwd`` and unpacks what it returns, which has changed between the package's betas."""
    import importlib.metadata

    import torch

    try:
        package = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        package = "unknown"
    return f"flash-attn-4 {package}, torch {torch.__version__}"


def activate_fa4() -> None:
    import torch.nn.attention as torch_attention

    torch_attention.activate_flash_attention_impl("FA4")


# A kernel's output against SDPA's on the same random bf16 inputs: bf16 rounding gives about 3e-3; a broken build
# (wrong head dim, miscompiled kernel) gives O(1).
TOLERANCE = 2e-2
CHECK_SHAPE = (1, 4608, 4, 128)  # batch, FLUX.2's 1024x1024 sequence (4096 image + 512 text tokens), heads, head dim


def agreement_with_sdpa(backend: str, device: torch.device, switch: Callable[[], None] = lambda: None) -> float:
    """The relative L2 difference between ``backend``'s attention and SDPA's on random inputs; ``switch`` runs
    between the two (activating a kernel that would also serve SDPA's reference)."""
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(CHECK_SHAPE, generator=generator, device=device, dtype=torch.bfloat16) for _ in range(3))
    ref = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE).float()
    switch()
    out = dispatch_attention_fn(q, k, v, backend=AttentionBackendName(backend)).float()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _unavailable(requested: str, backend: str, why: object) -> Unsupported:
    return MachineLacks(f"attention {requested!r} (diffusers backend {backend!r}) is not available: {why}")


class AttentionSettings(Settings):
    attention: BackendName = Field("sdpa", description="sdpa, fa3, fa4, or any diffusers attention backend name")


class AttentionAxis(Axis[AttentionSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "attention"
    settings_model = AttentionSettings
    drift_baseline_values = {"attention": "sdpa"}

    def __init__(self) -> None:
        super().__init__()
        self._agreement: float | None = None

    def requested(self, case: Case) -> str:
        """The attention backend as the scenario names it (``sdpa``, ``fa3`` or a diffusers backend name)."""
        return self.of(case).attention

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        return [self.requested(case)], []

    def check(self, case: Case, plan: LoadPlan) -> None:
        """Fail fast, before a 100 GB load, when diffusers cannot run the requested backend here."""
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        requested = self.requested(case)
        backend = backend_name(requested)
        if requested == "fa4" and (missing := fa4_missing(plan.device)) is not None:
            raise MachineLacks(f"attention 'fa4': {missing}")
        known = [name.value for name in AttentionBackendName]
        if backend not in known:  # a name no machine has: the scenario's, not this machine's, to change
            raise Unsupported(f"attention {requested!r} is not an attention backend: use sdpa, fa3, fa4 or one of "
                              f"diffusers' {', '.join(sorted(known))}")
        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except Exception as exc:  # unknown name (ValueError) or missing package (RuntimeError)
            raise _unavailable(requested, backend, exc) from exc
        self._agreement = None
        if backend != "native" and plan.device.type == "cuda":
            self._verify(requested, backend, plan.device)

    def _verify(self, requested: str, backend: str, device: torch.device) -> None:
        """A kernel that disagrees with SDPA would pass for drift: it is refused before it is used."""
        try:
            self._agreement = agreement_with_sdpa(backend, device, activate_fa4 if requested == "fa4" else lambda: None)
        except Exception as exc:  # a kernel that does not run here at all
            why = f"{type(exc).__name__}: {exc} ({fa4_versions()})" if requested == "fa4" else exc
            raise _unavailable(requested, backend, why) from exc
        if not self._agreement <= TOLERANCE:  # also catches NaN
            raise Unsupported(f"attention {requested!r} (diffusers backend {backend!r}) differs from SDPA on random "
                              f"inputs {CHECK_SHAPE}: relative L2 {self._agreement:.3g} > {TOLERANCE:g}")

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any]:
        requested = self.requested(case)
        backend = backend_name(requested)
        try:
            pipe.transformer.set_attention_backend(backend)
        except Exception as exc:  # e.g. a hub kernel that cannot be downloaded
            raise _unavailable(requested, backend, exc) from exc
        applied: dict[str, Any] = {"requested": requested, "backend": backend, "method": "transformer.set_attention_backend"}
        if requested == "fa4":
            import torch.nn.attention as torch_attention

            applied["flash_impl"] = torch_attention.current_flash_attention_impl()
        if self._agreement is not None:
            applied["agreement_with_sdpa"] = {"relative_l2": self._agreement, "shape": list(CHECK_SHAPE),
                                              "tolerance": TOLERANCE}
        return applied


AXIS = AttentionAxis()
