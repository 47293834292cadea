"""The axes: where weights are created, which diffusers call each offload mode makes, attention names, and what
is refused before any loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from flux2bench.axes import attention, offload, precision, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.errors import Unsupported

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


def plan(case, device=None) -> LoadPlan:
    device = device or CUDA
    return registry.plan_load(case, LoadPlan(device=device, home=device))


class RecordingPipeline:
    """Stands in for a diffusers pipeline and records which offload method was called with what."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


@pytest.mark.parametrize("mode, home", [("none", CUDA), ("model", CPU), ("sequential", CPU),
                                           ("group_leaf", CPU), ("group_block", CPU)])
def test_weights_are_created_on_the_gpu_only_without_offload(tiny_case, mode, home):
    placement = plan(tiny_case(offload=mode)).placement
    assert placement == {"text_encoder": home, "transformer": home, "vae": home}


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_a_torchao_quantized_pipeline_is_created_on_the_gpu_then_offloaded(tiny_case, mode):
    """diffusers' torchao guide loads with device_map="cuda": each layer is quantized on the GPU."""
    placement = plan(tiny_case(offload=mode, precision="fp8")).placement
    assert placement == {"text_encoder": CUDA, "transformer": CUDA, "vae": CUDA}


def test_a_torchao_text_encoder_that_is_not_held_does_not_move_the_load(tiny_case):
    case = tiny_case(offload="model", text_encoder="precomputed", text_encoder_precision="fp8")
    assert set(plan(case).placement.values()) == {CPU}


def test_a_precomputed_text_encoder_is_not_loaded(tiny_case):
    assert plan(tiny_case(text_encoder="precomputed")).components == ("transformer", "vae")
    assert plan(tiny_case()).components == ("text_encoder", "transformer", "vae")


@pytest.mark.parametrize("mode, method", [("none", "to"), ("model", "enable_model_cpu_offload"),
                                          ("sequential", "enable_sequential_cpu_offload")])
def test_each_offload_mode_calls_its_diffusers_method(tiny_case, mode, method):
    pipe = RecordingPipeline()
    case = tiny_case(offload=mode)
    applied = offload.AXIS.apply(pipe, case, plan(case))
    assert [name for name, _, _ in pipe.calls] == [method]
    assert applied == {"offload": mode, "method": f"pipe.{method}"}


def test_group_offload_passes_every_option_and_records_it(tiny_case):
    pipe = RecordingPipeline()
    case = tiny_case(offload="group_block", use_stream=True, record_stream=True, low_cpu_mem_usage=True,
                     num_blocks_per_group=2)
    applied = offload.AXIS.apply(pipe, case, plan(case))
    ((name, _, kwargs),) = pipe.calls
    assert name == "enable_group_offload"
    assert kwargs == {"onload_device": CUDA, "offload_device": CPU, "offload_type": "block_level",
                      "use_stream": True, "record_stream": True, "low_cpu_mem_usage": True,
                      "num_blocks_per_group": 2}
    assert applied["offload_type"] == "block_level" and applied["num_blocks_per_group"] == 2


def test_leaf_level_group_offload_takes_no_block_count(tiny_case):
    pipe = RecordingPipeline()
    case = tiny_case(offload="group_leaf")
    offload.AXIS.apply(pipe, case, plan(case))
    ((_, _, kwargs),) = pipe.calls
    assert kwargs["offload_type"] == "leaf_level" and "num_blocks_per_group" not in kwargs


@pytest.mark.parametrize("requested, backend", [("sdpa", "native"), ("_native_math", "_native_math"),
                                                ("flex", "flex")])
def test_attention_names_map_to_diffusers_backends(requested, backend):
    assert attention.backend_name(requested) == backend


def test_fa3_maps_to_the_hub_kernel_without_a_local_flash_attn_interface(monkeypatch):
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    assert attention.backend_name("fa3") == "_flash_3_hub"
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object())
    assert attention.backend_name("fa3") == "_flash_3"


def test_an_unknown_attention_backend_is_unsupported_before_loading(tiny_case):
    with pytest.raises(Unsupported, match="no_such_backend"):
        case = tiny_case(attention="no_such_backend")
        attention.AXIS.check(case, plan(case))


@pytest.mark.parametrize("axes, reason", [
    ({"offload": "model"}, "no CUDA GPU"),
    ({"max_vram_gib": 24}, "no CUDA GPU"),
    ({"precision": "fp8"}, "8.9"),
])
def test_what_a_cpu_cannot_run_is_refused_with_the_reason(tiny_case, axes, reason):
    with pytest.raises(Unsupported, match=reason):
        case = tiny_case(**axes)
        registry.check(case, plan(case, CPU))


@pytest.mark.parametrize("quantized, mode", [("nf4", "group_leaf"), ("nf4", "group_block"),
                                             ("nf4", "sequential"), ("fp8", "group_leaf")])
def test_quantized_weights_with_a_failing_offload_mode_are_refused(quantized, mode):
    with pytest.raises(Unsupported, match=f"offload: {mode} with {quantized}"):
        precision.check_offload_supported(quantized, mode)


# --- one home per option ----------------------------------------------------------------------------------------

READ_BY_NAME = re.compile(r"""(?:settings|values)(?:\[|\.get\()\s*["'](\w+)["']""")


def test_no_module_reads_an_axis_option_by_its_name_but_the_axis_that_owns_it():
    """Outside its own axis, an option is asked of that axis (``offload.AXIS.moves_weights(case)``,
    ``vram_cap.AXIS.cap_gib(case)``); reading it by its string name is what a rename or a typo breaks at run time."""
    owners = {option.name: type(axis).__module__ for axis in registry.AXES for option in axis.options}
    package = Path(registry.__file__).parents[1]
    foreign = {}
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        read = {name for name in READ_BY_NAME.findall(path.read_text()) if name in owners}
        if others := sorted(name for name in read if owners[name] != module):
            foreign[str(path.relative_to(package))] = others
    assert foreign == {}


def test_an_axis_reads_its_options_typed_and_answers_for_them(tiny_case):
    case = tiny_case(offload="group_block", num_blocks_per_group=2)
    settings = offload.AXIS.of(case)
    assert isinstance(settings, offload.OffloadSettings)
    assert (settings.offload, settings.num_blocks_per_group, settings.use_stream) == ("group_block", 2, True)
    assert offload.AXIS.moves_weights(case) and not offload.AXIS.moves_weights(tiny_case())

