"""A test stand-in for ``flux2bench.worker``: the real worker, with faults injected by prompt text.

The runner starts it as ``python -m fault_worker CASE_JSON RESULT_JSON RUN_DIR [--prepare AXIS]`` (tests/ must be
on PYTHONPATH) through ``Runner(store, worker_module="fault_worker")``. Everything but the pipeline is the
real worker: its stage events, trackers, exception handling and result record, and the runner's
classification of how the process ended.

A case whose prompt is ``FAULT:<name>`` gets a cheap fake pipeline (built in milliseconds, no model load)
whose first denoising step does:

- ``none``: nothing, the case finishes ``ok``;
- ``oom``: touches 256 MiB of host memory, then raises ``torch.OutOfMemoryError``;
- ``cublas``: raises a RuntimeError with cuBLAS's allocation-failure text (also an out-of-memory);
- ``error``: raises an ordinary RuntimeError;
- ``crash``: prints ``CRASH_MARKER`` and dies with ``os.abort()`` (SIGABRT, no result written);
- ``hang``: starts a child process (its pid goes to ``RUN_DIR/hang-child.pid``) and sleeps forever;
- ``pause``: waits until the file named by ``$FAULT_RELEASE_FILE`` exists, then finishes ``ok``;
- ``sigkill``: touches 256 MiB, holds it for 2.5 s (past the timeline's once-a-second flush), then
  SIGKILLs itself as the kernel's OOM killer would.

Every pipeline load, faulty or real, is logged to ``RUN_DIR/loads/<case key>[-<axis>][.rank<r>].json`` as a
list of ``{"skip": [...], "components": {name: class name or null}, "cuda_visible_devices": ..., "omp_num_threads":
..., "rank": ..., "world_size": ..., "pid": ...}``, so tests can see what was loaded, and where.

A ``FAULT:`` case with ``parallel`` runs the fake pipeline in every rank the runner starts (the real context
parallelism needs CUDA GPUs), so that the launch of the ranks and the merge of their records can be tested on a CPU;
rank r's fake peaks are raised by r x 64 MiB so that the merge's choice shows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from flux2bench import case_run, sources, worker
from flux2bench.axes import parallel

FAULT_PREFIX = "FAULT:"
CRASH_MARKER = "fault_worker: injecting a crash with os.abort()"
HANG_CHILD_PID_FILE = "hang-child.pid"
BALLAST_BYTES = 256 * 2**20
COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")

_state = SimpleNamespace(run_dir=Path("."), prepare=None)


def fault_of(case: Any) -> str | None:
    for prompt in case.prompts:
        if prompt.startswith(FAULT_PREFIX):
            return prompt[len(FAULT_PREFIX):]
    return None


def _ballast() -> torch.Tensor:
    return torch.ones(BALLAST_BYTES // 4, dtype=torch.float32)  # ones() writes every page: resident, not just reserved


def inject(fault: str) -> None:
    if fault == "none":
        return
    if fault == "oom":
        ballast = _ballast()
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB (injected; {ballast.numel()})")
    if fault == "cublas":
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    if fault == "error":
        raise RuntimeError("injected failure in the denoising loop")
    if fault == "crash":
        print(CRASH_MARKER, flush=True)
        os.abort()
    if fault == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (_state.run_dir / HANG_CHILD_PID_FILE).write_text(str(child.pid))
        while True:
            time.sleep(60)
    if fault == "pause":
        while not Path(os.environ["FAULT_RELEASE_FILE"]).exists():
            time.sleep(0.2)
        return
    if fault == "sigkill":
        ballast = _ballast()
        time.sleep(2.5)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # not reached; keeps the ballast alive until the kill lands
        del ballast
    raise ValueError(f"fault_worker: unknown fault {fault!r}")


class FakeTransformer(torch.nn.Module):
    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault
        self.calls = 0
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.calls == 0:
            inject(self.fault)
        self.calls += 1
        return self.proj(latents)

    def set_attention_backend(self, backend: str) -> None:
        if backend != "native":
            raise ValueError(f"{backend!r} is not a known attention backend")


class FakeVae(torch.nn.Module):
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class FakePipeline:
    """Just enough of Flux2Pipeline for the worker: ``to``, the instrumented stages and ``__call__``."""

    def __init__(self, fault: str, skip: tuple[str, ...]):
        self.transformer = None if "transformer" in skip else FakeTransformer(fault)
        self.vae = None if "vae" in skip else FakeVae()
        self.text_encoder = None if "text_encoder" in skip else torch.nn.Identity()
        self.tokenizer = self.scheduler = None

    def to(self, device: torch.device) -> FakePipeline:
        return self

    def encode_prompt(self, prompt: Any = None, device: Any = None, prompt_embeds: Any = None) -> tuple:
        return (torch.zeros(1, 8, 4) if prompt_embeds is None else prompt_embeds), torch.zeros(1, 8, 4)

    def prepare_image_latents(self, images: Any) -> None:
        return None

    def __call__(self, prompt: Any = None, prompt_embeds: Any = None, image: Any = None, width: int = 64,
                 height: int = 64, num_inference_steps: int = 1, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, generator: list[torch.Generator] | torch.Generator | None = None,
                 callback_on_step_end: Any = None) -> SimpleNamespace:
        self.encode_prompt(prompt, prompt_embeds=prompt_embeds)
        if image is not None:
            self.prepare_image_latents(image)
        generators = generator if isinstance(generator, list) else [generator] * num_images_per_prompt
        latents = torch.cat([torch.randn(1, 16, 4, generator=g) for g in generators])
        for step in range(num_inference_steps):
            latents = self.transformer(latents)
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, torch.tensor(1000.0 * (1 - step / num_inference_steps)),
                                     {"latents": latents})
        self.vae.decode(latents)
        return SimpleNamespace(images=[Image.new("RGB", (width, height), (128, 64, 32)) for _ in generators])


def _log_load(case: Any, skip: tuple[str, ...], pipe: Any) -> None:
    rank = os.environ.get("RANK", "0")
    suffix = (f"-{_state.prepare}" if _state.prepare else "") + (f".rank{rank}" if rank != "0" else "")
    path = _state.run_dir / "loads" / f"{case.key}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    loads = json.loads(path.read_text()) if path.exists() else []
    components = {}
    for name in COMPONENTS:
        component = getattr(pipe, name, None)
        components[name] = None if component is None else type(component).__name__
    loads.append({"skip": list(skip), "components": components,
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rank": os.environ.get("RANK"),
                  "world_size": os.environ.get("WORLD_SIZE"), "master_port": os.environ.get("MASTER_PORT"),
                  "pid": os.getpid()})
    path.write_text(json.dumps(loads))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _state.prepare = args[args.index("--prepare") + 1] if "--prepare" in args else None
    _state.run_dir = Path(args[2])
    real_load_pipeline = sources.load_pipeline

    def load_pipeline(case: Any, plan: Any) -> Any:
        fault = fault_of(case)
        skip = tuple(sorted(plan.skip))
        pipe = real_load_pipeline(case, plan) if fault is None else FakePipeline(fault, skip)
        _log_load(case, skip, pipe)
        return pipe

    # The worker and the artifact steps call these module-level names, so the patch reaches both.
    case_run.load_pipeline = load_pipeline
    _fake_parallelism()
    return worker.main(args)


def _fake_parallelism() -> None:
    """Let a FAULT case with ``parallel`` run its fake pipeline in every rank (no process group, no CUDA)."""
    real_check = parallel.AXIS.check

    def check(case: Any, plan: Any) -> None:
        if fault_of(case) is None:
            real_check(case, plan)

    parallel.AXIS.check = check
    parallel.AXIS.before_load = lambda case, plan: {"rank": int(os.environ.get("RANK", "0"))}
    parallel.AXIS.apply = lambda pipe, case, plan: None
    ballast = torch.ones(int(os.environ.get("RANK", "0")) * 16 * 2**20)  # 64 MiB per rank above rank 0
    _state.ballast = ballast


if __name__ == "__main__":
    sys.exit(main())
