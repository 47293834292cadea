"""Quantized precisions (the precision axis and synthetic quantized loading): configs, support checks, and
synthetic == from_pretrained.

The main claim: ``build_quantized`` on the meta-built tiny model gives what ``from_pretrained`` with the same
quantization config gives on the same bf16 weights saved by ``save_pretrained``: the same module and parameter
classes per name, the same dtypes, shapes and bytes of every stored tensor (packed 4-bit data, quant-state absmax
and code, float8 data and scales), and here even the same bytes, since the random values are those of
``random_weights.materialize`` with the same seed.

On the CPU: bitsandbytes 0.50 quantizes on the CPU and transformers loads 4-bit there, so the text encoder is
checked as is. diffusers' 4-bit quantizer refuses to load without a GPU (``validate_environment`` raises "No GPU
found") and sends the weights to ``cuda:<current>``; the CPU check of the transformer patches exactly those two
methods, for both paths alike (``cpu_bnb_diffusers``). The ``gpu`` tests repeat the checks unpatched, and cover fp8.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import transformers

from flux2bench.axes import precision as quantization
from flux2bench.axes.base import LoadPlan
from flux2bench.axes.precision import (check_offload_supported, check_precision_supported, describe_quantization,
                                       pipeline_quantization_config, tensor_storage)
from flux2bench.errors import Unsupported
from flux2bench.models import MODELS
from flux2bench.sources.pretrained import pipeline_device_map
from flux2bench.sources.quantized import build_quantized
from flux2bench.sources.random_weights import materialize
from flux2bench.sources.synthetic import meta_module
from flux2bench.sources.synthetic import synthetic_pipeline

SPEC = MODELS["tiny"]
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
SEEDS = {"text_encoder": 3, "transformer": 4}  # the seeds synthetic_pipeline gives these components
COMPONENTS = tuple(SEEDS)
has_cuda = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")


def case(precision: str = "bf16", text_encoder_precision: str | None = None) -> dict[str, str]:
    """The component precisions of a case with these settings."""
    return {"transformer": precision, "text_encoder": text_encoder_precision or precision}


def cpu_plan() -> LoadPlan:
    return LoadPlan(device=CPU, home=CPU)


def meta_component(component: str) -> torch.nn.Module:
    """The tiny component built on the meta device, as synthetic weights build it."""
    return meta_module(SPEC, component)


@pytest.fixture(scope="module")
def saved_bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic bf16 tiny transformer and text encoder, written by save_pretrained."""
    root = tmp_path_factory.mktemp("bf16")
    paths = {}
    for component, seed in SEEDS.items():
        module = meta_component(component)
        materialize(module, CPU, seed=seed)
        module.save_pretrained(root / component)
        paths[component] = root / component
    return paths


@pytest.fixture
def cpu_bnb_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let diffusers' bnb 4-bit quantizer load on the CPU: skip its GPU check and default to the CPU, nothing else."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "update_device_map",
                        lambda self, device_map: {"": "cpu"} if device_map is None else device_map)


def from_pretrained(path: Path, component: str, precision: str | None, device_map: dict | None = None) -> torch.nn.Module:
    """The component loaded as Flux2Pipeline.from_pretrained loads it, with that precision's config (None: as stored)."""
    library = quantization.COMPONENT_LIBRARY[component]
    config = None if precision is None else quantization.quantization_config(library, precision)
    if library == "diffusers":
        return diffusers.Flux2Transformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16,
                                                                 quantization_config=config, device_map=device_map)
    return transformers.Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                                         quantization_config=config, device_map=device_map)


def layout(module: torch.nn.Module) -> dict[str, tuple]:
    """Per parameter: owning module class, parameter class, and (dtype, shape, device) of each stored tensor,
    plus the non-tensor quant-state fields (quant type, block size, original dtype and shape)."""
    out = {}
    for name, param in module.named_parameters():
        parts = {k: (v.dtype, tuple(v.shape), v.device.type) for k, v in tensor_storage(param).items()}
        state = getattr(param, "quant_state", None)
        fields = None if state is None else {k: v for k, v in state.as_dict().items() if not isinstance(v, torch.Tensor)}
        out[name] = (type(module.get_submodule(name.rpartition(".")[0])).__name__, type(param).__name__, parts, fields)
    return out


def assert_same_storage(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    assert layout(actual) == layout(expected)
    for (name, a), (_, b) in zip(expected.named_parameters(), actual.named_parameters()):
        for part, tensor in tensor_storage(a).items():
            assert torch.equal(tensor_storage(b)[part], tensor), f"{name} {part}"
    assert describe_quantization(actual) == describe_quantization(expected)
    assert type(actual.hf_quantizer) is type(expected.hf_quantizer)
    assert actual.config.quantization_config.to_dict() == expected.config.quantization_config.to_dict()


def forward(module: torch.nn.Module) -> torch.Tensor:
    """One deterministic forward pass of the tiny component, on its device."""
    device = next(module.parameters()).device
    if device.type == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first forward and fails on
        # layers narrower than one quantization block (64), as the tiny model's are; the portable path computes the
        # same function on every CPU.
        for layer in module.modules():
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                layer.support_avx512bf16_for_cpu = False
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if isinstance(module, transformers.PreTrainedModel):
            ids = torch.randint(0, 1000, (1, 12), generator=g).to(device)
            return module(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 96, generator=g),
                      timestep=torch.tensor([0.5]), img_ids=torch.zeros(1, 16, 4), txt_ids=torch.zeros(1, 8, 4),
                      guidance=torch.tensor([4.0]))
        inputs = {k: v.to(device, torch.bfloat16 if k.endswith("states") else torch.float32) for k, v in inputs.items()}
        return module(**inputs, return_dict=False)[0]


# --- configs -------------------------------------------------------------------------------------------------

def test_all_bf16_needs_no_quantization_config():
    assert pipeline_quantization_config(case("bf16")) is None


def test_nf4_maps_each_component_to_its_own_librarys_bitsandbytes_config():
    config = pipeline_quantization_config(case("nf4"))
    mapping = config.quant_mapping
    assert set(mapping) == {"transformer", "text_encoder"}
    assert type(mapping["transformer"]) is diffusers.BitsAndBytesConfig
    assert type(mapping["text_encoder"]) is transformers.BitsAndBytesConfig
    for bnb in mapping.values():
        assert bnb.load_in_4bit and not bnb.load_in_8bit
        assert bnb.bnb_4bit_quant_type == "nf4"
        assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    # what Flux2Pipeline.from_pretrained hands each component; the VAE gets nothing
    assert config._resolve_quant_config(is_diffusers=True, module_name="transformer") is mapping["transformer"]
    assert config._resolve_quant_config(is_diffusers=False, module_name="text_encoder") is mapping["text_encoder"]
    assert config._resolve_quant_config(is_diffusers=True, module_name="vae") is None


@pytest.mark.parametrize("precision, granularity", [("fp8", "PerTensor"), ("fp8_row", "PerRow")])
def test_fp8_is_torchao_float8_dynamic_activation_and_weight(precision, granularity):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    mapping = pipeline_quantization_config(case(precision)).quant_mapping
    assert type(mapping["transformer"]) is diffusers.TorchAoConfig
    assert type(mapping["text_encoder"]) is transformers.TorchAoConfig
    for config in mapping.values():
        quant_type = config.quant_type
        assert isinstance(quant_type, Float8DynamicActivationFloat8WeightConfig)
        assert quant_type.activation_dtype == quant_type.weight_dtype == torch.float8_e4m3fn
        assert [type(g).__name__ for g in quant_type.granularity] == [granularity, granularity]


def test_int8_is_torchao_int8_weight_only_with_per_row_scales():
    from torchao.quantization import Int8WeightOnlyConfig, PerRow

    mapping = pipeline_quantization_config(case("int8")).quant_mapping
    assert type(mapping["transformer"]) is diffusers.TorchAoConfig
    assert type(mapping["text_encoder"]) is transformers.TorchAoConfig
    for config in mapping.values():
        assert isinstance(config.quant_type, Int8WeightOnlyConfig)
        assert isinstance(config.quant_type.granularity, PerRow) and config.quant_type.group_size is None


def test_mixed_backends_and_bf16_components_through_quant_mapping():
    mapping = pipeline_quantization_config(case("nf4", "fp8")).quant_mapping
    assert type(mapping["transformer"]) is diffusers.BitsAndBytesConfig
    assert type(mapping["text_encoder"]) is transformers.TorchAoConfig
    assert set(pipeline_quantization_config(case("bf16", "nf4")).quant_mapping) == {"text_encoder"}
    assert set(pipeline_quantization_config(case("fp8", "bf16")).quant_mapping) == {"transformer"}


# --- support checks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp8", "fp8_row"])
def test_fp8_on_cpu_is_unsupported_for_want_of_compute_capability(precision):
    with pytest.raises(Unsupported, match=r"compute capability 8\.9.*device cpu"):
        check_precision_supported(precision, CPU)


def test_fp8_below_compute_capability_8_9_names_the_device_and_its_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(Unsupported, match=r"8\.9 or newer; device cuda:0 \(NVIDIA A100-SXM4-80GB\) has 8\.0"):
        check_precision_supported("fp8", torch.device("cuda", 0))


def test_nf4_on_cpu_is_unsupported_because_diffusers_needs_a_gpu():
    with pytest.raises(Unsupported, match="nf4 on device cpu: diffusers loads bitsandbytes 4-bit models only on a GPU"):
        check_precision_supported("nf4", CPU)


def test_int8_runs_wherever_torchao_imports_and_names_the_package_where_it_does_not(monkeypatch):
    check_precision_supported("int8", CPU)  # no compute capability needed: torch's int8 matmul runs on the CPU
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao gives
    with pytest.raises(Unsupported, match=r"int8 needs the torchao package \(pip install 'flux2bench\[quant\]'\)"):
        check_precision_supported("int8", CPU)


def test_bf16_is_always_supported_and_unknown_precisions_are_errors():
    check_precision_supported("bf16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        check_precision_supported("int3", CPU)


@pytest.mark.parametrize("precision, offload", [("nf4", "group_leaf"), ("nf4", "group_block"), ("nf4", "sequential"),
                                               ("fp8", "group_leaf"), ("fp8_row", "group_block"),
                                               ("fp8", "model"), ("fp8_row", "model")])
def test_offload_modes_that_fail_with_quantized_weights_are_unsupported(precision, offload):
    with pytest.raises(Unsupported, match=f"offload: {offload} with {precision} weights: "):
        check_offload_supported(precision, offload)


@pytest.mark.parametrize("precision, offload", [("nf4", "none"), ("nf4", "model"), ("fp8", "none"), ("fp8", "sequential"),
                                               ("bf16", "group_leaf")])
def test_other_offload_modes_are_not_refused(precision, offload):
    check_offload_supported(precision, offload)


@pytest.mark.parametrize("precision, device, device_map", [
    ("fp8", CUDA, {"": CUDA}), ("fp8_row", CUDA, {"": CUDA}), ("int8", CUDA, {"": CUDA}),  # torchao quantizes each layer where it is loaded
    ("fp8", CPU, None), ("nf4", CUDA, None), ("bf16", CUDA, None), ("fp8", None, None),  # the library's default
])
def test_torchao_components_are_loaded_with_a_device_map_onto_their_gpu(precision, device, device_map):
    assert quantization.load_device_map(precision, device) == device_map


@pytest.mark.parametrize("precisions, skip, device_map", [
    ({"transformer": "fp8"}, set(), "cuda"),
    ({"text_encoder": "fp8_row"}, set(), "cuda"),
    ({"text_encoder": "fp8"}, {"text_encoder"}, None),  # the text encoder is not loaded
    ({"transformer": "nf4"}, set(), None),
])
def test_the_pretrained_pipeline_gets_the_device_map_of_its_torchao_components(precisions, skip, device_map):
    plan = LoadPlan(device=CUDA, home=CUDA, skip=skip)
    plan.precisions |= precisions
    assert pipeline_device_map(plan) == device_map


@pytest.mark.skipif(has_cuda, reason="shows what diffusers does without a GPU")
def test_diffusers_refuses_bitsandbytes_without_a_gpu(saved_bf16):
    with pytest.raises(RuntimeError, match="No GPU found"):
        from_pretrained(saved_bf16["transformer"], "transformer", "nf4")


# --- synthetic == from_pretrained, on the CPU ----------------------------------------------------------------

def test_nf4_text_encoder_is_what_from_pretrained_gives(saved_bf16):
    expected = from_pretrained(saved_bf16["text_encoder"], "text_encoder", "nf4")
    actual = build_quantized(meta_component("text_encoder"), "text_encoder", "nf4", CPU, seed=SEEDS["text_encoder"])
    assert_same_storage(expected, actual)
    assert describe_quantization(actual)["quantized_layers"] == {"Linear4bit": 220}  # lm_head stays bf16
    assert torch.equal(forward(actual), forward(expected))


def test_nf4_transformer_is_what_from_pretrained_gives_cpu(saved_bf16, cpu_bnb_diffusers):
    expected = from_pretrained(saved_bf16["transformer"], "transformer", "nf4")
    actual = build_quantized(meta_component("transformer"), "transformer", "nf4", CPU, seed=SEEDS["transformer"])
    assert_same_storage(expected, actual)
    assert describe_quantization(actual)["quantized_layers"] == {"Linear4bit": 27}
    assert actual.config["_pre_quantization_dtype"] == torch.bfloat16
    assert actual.is_loaded_in_4bit and actual.hf_device_map == expected.hf_device_map


@pytest.mark.parametrize("component, layers", [("transformer", 27), ("text_encoder", 220)])
def test_int8_component_is_what_from_pretrained_gives_cpu(saved_bf16, component, layers):
    expected = from_pretrained(saved_bf16[component], component, "int8")
    actual = build_quantized(meta_component(component), component, "int8", CPU, seed=SEEDS[component])
    assert_same_storage(expected, actual)
    described = describe_quantization(actual)
    assert described["parameter_types"]["Int8Tensor"] == layers  # the Linear weights (as nf4 quantizes them)
    for param in (p for p in actual.parameters() if type(p).__name__ == "Int8Tensor"):
        qdata = tensor_storage(param)["qdata"]
        assert (qdata.dtype, qdata.shape) == (torch.int8, param.shape)  # one byte per weight, scales beside it
    assert torch.equal(forward(actual), forward(expected))


def test_prequantized_text_encoder_loads_back_the_same(saved_bf16, tmp_path):
    built = build_quantized(meta_component("text_encoder"), "text_encoder", "nf4", CPU, seed=SEEDS["text_encoder"])
    built.save_pretrained(tmp_path)
    assert_same_storage(built, from_pretrained(tmp_path, "text_encoder", None))  # config read from config.json


def test_pipeline_from_pretrained_applies_the_mapping(tmp_path):
    synthetic_pipeline(SPEC, cpu_plan()).save_pretrained(tmp_path)
    pipe = diffusers.Flux2Pipeline.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                   quantization_config=pipeline_quantization_config(case("bf16", "nf4")))
    assert describe_quantization(pipe.text_encoder)["quantized_layers"] == {"Linear4bit": 220}
    for name in ("transformer", "vae"):
        described = describe_quantization(getattr(pipe, name))
        assert described["quantization_config"] is None and described["quantized_layers"] == {}


def test_describe_quantization_of_bf16_and_nf4(saved_bf16):
    plain = from_pretrained(saved_bf16["text_encoder"], "text_encoder", None)
    params = list(plain.parameters())
    assert describe_quantization(plain) == {
        "quantization_config": None, "quantized_layers": {}, "parameter_types": {"Tensor": len(params)},
        "parameter_bytes": 2 * sum(p.numel() for p in params),
        "parameter_bytes_by_dtype": {"bfloat16": 2 * sum(p.numel() for p in params)},
    }
    nf4 = describe_quantization(from_pretrained(saved_bf16["text_encoder"], "text_encoder", "nf4"))
    json.dumps(nf4)  # goes into the results record as is
    assert nf4["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert set(nf4["parameter_bytes_by_dtype"]) == {"bfloat16", "uint8", "float32"}  # rest, packed 4-bit, absmax+code
    assert nf4["parameter_bytes"] < describe_quantization(plain)["parameter_bytes"]


# --- synthetic == from_pretrained, on the GPU, unpatched --------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("precision", ["nf4", "fp8", "fp8_row", "int8"])
def test_quantized_component_is_what_from_pretrained_gives_gpu(saved_bf16, component, precision):
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        check_precision_supported(precision, device)
    except Unsupported as exc:
        pytest.skip(str(exc))
    device_map = quantization.load_device_map(precision, device)
    expected = from_pretrained(saved_bf16[component], component, precision, device_map).to(device)
    actual = build_quantized(meta_component(component), component, precision, device, seed=SEEDS[component])
    assert_same_storage(expected, actual)
    assert describe_quantization(actual)["quantized_layers"]
    assert torch.equal(forward(actual), forward(expected))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("component", COMPONENTS)
def test_prequantized_nf4_loads_back_the_same_gpu(saved_bf16, component, tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    built = build_quantized(meta_component(component), component, "nf4", device, seed=SEEDS[component])
    built.save_pretrained(tmp_path)
    assert_same_storage(built, from_pretrained(tmp_path, component, None))

