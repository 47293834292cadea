"""Stage latency of pipeline calls, synchronised with the GPU.

``LatencyTracker.instrument(pipe)`` wraps the pipeline's stages in place for the duration of a
``with`` block:
- ``text_encoding``: ``pipe.encode_prompt`` (near zero with precomputed embeddings);
- ``reference_encoding``: ``pipe.prepare_image_latents`` (VAE encoding of the reference images);
- each denoising step: from the transformer's forward pre-hook (before any offload hook moves
  weights in) to ``callback_on_step_end`` (after the scheduler step);
- ``denoise``: first step start to last step end; ``vae_decode``: ``pipe.vae.decode``;
- ``image``: the whole ``pipe(...)`` call.
The device is synchronised before every clock read, so each figure is device time, not launch time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from flux2bench.axes.compile import compiled_graphs
from flux2bench.results import IMAGE, STAGES as TIMED_STAGES, Energy, Latency
from flux2bench.trackers.energy import EnergyMeter

STAGES = (*TIMED_STAGES, IMAGE)
METHOD = "time.perf_counter around each stage, torch.cuda.synchronize before every read on CUDA"


class LatencyTracker:
    """``process_start`` is the worker's ``time.perf_counter()`` at its start; ``energy`` reads the GPU's counter."""

    def __init__(self, device: torch.device, process_start: float | None = None, energy: EnergyMeter | None = None):
        self.device = device
        self.process_start = process_start
        self.meter = energy
        self.latency = Latency(method=METHOD)
        self.energy: Energy | None = energy.record() if energy is not None else None
        self._current: dict[str, float] | None = None
        self._steps: list[float] = []
        self._step_start: float | None = None
        self._denoise_start: float | None = None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def timed(self) -> Iterator[Callable[[], float]]:
        """Time a block; the yielded function returns the elapsed seconds once the block has ended."""
        start = self.now()
        elapsed: list[float] = []
        yield lambda: elapsed[0]
        elapsed.append(self.now() - start)

    @contextmanager
    def image(self, record: bool = True) -> Iterator[None]:
        """One pipeline call; with ``record`` False (warm-up) only its total time is kept."""
        self._current, self._steps, self._denoise_start, self._step_start = defaultdict(float), [], None, None
        graphs = compiled_graphs()
        with self.timed() as total:
            joules = self._joules()  # after the synchronize that starts the clock
            yield
        stages, steps = self._current, self._steps
        self._current = None
        self._first_call(total())
        if not record:
            self.latency.warmup_s.append(total())
            return
        stages["image"] = total()
        for stage in STAGES:
            self.latency.stages.setdefault(stage, []).append(stages.get(stage, 0.0))
        self.latency.steps.append(steps)
        self.latency.compiled_graphs.append(compiled_graphs() - graphs)
        if joules is not None:
            self.energy.per_image_j.append(self._joules() - joules)

    def _joules(self) -> float | None:
        return self.meter.joules() if self.meter is not None else None

    def _first_call(self, seconds: float) -> None:
        if self.latency.first_call_s is None:
            self.latency.first_call_s = seconds
            if self.process_start is not None:
                self.latency.time_to_first_image_s = time.perf_counter() - self.process_start

    def step_callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` for the pipeline call: closes the current step."""
        end = self.now()
        if self._step_start is not None:
            self._steps.append(end - self._step_start)
            self._current["denoise"] = end - self._denoise_start
        self._step_start = None
        return {}

    def _on_transformer_call(self, module: Any, args: Any, kwargs: Any = None) -> None:
        if self._current is None or self._step_start is not None:
            return  # a second transformer call inside one step (e.g. true CFG) belongs to that step
        self._step_start = self.now()
        if self._denoise_start is None:
            self._denoise_start = self._step_start

    def _wrap(self, stage: str, fn: Callable) -> Callable:
        def timed_stage(*args, **kwargs):
            if self._current is None:
                return fn(*args, **kwargs)
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._current[stage] += self.now() - start
        return timed_stage

    @contextmanager
    def instrument(self, pipe: Any) -> Iterator[LatencyTracker]:
        patched = [(pipe, "encode_prompt", "text_encoding"), (pipe, "prepare_image_latents", "reference_encoding"),
                   (pipe.vae, "decode", "vae_decode")]
        overridden = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patched]
        for owner, name, stage in patched:
            setattr(owner, name, self._wrap(stage, getattr(owner, name)))
        hook = pipe.transformer.register_forward_pre_hook(self._on_transformer_call, with_kwargs=True)
        try:
            yield self
        finally:
            hook.remove()
            for owner, name, original in overridden:
                if original is None:
                    delattr(owner, name)  # the class method shows through again
                else:
                    setattr(owner, name, original)  # e.g. a torch.compile'd method set on the instance
