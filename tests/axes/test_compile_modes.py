"""The compile modes measured for real: CUDA graphs refused, before loading, where an offload hook or a step cache
breaks them; what torch.compile did (compilations, recompilations, graph breaks, CUDA-graph recordings) counted from
torch's own instruments."""

from __future__ import annotations

import pytest
import torch

from flux2bench.axes import compile, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.errors import MachineLacks, Unsupported
from flux2bench.trackers.compilation import TIMER_FLOOR_S, CompileEvents, autotuned_product

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def plan(case, device=CPU) -> LoadPlan:
    return registry.plan_load(case, LoadPlan(device=device, home=device))


def compiled(tiny_case, **axes):
    return tiny_case(**{"compile": "regional", "warmup": 1, **axes})


@pytest.mark.parametrize("mode, graphs", [("default", False), ("max-autotune-no-cudagraphs", False),
                                          ("reduce-overhead", True), ("max-autotune", True)])
def test_the_modes_that_replay_cuda_graphs_are_known(tiny_case, mode, graphs):
    assert compile.AXIS.uses_cuda_graphs(compiled(tiny_case, compile_mode=mode)) is graphs
    assert not compile.AXIS.uses_cuda_graphs(tiny_case(compile_mode=mode))  # nothing compiled, no CUDA graphs


@pytest.mark.parametrize("offload", ["model", "sequential", "group_leaf", "group_block"])
def test_cuda_graphs_with_weights_that_move_are_refused_with_the_reason(tiny_case, offload):
    case = compiled(tiny_case, compile_mode="max-autotune", offload=offload)
    with pytest.raises(Unsupported, match=f"offload: {offload} moves the weights to new addresses") as refused:
        compile.AXIS.check(case, plan(case, CUDA))
    assert not isinstance(refused.value, MachineLacks)  # a fact about the setup: no other machine runs it


@pytest.mark.parametrize("cache", ["taylorseer", "pab", "fastercache"])
def test_cuda_graphs_with_a_step_cache_are_refused_with_the_reason(tiny_case, cache):
    case = compiled(tiny_case, compile_mode="reduce-overhead", cache=cache)
    with pytest.raises(Unsupported, match=f"cache: {cache} keeps block outputs of one step") as refused:
        compile.AXIS.check(case, plan(case, CUDA))
    assert not isinstance(refused.value, MachineLacks)


@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead"])
def test_cuda_graphs_with_regional_compilation_are_refused_with_what_to_run_instead(tiny_case, mode):
    case = compiled(tiny_case, compile_mode=mode)
    refusal = r"compile: regional .*\(compile: full\).*max-autotune-no-cudagraphs"
    with pytest.raises(Unsupported, match=refusal) as refused:
        compile.AXIS.check(case, plan(case, CUDA))
    assert not isinstance(refused.value, MachineLacks)
    full = compiled(tiny_case, compile="full", compile_mode=mode)
    compile.AXIS.check(full, plan(full, CUDA))


def test_the_same_setups_without_cuda_graphs_pass_the_check(tiny_case):
    for axes in ({"offload": "model"}, {"cache": "taylorseer"}, {}):
        case = compiled(tiny_case, compile_mode="max-autotune-no-cudagraphs", **axes)
        compile.AXIS.check(case, plan(case, CUDA))


def test_cuda_graphs_on_the_cpu_are_a_machine_that_lacks_them(tiny_case):
    case = compiled(tiny_case, compile_mode="max-autotune")
    with pytest.raises(MachineLacks, match="need a CUDA GPU"):
        compile.AXIS.check(case, plan(case))


def test_full_compilation_compiles_the_model_inside_a_wrapper(tiny_case, monkeypatch):
    """Under FP8 attention the pipeline holds torchao's wrapper: the model it wraps is what is compiled."""
    compiled_forwards = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled_forwards.append(fn) or "compiled forward")
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._orig_mod = inner

    class Pipe:
        transformer = Wrapper()

    pipe = Pipe()
    forward = inner.forward
    compile.AXIS.apply(pipe, compiled(tiny_case, compile="full"), plan(tiny_case()))
    assert compiled_forwards == [forward] and inner.forward == "compiled forward"
    assert "forward" not in vars(pipe.transformer)


# --- the counts --------------------------------------------------------------------------------------------------

class Step:
    """A value dynamo guards on, as it guards on a step cache's hook state."""

    value = 0


def with_a_graph_break(x):
    y = x + Step.value
    torch._dynamo.graph_break()
    return y * 2


def test_compilations_recompilations_and_graph_breaks_are_counted():
    events = CompileEvents().start()
    run = torch.compile(with_a_graph_break, backend="eager")
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for Step.value in range(3):
            run(torch.zeros(2))
    found = events.stop()
    # three guard failures make three compilations of the first graph (two of them recompilations); its resumed
    # half after the break is compiled once
    assert (found["compilations"], found["recompilations"], found["graph_breaks"]) == (4, 2, 3)
    assert any("graph_break" in reason for reason in found["graph_break_reasons"])
    assert found["compile_s"] > 0 and "cudagraphs" not in found
    timers = found["timers_s"]  # torch's own timers, largest first: where a long first call went
    assert timers["_compile.compile_inner"] == pytest.approx(found["compile_s"], abs=1e-3)
    assert list(timers.values()) == sorted(timers.values(), reverse=True) and min(timers.values()) >= TIMER_FLOOR_S


def test_counting_stops_when_asked():
    events = CompileEvents().start()
    found = events.stop()
    torch.compile(lambda x: x * 3, backend="eager")(torch.zeros(2))
    assert found["compilations"] == 0 and events.stop()["compilations"] == 0


def test_a_graph_the_inductor_cache_cannot_keep_is_counted_with_the_reason_inductor_gives(caplog):
    # a custom graph pass without a uuid (torchao's FP8 attention adds a pass of its own) makes inductor compile the
    # graph outside its FX-graph cache: it is compiled, and no cache can keep it
    import logging

    import torch._inductor.config as inductor_config

    logger = logging.getLogger("torch._inductor.codecache")
    level = logger.level
    events = CompileEvents().start()
    before = compile.compile_counts()
    with inductor_config.patch(fx_graph_cache=True, post_grad_custom_post_pass=lambda graph: None):
        torch.compile(lambda x: x.sin() + 1)(torch.zeros(4))
    found = events.stop()
    assert found["fx_graph_cache_bypasses"] == {"Unsupported post grad custom pass": 1}
    assert compile.compile_counts()["fxgraph_bypass"] - before["fxgraph_bypass"] == 1
    assert logger.level == level and not logger.filters
    assert not [r for r in caplog.records if r.name == logger.name and r.levelno < logging.WARNING]


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(128, 256), torch.nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.slow
def test_max_autotunes_choice_for_each_matrix_product_is_recorded():
    # On the CPU inductor autotunes frozen linear layers between ATen's (MKL) kernel and its C++ template; on a GPU
    # between cuBLAS and Triton templates: the record says which won, and by how much
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    if not cpu_vec_isa.valid_vec_isa_list():
        pytest.skip("inductor's C++ matrix-product template needs a vector instruction set this CPU lacks")
    events = CompileEvents().start()
    with torch.no_grad(), inductor_config.patch(freezing=True, max_autotune_gemm_backends="ATEN,CPP",
                                                         force_disable_caches=True):
        torch.compile(TwoLayers().eval(), mode="max-autotune-no-cudagraphs")(torch.randn(64, 128))
    found = events.stop()
    products = found["autotuned"]["products"]
    assert [p["shapes"].split(", ")[0] for p in products] == ["64x128", "64x256"]  # each layer's input
    for product in products:
        assert product["candidates"] >= 2 and product["fastest_ms"] > 0
        assert product["fastest_is_aten"] == (product["fastest_template_ms"] != product["fastest_ms"])
    assert any(name.endswith("_template_autotuning") for name in found["timers_s"])  # the time it took


def test_nothing_autotuned_leaves_no_autotune_record_and_the_saver_is_removed():
    from torch._inductor import select_algorithm

    savers = select_algorithm.get_algorithm_selector_cache().feedback_saver_fns
    before = list(savers)
    events = CompileEvents().start()
    assert len(savers) == len(before) + 1
    torch.compile(lambda x: x * 3, backend="eager")(torch.zeros(2))
    assert "autotuned" not in events.stop() and savers == before


class Template:
    """A generated kernel among the candidates (a Triton or C++ template)."""

    def __init__(self, name):
        self.name = name


def candidate(name, aten):
    from torch._inductor.select_algorithm import ExternKernelCaller

    if not aten:
        return Template(name)
    made = object.__new__(ExternKernelCaller)  # an ATen kernel, without the graph its constructor wants
    made.name = name
    return made


class Node:
    def __init__(self, *size):
        self.size = size

    def get_size(self):
        return self.size


def test_an_autotuned_product_names_the_fastest_candidate_that_ran_and_the_fastest_template():
    # reports/fastest-recipe-h200-20261207-180327, the recipe case's log: 4096 image tokens, FP8 per row
    timings = {candidate("_scaled_mm", aten=True): 1.1724, candidate("triton_mm_1152", aten=False): 1.4551,
               candidate("triton_mm_9", aten=False): float("inf")}  # a candidate that failed to compile
    product = autotuned_product(timings, "scaled_mm", [Node(4096, 6144), Node(6144, 36864)])
    assert product == {"op": "scaled_mm", "shapes": "4096x6144, 6144x36864", "candidates": 2,
                       "fastest": "_scaled_mm", "fastest_is_aten": True, "fastest_ms": 1.1724,
                       "fastest_template_ms": 1.4551}
    only_aten = autotuned_product({candidate("_scaled_mm", aten=True): 0.2}, "scaled_mm", [Node(512, 6144)])
    assert only_aten["fastest_template_ms"] is None and only_aten["candidates"] == 1
    assert autotuned_product({candidate("triton_mm_1", aten=False): float("inf")}, "mm", []) is None
