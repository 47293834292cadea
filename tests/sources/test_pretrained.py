"""The pretrained path: a pipeline written by save_pretrained loads back as the same model, and runs."""

from __future__ import annotations

import pytest
import torch

from flux2bench.axes import registry
from flux2bench.axes.base import LoadPlan
from flux2bench.models import MODELS
from flux2bench.sources import load_pipeline
from flux2bench.sources.random_weights import DTYPE
from flux2bench.sources.synthetic import synthetic_pipeline

CPU = torch.device("cpu")
MODULES = ("transformer", "text_encoder", "vae")


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """The tiny synthetic pipeline and the directory save_pretrained wrote it to."""
    pipe = synthetic_pipeline(MODELS["tiny"], LoadPlan(device=CPU, home=CPU))
    directory = tmp_path_factory.mktemp("pretrained") / "tiny-flux2"
    pipe.save_pretrained(directory)
    return pipe, directory


@pytest.fixture(scope="module")
def loaded(saved, tiny_case):
    _, directory = saved
    case = tiny_case(weights="pretrained", source=str(directory))
    return load_pipeline(case, registry.plan_load(case, LoadPlan(device=CPU, home=CPU)))


def test_the_loaded_pipeline_has_the_flux2_classes(loaded):
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration

    assert type(loaded) is Flux2Pipeline
    assert type(loaded.transformer) is Flux2Transformer2DModel
    assert type(loaded.text_encoder) is Mistral3ForConditionalGeneration
    assert type(loaded.vae) is AutoencoderKLFlux2


@pytest.mark.parametrize("component", MODULES)
def test_the_loaded_weights_are_bf16_on_the_placed_device(loaded, component):
    parameters = list(getattr(loaded, component).parameters())
    assert parameters
    assert {p.dtype for p in parameters} == {DTYPE}
    assert {p.device for p in parameters} == {CPU}


@pytest.mark.parametrize("component", MODULES)
def test_the_loaded_weights_equal_the_saved_ones(saved, loaded, component):
    original, back = getattr(saved[0], component).state_dict(), getattr(loaded, component).state_dict()
    assert set(back) == set(original)
    different = [name for name in original if not torch.equal(original[name], back[name])]
    assert different == []


def test_the_tokenizer_and_scheduler_round_trip(saved, loaded):
    original = saved[0]
    prompt = "A photo of a red fox reading a newspaper"
    assert loaded.tokenizer(prompt)["input_ids"] == original.tokenizer(prompt)["input_ids"]
    assert original.tokenizer.chat_template
    assert loaded.tokenizer.chat_template == original.tokenizer.chat_template  # the pipeline formats prompts with it
    assert type(loaded.scheduler) is type(original.scheduler)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.scheduler.config) == public(original.scheduler.config)


def test_skipped_components_are_not_loaded(saved, tiny_case):
    _, directory = saved
    pipe = load_pipeline(tiny_case(weights="pretrained", source=str(directory)),
                         LoadPlan(device=CPU, home=CPU, skip={"transformer", "vae"}))
    assert pipe.transformer is None and pipe.vae is None
    assert pipe.text_encoder is not None


def test_a_pretrained_scenario_runs_through_the_runner(saved, run_scenario):
    _, directory = saved
    run = run_scenario(f"""
        blocks:
          pretrained:
            model: tiny
            weights: pretrained
            source: {directory}
            device: cpu
            resolution: 64
            steps: 1
            repeats: 1
            warmup: 0
            timeout_s: 300
    """, "pretrained-run")
    result = run["pretrained"]
    assert result.status == "ok", result.reason
    assert result.weights == "pretrained" and result.case.source == str(directory)
    assert len(result.outputs) == 1 and (run.store.root / result.outputs[0].image).is_file()
