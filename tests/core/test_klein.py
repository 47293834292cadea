"""The FLUX.2 [klein] models: their registry entries, the offline Qwen3 tokenizer, and the tiny klein pipelines
(step-distilled and base, with classifier-free guidance) through the runner on the CPU."""

from __future__ import annotations

import pytest
import torch

from flux2bench.axes import registry
from flux2bench.axes.base import LoadPlan
from flux2bench.models import MODELS
from flux2bench.sources import load_pipeline
from flux2bench.sources.synthetic import meta_module, synthetic_pipeline

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, transformer_b, text_encoder_b", [
    ("flux2-klein-4b", 3.876, 4.022),  # 7.75 GB transformer checkpoint; Qwen3-4B with tied embeddings
    ("flux2-klein-9b", 9.079, 8.191),  # Qwen3-8B, untied
])
def test_full_size_klein_has_the_published_parameter_counts(name, transformer_b, text_encoder_b):
    for component, billions in (("transformer", transformer_b), ("text_encoder", text_encoder_b)):
        module = meta_module(MODELS[name], component)
        assert sum(p.numel() for p in module.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)


@pytest.mark.parametrize("name, steps, guidance, style", [
    ("flux2-klein-4b", 4, 1.0, "none"), ("flux2-klein-base-9b", 50, 4.0, "cfg"), ("flux2-dev", 50, 4.0, "embedded"),
])
def test_each_model_defaults_to_its_published_steps_and_guidance(tiny_case, name, steps, guidance, style):
    from flux2bench.scenario import Block, expand_block

    (case,) = expand_block("m", Block.model_validate({"model": name}))
    assert (case.steps, case.guidance_scale, MODELS[name].guidance) == (steps, guidance, style)


def test_the_byte_level_qwen3_tokenizer_pads_to_512_with_qwen3s_template_and_ids():
    tokenizer = MODELS["tiny-klein"].tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=512)["input_ids"]
    assert len(ids) == 512 and ids[0] == 151644 and ids[-1] == tokenizer.pad_token_id == 151643
    assert max(ids) < MODELS["flux2-klein-4b"].config("text_encoder")["vocab_size"]


def test_a_saved_tiny_klein_pipeline_loads_back_distilled_with_the_same_weights(tmp_path, tiny_case):
    pipe = synthetic_pipeline(MODELS["tiny-klein"], LoadPlan(device=CPU, home=CPU))
    pipe.save_pretrained(tmp_path / "klein")
    case = tiny_case(model="tiny-klein", weights="pretrained", source=str(tmp_path / "klein"))
    loaded = load_pipeline(case, registry.plan_load(case, LoadPlan(device=CPU, home=CPU)))
    assert type(loaded).__name__ == "Flux2KleinPipeline" and loaded.config.is_distilled
    for name, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, loaded.transformer.state_dict()[name])
    assert loaded.text_encoder.lm_head.weight is loaded.text_encoder.model.embed_tokens.weight


KLEIN = """
defaults: {device: cpu, resolution: 64, repeats: 1, warmup: 0, timeout_s: 300, prompts: a red fox,
           reference_image_size: 64x64}
blocks:
  distilled: {model: tiny-klein, reference_images: [0, 1]}
  base: {model: tiny-klein-base, steps: 2, text_encoder: [local, precomputed]}
  cached: {model: tiny-klein, steps: 8, cache: taylorseer}
"""


@pytest.fixture(scope="module")
def klein(run_scenario):
    return run_scenario(KLEIN, "klein")


def test_every_tiny_klein_case_runs(klein):
    assert [(r.block, r.status) for r in klein.results] == [("distilled", "ok")] * 2 + [("base", "ok")] * 2 + [
        ("cached", "ok")], [r.reason for r in klein.results]


def test_a_distilled_model_calls_the_transformer_once_per_step_and_a_base_model_twice(klein):
    distilled = next(r for r in klein.results if r.block == "distilled")
    base = next(r for r in klein.results if r.block == "base")
    assert distilled.case.steps == 4 and len(distilled.latency.steps[0]) == 4
    assert base.case.guidance_scale == 4.0 and len(base.latency.steps[0]) == 2  # a CFG step holds both calls


def test_precomputed_embeddings_of_a_cfg_model_include_the_empty_prompts(klein):
    from safetensors.torch import load_file

    from flux2bench.axes.text_encoder import NEGATIVE, embedding_cache_path

    local, precomputed = [r for r in klein.results if r.block == "base"]
    assert set(load_file(embedding_cache_path(klein.store.root, precomputed.case))) == {"prompt_0", NEGATIVE}
    latents = [load_file(klein.store.root / r.outputs[0].latents)["latents"] for r in (local, precomputed)]
    assert torch.equal(*latents)  # the same image as with the text encoder in the pipeline


def test_a_step_cache_on_klein_uses_the_pipelines_own_cache_context(klein):
    cached = next(r for r in klein.results if r.block == "cached")
    assert cached.setup.axes["cache"]["cache_context"] == "provided by the pipeline"
