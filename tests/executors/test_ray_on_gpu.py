"""The Ray executor on a real GPU node: a local Ray instance finds the GPU and its kind, and a case that names the
kind is placed on it and measured there (skipped without a CUDA GPU or without Ray)."""

from __future__ import annotations

import pytest
import torch

from flux2bench.axes.gpu import kind_of
from flux2bench.results import Status
from flux2bench.runner import Runner, start_run

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ray = pytest.importorskip("ray")


def test_a_case_naming_this_gpus_kind_runs_on_it_through_ray(tmp_path):
    from flux2bench.executors.ray import RayExecutor

    kind = kind_of(torch.cuda.get_device_name(0))
    scenario = tmp_path / "ray-gpu.yaml"
    scenario.write_text(f"""
defaults: {{model: tiny, device: cuda, resolution: 64, steps: 2, warmup: 1, repeats: 1, prompts: a red fox}}
blocks:
  here: {{gpu: {kind}}}
  elsewhere: {{gpu: NO-SUCH-GPU}}
""")
    store, cases = start_run(scenario, run_dir=tmp_path / "run")
    results = {r.block: r for r in Runner(store, executor=RayExecutor()).run(cases)}
    here = results["here"]
    assert here.status == Status.OK, here.reason
    assert here.setup.gpu == torch.cuda.get_device_name(0)
    assert (here.setup.runner.executor, here.setup.runner.gpu_kind) == ("ray", kind)  # Ray's name is ours
    assert here.setup.runner.cuda_visible_devices  # Ray gave the actor, and so the worker, a GPU
    assert here.memory["inference"].gpu_allocated_peak_gib.value > 0
    assert results["elsewhere"].status == Status.UNSUPPORTED
