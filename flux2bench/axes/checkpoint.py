"""``weights: checkpoint``: synthetic weights as a user meets real ones, in a diffusers pipeline folder on disk
(model_index.json, each component's config and sharded safetensors, scheduler, tokenizer), loaded by the same
``from_pretrained`` path as ``weights: pretrained``. Its weights are file-backed pages the kernel can evict and
read again, not the anonymous memory of in-process synthetic weights.

The folder is written once per model, precisions and weight recipe, in ``$FLUX2BENCH_CHECKPOINTS`` (default
``~/.cache/flux2bench/checkpoints``), by a worker of its own, one component at a time: into ``<name>.partial``
(a component is done once its ``.complete`` marker exists, so a killed write resumes), renamed into place when
whole, so a half-written checkpoint is never used. Components whose backend can be saved pre-quantized (NF4, as
``diffusers/FLUX.2-dev-bnb-4bit`` is) are saved so; the others (torchao) are saved in bf16 and quantized at load.
``page_cache: cold`` evicts the checkpoint's files from the kernel's page cache before loading, so the load
reads them from disk; a case under ``max_ram_gib`` always starts so, since a cgroup counts only the pages its own
worker reads in (pages another process left cached would be used free of charge, and the cap would test nothing).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

from pydantic import Field

from flux2bench.axes import precision as precision_axis
from flux2bench.axes import ram_cap
from flux2bench.axes.base import (UNKEYED_AT_DEFAULT, ArtifactPlaces, Axis, LoadPlan, LoadsPipeline, MakesArtifact,
                                  Settings)
from flux2bench.axes.quantization_backends import UNQUANTIZED, PreQuantized, backend
from flux2bench.errors import MachineLacks
from flux2bench.models import COMPONENTS
from flux2bench.safe_files import write_atomic
from flux2bench.units import GIB

if TYPE_CHECKING:
    import torch

    from flux2bench.case import Case

Loader = Callable[["Case", LoadPlan], Any]

CACHE_ENV = "FLUX2BENCH_CHECKPOINTS"
RECIPE = 1  # bump when the random weights of flux2bench.sources.random_weights change
MAX_SHARD = "5GB"
BF16_BYTES = 2  # per weight of a component saved unquantized
DISK_MARGIN = 1.05  # the safetensors headers, configs and tokenizer on top of the parameter bytes


def checkpoints_root() -> Path:
    """The folder of on-disk checkpoints a process was given (a worker's, by its supervisor), else the default."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flux2bench" / "checkpoints")


def saved_precisions(case: Case) -> dict[str, str]:
    """The precision each component is stored in: pre-quantized where its backend can be saved so (NF4),
    everything else bf16 (quantized at load)."""
    held = precision_axis.AXIS.held(case)
    return {"vae": UNQUANTIZED} | {name: p if _saved(p) else UNQUANTIZED for name, p in held.items()}


def _saved(precision: str) -> PreQuantized | None:
    """How ``precision`` is saved pre-quantized, or None where it is saved in bf16."""
    entry = backend(precision)
    return None if entry is None else entry.saved


def checkpoint_path(case: Case, folder: Path) -> Path:
    precisions = saved_precisions(case)
    return folder / (f"{case.model}-transformer_{precisions['transformer']}"
                                 f"-text_encoder_{precisions['text_encoder']}-recipe{RECIPE}")


def _build(case: Case, load_pipeline: Loader, keep: tuple[str, ...], device: torch.device,
           precision: str = UNQUANTIZED) -> Any:
    """The case's synthetic pipeline holding only the components ``keep`` (the scheduler and tokenizer always);
    each component gets the seed ``weights: synthetic`` gives it, so the checkpoint holds the same weights."""
    plan = LoadPlan(device=device, home=device, skip=set(COMPONENTS) - set(keep))
    plan.precisions |= {name: precision for name in keep}
    return load_pipeline(replace(case, weights="synthetic"), plan)


def _parameter_bytes(case: Case, name: str, load_pipeline: Loader) -> int:
    """What a component takes on disk, from its parameters built on the meta device (no memory, no time)."""
    import torch

    module = getattr(_build(case, load_pipeline, (name,), torch.device("meta")), name)
    saved = _saved(saved_precisions(case)[name])
    return int(sum(p.numel() for p in module.parameters()) * (BF16_BYTES if saved is None else saved.bytes_per_weight))


class CheckpointSettings(Settings):
    page_cache: Annotated[Literal["warm", "cold"], UNKEYED_AT_DEFAULT] = Field(
        "warm", description="weights: checkpoint: drop the page cache before loading (cold)")


class CheckpointAxis(Axis[CheckpointSettings], LoadsPipeline, MakesArtifact):
    name = "checkpoint"
    settings_model = CheckpointSettings

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        cold = case.weights == "checkpoint" and self.of(case).page_cache == "cold"
        return [], (["cold"] if cold else [])

    def artifact(self, case: Case, places: ArtifactPlaces) -> Path | None:
        return checkpoint_path(case, places.checkpoints) if case.weights == "checkpoint" else None

    def before_load(self, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        if case.weights != "checkpoint":
            return None
        folder = checkpoint_path(case, checkpoints_root())
        page_cache = self.of(case).page_cache
        applied: dict[str, Any] = {"path": str(folder), "saved_precisions": saved_precisions(case),
                                   "page_cache": page_cache}
        if page_cache == "cold" or ram_cap.AXIS.capped(case):
            applied["page_cache_evicted"] = evict_from_page_cache(folder)
        return applied

    def make_artifact(self, case: Case, places: ArtifactPlaces, device: torch.device,
                      load_pipeline: Loader, progress: Callable[[str], None]) -> Path:
        """Write the checkpoint folder, resuming a partial one, and rename it into place when whole."""
        final = checkpoint_path(case, places.checkpoints)
        partial = final.with_name(final.name + ".partial")
        final.parent.mkdir(parents=True, exist_ok=True)
        todo = [name for name in COMPONENTS if not (partial / name / ".complete").exists()]
        _check_disk(final.parent, sum(_parameter_bytes(case, name, load_pipeline) for name in todo))
        partial.mkdir(exist_ok=True)
        for number, name in enumerate(todo, 1):
            progress(f"writing {name} ({number}/{len(todo)}) to {partial}")
            _save_component(case, name, partial / name, load_pipeline)
        _save_pipeline_files(case, partial, load_pipeline)
        os.replace(partial, final)
        return final


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed * DISK_MARGIN > free:
        raise MachineLacks(f"weights: checkpoint needs {needed * DISK_MARGIN / GIB:.1f} GiB more in {folder}, whose "
                          f"disk has {free / GIB:.1f} GiB free (set {CACHE_ENV} to another disk)")


def _save_component(case: Case, name: str, folder: Path, load_pipeline: Loader) -> None:
    import torch

    shutil.rmtree(folder, ignore_errors=True)  # a component whose write was cut starts again
    stored = saved_precisions(case)[name]
    saved = _saved(stored)
    device = torch.device("cpu" if saved is None else saved.quantize_on)
    module = getattr(_build(case, load_pipeline, (name,), device, stored), name)
    module.save_pretrained(folder, max_shard_size=MAX_SHARD)
    write_atomic(folder / ".complete", "")


def _save_pipeline_files(case: Case, folder: Path, load_pipeline: Loader) -> None:
    """model_index.json, the scheduler and the tokenizer, as the pipeline's ``save_pretrained`` writes them, with
    the classes of the model components (written one at a time) filled in."""
    import torch

    _build(case, load_pipeline, (), torch.device("cpu")).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for name in COMPONENTS:
        config = json.loads((folder / name / "config.json").read_text())
        diffusers_class = config.get("_class_name")
        index[name] = ["diffusers", diffusers_class] if diffusers_class else ["transformers", config["architectures"][0]]
    write_atomic(folder / "model_index.json", json.dumps(index, indent=2, sort_keys=True))


def evict_from_page_cache(folder: Path) -> str:
    """Evict ``folder``'s files from the page cache: ``posix_fadvise(POSIX_FADV_DONTNEED)`` drops the clean pages
    of a file that no process maps (hence the fsync first), without root and without touching the rest of the
    host's cache."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    size = sum(path.stat().st_size for path in files) / GIB
    return f"fsync and posix_fadvise(POSIX_FADV_DONTNEED) on {len(files)} files ({size:.1f} GiB)"


AXIS = CheckpointAxis()
