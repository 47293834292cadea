"""The one builder of test records: hand-made CaseResult records, their memory phases and environment, images,
and run directories written as the runner writes them (``runs`` adds noisy timings for the gate's tests)."""

from __future__ import annotations

import copy
import gzip
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from flux2bench.results import CaseResult, Drift, ImageOutput, Latency, Metric, PhaseMemory, Status
from flux2bench.store import RunStore
from flux2bench.case import Case
from flux2bench.identity import case_from_dict

BASE_CASE: dict[str, Any] = dict(
    block="main", model="tiny", weights="synthetic", source=None, precision="bf16", text_encoder_precision="bf16",
    text_encoder="local", offload="none", use_stream=True, record_stream=False, low_cpu_mem_usage=False,
    num_blocks_per_group=1, attention="sdpa", reference_images=0, reference_image_size=(64, 64), width=64,
    height=64, steps=4, guidance_scale=4.0, seeds=(0, 1), prompts=("a red fox", "a blue bird"), repeats=1,
    warmup=0, max_vram_gib=None, device="auto", timeout_s=60.0,
)
ENVIRONMENT: dict[str, Any] = {
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "gpu_memory_gib": 79.2,
    "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "compute_capability": "9.0"}],
    "driver": "550.54.15",
    "cuda": "12.4",
    "python": "3.11.7",
    "platform": "Linux-5.15.0-x86_64-with-glibc2.35",
    "cpu": "AMD EPYC 9654 96-Core Processor",
    "cpu_count": 16,
    "host_ram_gib": 125.8,
    "versions": {"torch": "2.7.1", "diffusers": "0.42.0", "transformers": "5.0.0", "accelerate": "1.8.1",
                 "bitsandbytes": "0.46.0", "torchao": "0.12.0", "flux2bench": "0.1.0"},
    "git_commit": "0123456789abcdef0123456789abcdef01234567",
    "unavailable": {},
}
MEMORY_FIELDS = tuple(f.name for f in fields(PhaseMemory))
NOT_MEASURED = "not measured in this test"


def environment(**changes: Any) -> dict[str, Any]:
    """ENVIRONMENT with top-level fields changed; ``versions={...}`` updates library versions."""
    env = copy.deepcopy(ENVIRONMENT)
    env["versions"].update(changes.pop("versions", {}))
    env.update(changes)
    return env


def case(**changes: Any) -> Case:
    """A case from the flat fields a record stores, with its real key."""
    return case_from_dict({**BASE_CASE, **changes})


def phase(**values: float | None) -> PhaseMemory:
    """Peak memory of one phase in GiB, by field name with or without its ``_peak_gib`` suffix (``gpu_device=20.0``
    or ``gpu_device_peak_gib=20.0``); fields not given (or None) are unmeasured, with a reason."""
    by_field = {name if name in MEMORY_FIELDS else f"{name}_peak_gib": value for name, value in values.items()}
    unknown = set(by_field) - set(MEMORY_FIELDS)
    assert not unknown, f"unknown memory fields {unknown}"

    def metric(name: str) -> Metric:
        value = by_field.get(name)
        return Metric(value, "test") if value is not None else Metric.missing("test", f"{name} {NOT_MEASURED}")

    return PhaseMemory(**{name: metric(name) for name in MEMORY_FIELDS})


def latency(s_per_image: float, s_per_step: float | None = None, steps: int = 4, images: int = 4) -> Latency:
    """Timings of ``images`` timed calls of ``steps`` steps each (BASE_CASE makes 4: 2 prompts x 2 seeds)."""
    s_per_step = s_per_image / (steps + 1) if s_per_step is None else s_per_step
    denoise = s_per_step * steps
    rest = s_per_image - denoise
    return Latency(
        method="fixture", load_s=10.0,
        stages={"image": [s_per_image] * images, "text_encoding": [rest / 2] * images, "denoise": [denoise] * images,
                "vae_decode": [rest / 2] * images},
        steps=[[s_per_step] * steps for _ in range(images)],
    )


def result(status: str = "ok", s_per_image: float | None = 2.0, memory: dict[str, PhaseMemory] | None = None,
           drift: Drift | None = None, reason: str | None = None, **case_changes: Any) -> CaseResult:
    """A finished (or failed) case: timings only when it finished, memory as given."""
    made = case(**case_changes)
    status = Status(status)
    finished = status.ran and s_per_image is not None
    return CaseResult.for_case(made, status, reason=reason, memory=memory or {}, drift=drift,
                               latency=latency(s_per_image, steps=made.steps, images=timed_calls(made)) if finished
                               else None)


def timed_calls(made: Case) -> int:
    """The timed pipeline calls a case makes: ``repeats`` per prompt and seed."""
    return made.repeats * len(made.prompts) * len(made.seeds)


def gpu_result(device: float | None = None, reserved: float | None = None, rss: float | None = None,
               **kwargs: Any) -> CaseResult:
    """A case whose inference phase peaked at the given GiB figures."""
    memory = {"inference": phase(gpu_device=device, gpu_reserved=reserved, gpu_allocated=reserved, host_rss=rss)}
    return result(memory=memory, **kwargs)


def drift(baseline: CaseResult, weights: str = "synthetic", failed: tuple[str, ...] = (), **values: float) -> Drift:
    label = "numeric drift on synthetic weights" if weights == "synthetic" else "drift against the bf16 baseline"
    return Drift(baseline_key=baseline.key, label=label, failed=list(failed),
                 metrics={name: Metric(value, "fixture") for name, value in values.items()})


# --- images, latents and run directories ---------------------------------------------------------

def gradient_image(size: int = 64) -> np.ndarray:
    """A smooth RGB image with values in 64..192, far enough from 0 and 255 that added noise is rarely clipped."""
    ramp = np.linspace(64, 192, size)
    return np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))],
                    axis=-1).round().astype(np.uint8)


def with_noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).round().astype(np.uint8)


def save_outputs(run_dir: Path, record: CaseResult, images: list[np.ndarray],
                 latents: list[torch.Tensor] | None = None) -> CaseResult:
    """Write one PNG (and latents) per (prompt, seed) of the case, in that order, and list them in the record."""
    pairs = [(p, s) for p in range(len(record.case.prompts)) for s in record.case.seeds]
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    (run_dir / "latents").mkdir(parents=True, exist_ok=True)
    record.outputs = []
    for i, ((prompt, seed), image) in enumerate(zip(pairs, images)):
        name = f"{record.key}-p{prompt}-s{seed}"
        Image.fromarray(image).save(run_dir / "images" / f"{name}.png")
        output = ImageOutput(prompt=prompt, seed=seed, image=f"images/{name}.png")
        if latents is not None:
            save_file({"latents": latents[i].contiguous()}, run_dir / "latents" / f"{name}.safetensors")
            output.latents = f"latents/{name}.safetensors"
        record.outputs.append(output)
    return record


def write_timeline(run_dir: Path, record: CaseResult, gpu: bool = True) -> CaseResult:
    """A short sampler timeline: one second of loading, then one of inference, gzipped as the runner stores it."""
    (run_dir / "timelines").mkdir(parents=True, exist_ok=True)
    lines = ["t_s,phase,gpu_used_gib,rss_gib,anon_gib,file_gib"]
    for i in range(20):
        t = i * 0.1
        gpu_used = f"{0.5 + t:.2f}" if gpu else ""
        phase_name = "load" if t < 1 else "inference"
        lines.append(f"{t:.2f},{phase_name},{gpu_used},{2 + t:.2f},{1 + t / 2:.2f},{1 + t / 2:.2f}")
    record.timeline = f"timelines/{record.key}.csv.gz"
    with gzip.open(run_dir / record.timeline, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return record


def write_run(run_dir: Path, records: list[CaseResult], run_id: str = "fixture-run",
              environment: dict[str, Any] | None = None, case_keys: list[str] | None = None) -> Path:
    """A run directory holding run.json and the records, exactly as the runner writes them; ``case_keys`` (the
    scenario's order) defaults to the records' order. Records measured on a GPU model the environment lacks were
    measured by a session that resumed the run there (``resumed``), as a run resumed on another machine records."""
    env = environment or ENVIRONMENT
    listed = {gpu.get("name") for gpu in env.get("gpus") or []}
    elsewhere = sorted({r.setup.gpu for r in records if r.setup.gpu and r.setup.gpu not in listed})
    store = RunStore.create(run_dir, {
        "run_id": run_id, "scenario_path": "scenarios/ci.yaml", "scenario_text": "blocks:\n  main: {}\n",
        "created_at": "2025-06-01T12:00:00+00:00", "environment": env,
        "case_keys": case_keys if case_keys is not None else [r.key for r in records], "flux2bench_version": "0.1.0",
        **({"resumed": [{"environment": {**env, "gpu_name": gpu, "gpus": [{"index": 0, "name": gpu,
                                                                          "memory_gib": 140.4}]}}
                        for gpu in elsewhere]} if elsewhere else {}),
    })
    for record in records:
        store.write(record)
    return store.root
