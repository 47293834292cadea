"""One case end to end inside its worker process: load and set up the pipeline, warm up, time the repeats,
save the images. The worker volunteers for the kernel's OOM killer, so a host-memory blow-up kills it and not
the runner."""

from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flux2bench.axes import batch, compile, registry, text_encoder
from flux2bench.axes.base import ArtifactPlaces, LoadPlan, LoadsPipeline
from flux2bench.axes.checkpoint import checkpoints_root
from flux2bench.case import Case
from flux2bench.identity import case_from_dict
from flux2bench.errors import MachineLacks, Unsupported
from flux2bench.models import MODELS, import_model_classes
from flux2bench.overhead import WorkerStart, worker_split
from flux2bench.results import CaseResult, ImageOutput, PhaseMemory, Status
from flux2bench.safe_files import open_fresh, replacing, write_atomic
from flux2bench.store import rank_suffix
from flux2bench.sources import load_pipeline
from flux2bench.trackers.energy import EnergyMeter
from flux2bench.trackers.latency import LatencyTracker
from flux2bench.trackers.memory import MemorySampler, MemoryTracker


class Events:
    """Stage events for the runner's progress display; silent when no channel was given."""

    def __init__(self, fd: int | None):
        self._stream = os.fdopen(fd, "w", buffering=1) if fd is not None else None

    def emit(self, stage: str, **fields: Any) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps({"stage": stage, **fields}) + "\n")


def volunteer_for_oom_killer() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


def resolve_device(case: Case) -> torch.device:
    """The case's device; a rank of a multi-GPU case takes the GPU of its ``LOCAL_RANK``."""
    if case.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if case.device == "cuda":
        raise MachineLacks("the case asks for device: cuda and no CUDA GPU is visible")
    return torch.device("cpu")


def import_libraries(case: Case) -> None:
    """Import the case's diffusers classes (and the transformers modules they import) before the load phase, so that
    the load times loading and the imports are counted as imports. Quantization backends stay in the load."""
    import_model_classes(MODELS[case.model])


def init_cuda(device: torch.device) -> float:
    """Create the device's CUDA context (the first synchronisation does, without allocating) and time it; the load
    that follows no longer holds it. 0 on the CPU."""
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def reference_images(case: Case) -> list[Image.Image] | None:
    """Deterministic reference images: smooth colour fields with noise, one seed per image."""
    if not case.reference_images:
        return None
    width, height = case.reference_image_size
    images = []
    for index in range(case.reference_images):
        rng = np.random.default_rng(1000 + index)
        y, x = np.mgrid[0:height, 0:width] / max(width, height)
        base = np.stack([np.sin(6 * x + index), np.cos(5 * y - index), np.sin(4 * (x + y))], axis=-1)
        pixels = 127.5 * (1 + 0.8 * base) + rng.normal(0, 12, (height, width, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def call_arguments(case: Case, text: dict[str, Any], images: list[Image.Image] | None, seed: int) -> dict[str, Any]:
    """The pipeline's arguments for one call of the case, but its step callback."""
    return dict(**text, image=images, width=case.width, height=case.height, num_inference_steps=case.steps,
                guidance_scale=case.guidance_scale, **batch.AXIS.call_arguments(case, seed))


def _phase_peaks(trackers: dict[str, MemoryTracker]) -> dict[str, PhaseMemory]:
    return {phase: t.result for phase, t in trackers.items() if t.result is not None}


class CaseRun:
    """One case: ``CaseRun(case, run_dir, events).run()`` returns its record, whatever happened."""

    def __init__(self, case: Case, run_dir: Path, events: Events, start: WorkerStart | None = None):
        self.case = case
        self.run_dir = run_dir
        self.events = events
        self.start = start
        self.process_start = start.cold_start if start is not None else None
        self.cuda_init_s: float | None = None
        self.rank = int(os.environ.get("RANK", "0"))  # of a case split over several GPUs
        self.result = CaseResult.for_case(case, Status.OK,
                                          started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.final_latents: torch.Tensor | None = None

    def run(self) -> CaseResult:
        start = time.perf_counter()
        volunteer_for_oom_killer()
        try:
            device = resolve_device(self.case)
        except Unsupported as exc:
            self.result.machine_lacks = isinstance(exc, MachineLacks)
            return self._finish(Status.UNSUPPORTED, str(exc), start)
        timeline = self.run_dir / "timelines" / f"{self.case.key}{rank_suffix(self.rank)}.csv"
        timeline.parent.mkdir(parents=True, exist_ok=True)
        self.result.timeline = str(timeline.relative_to(self.run_dir))
        trackers: dict[str, MemoryTracker] = {}
        gpu_index = device.index if device.type == "cuda" else None
        with os.fdopen(open_fresh(timeline), "w") as tl, MemorySampler(gpu_index, tl) as sampler:
            try:
                self._measure(device, sampler, trackers)
                status, reason = Status.OK, None
            except Unsupported as exc:
                status, reason = Status.UNSUPPORTED, str(exc)
                self.result.machine_lacks = isinstance(exc, MachineLacks)
            except Exception as exc:
                status = Status.OOM if is_out_of_memory(exc) else Status.ERROR
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self.result.error = traceback.format_exc()
        self.result.memory = _phase_peaks(trackers)
        self.result.wall_split = worker_split(self.start, self.cuda_init_s, self.result.latency,
                                              compile.AXIS.compiles(self.case))
        return self._finish(status, reason, start)

    def _finish(self, status: Status, reason: str | None, start: float) -> CaseResult:
        self.result.status, self.result.reason = status, reason
        self.result.wall_s = time.perf_counter() - start
        return self.result

    def _record(self, axis: object, found: dict[str, Any] | None) -> None:
        if found is not None:
            key = registry.setup_key(axis)
            self.result.setup.axes[key] = {**self.result.setup.axes.get(key, {}), **found}

    def _measure(self, device: torch.device, sampler: MemorySampler, trackers: dict[str, MemoryTracker]) -> None:
        case, setup = self.case, self.result.setup
        plan = registry.plan_load(case, LoadPlan(device=device, home=device))
        registry.check(case, plan)
        if device.type == "cuda":
            setup.gpu = torch.cuda.get_device_name(device)
        self.cuda_init_s = init_cuda(device)
        latency = LatencyTracker(device, self.process_start, EnergyMeter(device.index if device.type == "cuda" else None))
        self.result.latency, self.result.energy = latency.latency, latency.energy
        setup.device = str(device)
        pipe = self._load(plan, sampler, trackers, latency)
        watched = [(axis, observation) for axis in registry.having(LoadsPipeline)
                   if (observation := axis.observe(pipe, case, plan)) is not None]
        self._infer(pipe, plan, sampler, trackers, latency)
        for axis, observation in watched:
            self._record(axis, observation.found())
        if case.profile:  # extra calls, after every timed number and recorded peak
            from flux2bench.profiling.take import take_profile

            self.result.memory = _phase_peaks(trackers)  # the profile sets its parts against the load's peaks

            self.result.profile = take_profile(pipe, lambda: self._call_arguments(plan.device), self.result,
                                               plan.device, sampler, self.run_dir, self.rank)

    def _load(self, plan: LoadPlan, sampler: MemorySampler, trackers: dict[str, MemoryTracker],
              latency: LatencyTracker) -> Any:
        """Load the pipeline and apply every axis to it: the load phase, timed and tracked."""
        self.events.emit("loading")
        with ExitStack() as stack:
            trackers["load"] = stack.enter_context(MemoryTracker(sampler, "load", plan.device))
            elapsed = stack.enter_context(latency.timed())
            for axis in registry.having(LoadsPipeline):
                self._record(axis, axis.before_load(self.case, plan))
            pipe = load_pipeline(self.case, plan)
            for axis in registry.having(LoadsPipeline):
                self._record(axis, axis.apply(pipe, self.case, plan))
        latency.latency.load_s = elapsed()
        return pipe

    def _infer(self, pipe: Any, plan: LoadPlan, sampler: MemorySampler, trackers: dict[str, MemoryTracker],
               latency: LatencyTracker) -> None:
        """The warm-up calls, then the timed images: the inference phase."""
        case, device = self.case, plan.device
        texts = text_encoder.AXIS.prompt_inputs(case, self.run_dir, device)
        images = reference_images(case)
        with MemoryTracker(sampler, "inference", device) as trackers["inference"], latency.instrument(pipe), \
                torch.inference_mode():
            for i in range(case.warmup):
                self.events.emit(f"warm-up {i + 1}/{case.warmup}")
                with latency.image(record=False):
                    self._generate(pipe, texts[0], images, case.seeds[0], latency)
            for r in range(case.repeats):
                for p, seed in self._jobs():
                    self.events.emit(f"repeat {r + 1}/{case.repeats}")
                    with latency.image():
                        made = self._generate(pipe, texts[p], images, seed, latency)
                    if r == case.repeats - 1 and self.rank == 0:  # every rank computes the same images
                        for index, (image, image_seed) in enumerate(zip(made, batch.AXIS.image_seeds(case, seed))):
                            self._save_output(image, self.final_latents[index:index + 1], p, image_seed)

    def _jobs(self) -> list[tuple[int, int]]:
        return [(p, seed) for p in range(len(self.case.prompts)) for seed in self.case.seeds]

    def _generate(self, pipe: Any, text: dict[str, Any], images: list[Image.Image] | None, seed: int,
                  latency: LatencyTracker) -> list[Image.Image]:
        """One pipeline call: its images, one per seed of ``batch.AXIS.image_seeds``."""
        case = self.case

        def on_step_end(pipe_, step, timestep, kwargs):
            latency.step_callback(pipe_, step, timestep, kwargs)
            if step == case.steps - 1:
                self.final_latents = kwargs["latents"].detach().float().cpu().contiguous()
            return {}

        return pipe(**call_arguments(case, text, images, seed), callback_on_step_end=on_step_end).images

    def _call_arguments(self, device: torch.device) -> dict[str, Any]:
        """The arguments of the first timed call (its first prompt and seed)."""
        texts = text_encoder.AXIS.prompt_inputs(self.case, self.run_dir, device)
        return call_arguments(self.case, texts[0], reference_images(self.case), self.case.seeds[0])

    def _save_output(self, image: Image.Image, latents: torch.Tensor, prompt_index: int, seed: int) -> None:
        from safetensors.torch import save

        stem = f"{self.case.key}-p{prompt_index}-s{seed}"
        image_path = self.run_dir / "images" / f"{stem}.png"
        latents_path = self.run_dir / "latents" / f"{stem}.safetensors"
        for path in (image_path, latents_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(image_path) as png:
            image.save(png, format="PNG")
        write_atomic(latents_path, save({"latents": latents.contiguous()}))
        self.result.outputs.append(ImageOutput(prompt=prompt_index, seed=seed, image=f"images/{stem}.png",
                                               latents=f"latents/{stem}.safetensors"))


def prepare_artifact(axis_name: str, case: Case, run_dir: Path, events: Events) -> None:
    """Make the file one axis needs before the case runs (e.g. the precomputed prompt embeddings)."""
    events.emit(f"preparing {axis_name}")
    places = ArtifactPlaces(run_dir, checkpoints_root())
    registry.artifact_maker(axis_name).make_artifact(case, places, resolve_device(case), load_pipeline, events.emit)


def run_worker(case_path: Path, result_path: Path, run_dir: Path, events_fd: int | None, prepare: str | None,
               start: WorkerStart | None = None) -> int:
    events = Events(events_fd)
    case = case_from_dict(json.loads(case_path.read_text()))
    if prepare is not None:
        try:
            prepare_artifact(prepare, case, run_dir, events)
        except Unsupported as exc:  # the case cannot run here: its record says so, as the case's own worker would
            write_atomic(result_path, CaseResult.unsupported(case, exc).to_json())
        return 0
    if start is not None:
        try:
            import_libraries(case)
        except Exception:  # noqa: BLE001 - the load imports them again, and its record says what failed
            pass
        start = replace(start, imported=time.perf_counter())
    result = CaseRun(case, run_dir, events, start).run()
    write_atomic(result_path, result.to_json())
    return 0
