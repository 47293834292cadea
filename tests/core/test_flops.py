"""FLOPs per step from the transformer's config, checked against torch's FLOP counter; achieved TFLOP/s and the
fraction of the card's dense peak."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flux2bench.flops import step_flops, transformer_flops
from flux2bench.metrics import achieved_tflops, peak_fraction
from flux2bench.gpu_specs import GPU_SPECS, dense_peak, find_gpu
from flux2bench.metrics import BY_NAME
from flux2bench.models import MODELS
from flux2bench.report import build_report
from records import result, write_run


def counted_flops(model_name: str, batch: int, image_tokens: int, text_tokens: int) -> int:
    """What torch's FLOP counter counts in one forward of the model on the CPU. The math SDPA backend, because the
    CPU's fused attention kernel is not in the counter's registry (the CUDA kernels are)."""
    config = MODELS[model_name].config("transformer")
    model = Flux2Transformer2DModel.from_config(config).eval()
    inputs = dict(hidden_states=torch.randn(batch, image_tokens, config["in_channels"]),
                  encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"]),
                  timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(image_tokens, 4),
                  txt_ids=torch.zeros(text_tokens, 4),
                  guidance=torch.full((batch,), 4.0) if config["guidance_embeds"] else None)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("model,batch,image_tokens,text_tokens", [
    ("tiny", 1, 16, 8), ("tiny", 2, 64, 24), ("tiny-klein", 1, 256, 32), ("tiny-klein-base", 2, 80, 16)])
def test_the_config_formula_counts_what_torchs_flop_counter_counts(model, batch, image_tokens, text_tokens):
    expected = counted_flops(model, batch, image_tokens, text_tokens)
    assert transformer_flops(MODELS[model].config("transformer"), batch, image_tokens, text_tokens) == \
        pytest.approx(expected, rel=0.02)


def test_flux2_dev_at_1024_is_twice_the_weights_each_token_meets_plus_attention():
    config = MODELS["flux2-dev"].config("transformer")
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)

    def linear_weights(blocks) -> int:
        return sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))

    image, text = 64 * 64, 512
    tokens, width = image + text, config["num_attention_heads"] * config["attention_head_dim"]
    # A double-stream block's weights are half image stream, half text stream: each token meets one half.
    met = linear_weights(model.transformer_blocks) / 2 + linear_weights(model.single_transformer_blocks)
    attention = 4 * tokens**2 * width * (len(model.transformer_blocks) + len(model.single_transformer_blocks))
    flops = transformer_flops(config, 1, image, text)
    assert flops == pytest.approx(2 * met * tokens + attention, rel=0.01)
    assert 2.7e14 < flops < 3.0e14


def record(gpu: str | None, precision: str = "bf16", s_per_step: float = 0.5, calls=((1, 4096, 512),), **case):
    """A record whose steps have ``s_per_step`` as their median, a fastest step 20% below it and a mean above it, so
    that a figure over the fastest step or the mean is told from one over the median."""
    made = result(s_per_image=s_per_step * 5, precision=precision, **case)
    made.latency.steps = [[0.8 * s_per_step, s_per_step, s_per_step, 1.5 * s_per_step]
                          for _ in made.latency.stages["image"]]
    made.latency.transformer_calls = [list(call) for call in calls]
    made.setup.gpu = gpu
    return made


def test_achieved_tflops_is_a_steps_flops_over_the_median_step_time():
    made = record("NVIDIA H100 80GB HBM3", model="flux2-dev", calls=((1, 4096, 512), (1, 4096, 512)))
    config = MODELS["flux2-dev"].config("transformer")
    assert step_flops(made).value == 2 * transformer_flops(config, 1, 4096, 512)  # two calls: true CFG
    assert achieved_tflops(made).value == pytest.approx(step_flops(made).value / 0.5 / 1e12)
    assert peak_fraction(made).value == pytest.approx(achieved_tflops(made).value / 989.5)
    assert "h100" in peak_fraction(made).method


def test_a_case_over_several_gpus_is_held_against_the_peak_of_all_of_them():
    one = record("NVIDIA H100 80GB HBM3", model="flux2-dev")
    four = record("NVIDIA H100 80GB HBM3", model="flux2-dev", parallel="ulysses", gpus=4)
    assert achieved_tflops(four).value == pytest.approx(achieved_tflops(one).value)  # the same step on 4 GPUs
    assert peak_fraction(four).value == pytest.approx(achieved_tflops(four).value / (4 * 989.5))
    assert peak_fraction(four).value == pytest.approx(peak_fraction(one).value / 4)
    assert "4 x 989.5" in peak_fraction(four).method


def test_fp8_is_held_against_the_fp8_peak_and_a_card_without_it_gives_no_fraction():
    h200 = record("NVIDIA H200", precision="fp8", model="flux2-dev")
    assert peak_fraction(h200).value == pytest.approx(achieved_tflops(h200).value / 1979.0)
    a100 = record("NVIDIA A100-SXM4-80GB", precision="fp8", model="flux2-dev")
    assert peak_fraction(a100).value is None and "no fp8 tensor cores" in peak_fraction(a100).reason
    assert achieved_tflops(a100).value is not None


def test_an_unknown_card_shows_tflops_only_with_the_reason():
    made = record("NVIDIA Imaginary 9000", model="flux2-dev")
    assert achieved_tflops(made).value > 0
    fraction = peak_fraction(made)
    assert fraction.value is None and "no dense peak listed for NVIDIA Imaginary 9000" in fraction.reason


def test_records_without_transformer_calls_or_with_a_step_cache_have_no_flops():
    old = result()
    assert step_flops(old).value is None and "no transformer call recorded" in step_flops(old).reason
    cached = record("NVIDIA H200", model="flux2-dev", cache="firstblock")
    assert step_flops(cached).value is None and "step cache" in step_flops(cached).reason


@pytest.mark.parametrize("name,card", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                       ("NVIDIA H200", "H200 SXM"), ("NVIDIA B200", "B200"), ("NVIDIA L40S", "L40S"),
                                       ("NVIDIA A100 80GB PCIe", "A100 80GB"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
                                       ("NVIDIA GeForce RTX 5090", "RTX 5090"),
                                       ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada")])
def test_each_card_is_found_by_its_cuda_name(name, card):
    assert find_gpu(name).name == card


def test_every_peak_names_its_vendor_source_and_fp8_doubles_bf16():
    for spec in GPU_SPECS:
        assert spec.source.startswith(("https://www.nvidia.com/", "https://images.nvidia.com/")), spec.name
        assert spec.fp8_tflops is None or spec.fp8_tflops == pytest.approx(2 * spec.bf16_tflops, rel=0.02)
    assert dense_peak("NVIDIA H200", "nf4")[0] == 989.5  # NF4 multiplies in bf16
    assert dense_peak("NVIDIA H200", "int8")[0] == 989.5  # int8 weight-only: bf16 activations, bf16 products
    assert dense_peak("NVIDIA H200", "fp8_row")[0] == 1979.0
    assert dense_peak("NVIDIA A100-SXM4-80GB", "fp8") == (None, "the A100 80GB has no fp8 tensor cores")


def test_the_report_has_compute_columns_and_plot(tmp_path):
    made = record("NVIDIA H100 80GB HBM3", model="flux2-dev", block="dev")
    assert BY_NAME["peak_fraction_pct"].derive(made).value == pytest.approx(100 * peak_fraction(made).value)
    built = build_report(write_run(tmp_path / "run", [made, result(block="old")]))
    assert "TFLOP/s" in built.markdown_text and "% of dense peak" in built.markdown_text
    assert "compute" in built.plots
