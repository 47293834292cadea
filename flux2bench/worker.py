"""The worker: runs one case in its own process and writes its result record.

Started by the runner as ``python -m flux2bench.worker CASE_JSON RESULT_JSON RUN_DIR [--embed]``.
It reports its current stage to the runner through the file descriptor named by
``FLUX2BENCH_EVENTS_FD`` (one JSON line per event). It makes itself the first process the kernel's
OOM killer picks, so that a host-memory blow-up kills the worker and not the runner.

With ``--embed`` it only computes the case's prompt embeddings with the text encoder and caches
them on disk (the separate step behind ``text_encoder: precomputed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import traceback
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flux2bench import pipeline_setup
from flux2bench.quantization import check_precision_supported, describe_quantization
from flux2bench.results import CaseResult, ImageOutput, write_atomic
from flux2bench.scenario import Case
from flux2bench.sources import Unsupported, load_pipeline
from flux2bench.trackers.latency import LatencyTracker
from flux2bench.trackers.memory import MemorySampler, MemoryTracker

EVENTS_FD_ENV = "FLUX2BENCH_EVENTS_FD"


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


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the runner dies, so no orphan keeps holding the GPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


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


def embedding_cache_path(run_dir: Path, case: Case) -> Path:
    """Where the prompt embeddings of a precomputed-text-encoder case are cached (shared by equal text encoders)."""
    identity = json.dumps([case.model, case.weights, case.source, case.text_encoder_precision, case.prompts])
    return run_dir / "embeddings" / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.safetensors"


def compute_embeddings(case: Case, run_dir: Path, events: Events) -> Path:
    """The separate text-encoding step: load only tokenizer + text encoder, encode every prompt, cache."""
    from safetensors.torch import save_file

    device = pipeline_setup.resolve_device(case)
    check_precision_supported(case.text_encoder_precision, device)
    events.emit("encoding prompts")
    pipe = load_pipeline(case, {"text_encoder": device}, skip=("transformer", "vae"))
    with torch.inference_mode():
        embeds = {f"prompt_{i}": pipe.encode_prompt(prompt=p, device=device)[0].cpu().contiguous()
                  for i, p in enumerate(case.prompts)}
    path = embedding_cache_path(run_dir, case)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    save_file(embeds, str(partial))
    os.replace(partial, path)  # a worker killed mid-write must not leave a cache that later runs trust
    return path


def _load_embeddings(case: Case, run_dir: Path, device: torch.device) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    path = embedding_cache_path(run_dir, case)
    if not path.exists():
        raise FileNotFoundError(f"precomputed prompt embeddings missing at {path}; the runner computes them first")
    tensors = load_file(str(path))
    return [tensors[f"prompt_{i}"].to(device) for i in range(len(case.prompts))]


class CaseRun:
    """One case end to end: load and set up the pipeline, warm up, time the repeats, save the images."""

    def __init__(self, case: Case, run_dir: Path, events: Events):
        self.case = case
        self.run_dir = run_dir
        self.events = events
        self.result = CaseResult(key=case.key, block=case.block, label=case.label, case=case.to_dict(),
                                 status="ok", weights=case.weights,
                                 started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.final_latents: torch.Tensor | None = None

    def run(self) -> CaseResult:
        start = time.perf_counter()
        volunteer_for_oom_killer()
        try:
            device = pipeline_setup.resolve_device(self.case)
        except Unsupported as exc:
            return self._finish("unsupported", str(exc), start)
        timeline = self.run_dir / "timelines" / f"{self.case.key}.csv"
        timeline.parent.mkdir(parents=True, exist_ok=True)
        self.result.timeline = str(timeline.relative_to(self.run_dir))
        trackers: dict[str, MemoryTracker] = {}
        with open(timeline, "w") as tl, MemorySampler(device.index if device.type == "cuda" else None, tl) as sampler:
            try:
                self._measure(device, sampler, trackers)
                status, reason = "ok", None
            except Unsupported as exc:
                status, reason = "unsupported", str(exc)
            except Exception as exc:
                status = "oom" if is_out_of_memory(exc) else "error"
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self.result.error = traceback.format_exc()
        self.result.memory = {phase: t.result for phase, t in trackers.items() if t.result is not None}
        return self._finish(status, reason, start)

    def _finish(self, status: str, reason: str | None, start: float) -> CaseResult:
        self.result.status, self.result.reason = status, reason
        self.result.wall_s = time.perf_counter() - start
        return self.result

    def _measure(self, device: torch.device, sampler: MemorySampler, trackers: dict[str, MemoryTracker]) -> None:
        case = self.case
        pipeline_setup.check_supported(case, device)
        pipeline_setup.check_attention_available(case)
        if device.type == "cuda":
            self.result.setup["gpu"] = torch.cuda.get_device_name(device)
        latency = LatencyTracker(device)
        self.result.latency = latency.latency
        self.result.setup["device"] = str(device)
        self.events.emit("loading")
        with ExitStack() as stack:
            trackers["load"] = stack.enter_context(MemoryTracker(sampler, "load", device))
            elapsed = stack.enter_context(latency.timed())
            if (cap := pipeline_setup.cap_vram(case, device)) is not None:
                self.result.setup["vram_cap"] = cap
            pipe = load_pipeline(case, pipeline_setup.placement(case, device), pipeline_setup.skipped_components(case))
            self.result.setup["offload"] = pipeline_setup.apply_offload(pipe, case, device)
            self.result.setup["attention"] = pipeline_setup.apply_attention(pipe, case)
        latency.latency.load_s = elapsed()
        self.result.setup["quantization"] = {name: describe_quantization(getattr(pipe, name))
                                             for name in pipeline_setup.COMPONENTS if getattr(pipe, name, None) is not None}
        inputs = self._inputs(device)
        with MemoryTracker(sampler, "inference", device) as trackers["inference"], latency.instrument(pipe), \
                torch.inference_mode():
            for i in range(case.warmup):
                self.events.emit(f"warm-up {i + 1}/{case.warmup}")
                with latency.image(record=False):
                    self._generate(pipe, inputs, 0, case.seeds[0], latency)
            for r in range(case.repeats):
                for p, seed in self._jobs():
                    self.events.emit(f"repeat {r + 1}/{case.repeats}")
                    with latency.image():
                        image = self._generate(pipe, inputs, p, seed, latency)
                    if r == case.repeats - 1:
                        self._save_output(image, p, seed)

    def _jobs(self) -> list[tuple[int, int]]:
        return [(p, seed) for p in range(len(self.case.prompts)) for seed in self.case.seeds]

    def _inputs(self, device: torch.device) -> dict[str, Any]:
        embeds = _load_embeddings(self.case, self.run_dir, device) if self.case.text_encoder == "precomputed" else None
        return {"embeds": embeds, "images": reference_images(self.case)}

    def _generate(self, pipe: Any, inputs: dict[str, Any], prompt_index: int, seed: int,
                  latency: LatencyTracker) -> Image.Image:
        case = self.case
        if inputs["embeds"] is not None:
            text = {"prompt_embeds": inputs["embeds"][prompt_index]}
        else:
            text = {"prompt": case.prompts[prompt_index]}

        def on_step_end(pipe_, step, timestep, kwargs):
            latency.step_callback(pipe_, step, timestep, kwargs)
            if step == case.steps - 1:
                self.final_latents = kwargs["latents"].detach().float().cpu().contiguous()
            return {}

        return pipe(
            **text, image=inputs["images"], width=case.width, height=case.height, num_inference_steps=case.steps,
            guidance_scale=case.guidance_scale, generator=torch.Generator(device="cpu").manual_seed(seed),
            callback_on_step_end=on_step_end,
        ).images[0]

    def _save_output(self, image: Image.Image, prompt_index: int, seed: int) -> None:
        from safetensors.torch import save_file

        stem = f"{self.case.key}-p{prompt_index}-s{seed}"
        image_path = self.run_dir / "images" / f"{stem}.png"
        latents_path = self.run_dir / "latents" / f"{stem}.safetensors"
        for path in (image_path, latents_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        image.save(image_path)
        save_file({"latents": self.final_latents}, str(latents_path))
        self.result.outputs.append(ImageOutput(prompt=prompt_index, seed=seed, image=f"images/{stem}.png",
                                               latents=f"latents/{stem}.safetensors"))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    embed_only = "--embed" in args
    case_path, result_path, run_dir = [a for a in args if a != "--embed"]
    die_with_parent()
    fd = os.environ.get(EVENTS_FD_ENV)
    events = Events(int(fd) if fd else None)
    case = Case.from_dict(json.loads(Path(case_path).read_text()))
    if embed_only:
        compute_embeddings(case, Path(run_dir), events)
        return 0
    result = CaseRun(case, Path(run_dir), events).run()
    write_atomic(Path(result_path), result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
