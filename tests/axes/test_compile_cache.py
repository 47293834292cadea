"""``compile_cache: portable``: the compiled transformer is kept in the artifact cache, and a later worker with the
same key loads it instead of compiling; the record says which happened. Runs for real on the tiny pipeline (CPU
inductor), twice over one cache folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import TINY
from flux2bench import child_env
from flux2bench.axes import compile_cache, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.errors import Unsupported
from flux2bench.runner import Runner, SupervisorConfig, start_run
from flux2bench.scenario import Block
from flux2bench.store import RunStore
from flux2bench.supervision.process import Workers

CPU = torch.device("cpu")


def plan(case) -> LoadPlan:
    return registry.plan_load(case, LoadPlan(device=CPU, home=CPU))


# --- the option ----------------------------------------------------------------------------------------------------

def test_the_option_takes_none_or_portable():
    assert Block.model_validate({**TINY, "compile_cache": "portable"})
    with pytest.raises(ValidationError):
        Block.model_validate({**TINY, "compile_cache": "aot"})


def test_a_case_that_compiles_nothing_has_no_compiled_code_to_keep(tiny_case):
    case = tiny_case(compile_cache="portable")
    with pytest.raises(Unsupported, match="compiles nothing"):
        compile_cache.AXIS.check(case, plan(case))


def test_a_worker_without_an_artifact_cache_folder_is_refused(tiny_case, monkeypatch):
    monkeypatch.delenv(child_env.ARTIFACT_CACHE, raising=False)
    case = tiny_case(compile="regional", warmup=1, compile_cache="portable")
    with pytest.raises(Unsupported, match="no artifact cache folder"):
        compile_cache.AXIS.check(case, plan(case))


def test_the_option_is_in_the_label_and_out_of_the_key_at_its_default(tiny_case):
    kept = tiny_case(compile="regional", warmup=1, compile_cache="portable")
    plain = tiny_case(compile="regional", warmup=1)
    assert "compile-cache" in kept.label and "compile-cache" not in plain.label
    assert kept.key != plain.key and tiny_case(compile="regional", warmup=1, compile_cache="none").key == plain.key


@pytest.mark.parametrize("hits, misses, bypasses, outcome", [
    (2, 0, 0, "loaded"), (0, 2, 0, "compiled"), (1, 1, 0, "partly loaded"), (0, 0, 0, "nothing compiled"),
    (0, 0, 2, "compiled"), (1, 0, 1, "partly loaded")])  # a bypassed graph: compiled where no cache can keep it
def test_what_a_case_did_is_read_from_the_graphs_it_found_and_compiled(hits, misses, bypasses, outcome):
    assert compile_cache.outcome(hits, misses, bypasses) == outcome


def test_workers_are_given_the_runs_cache_else_a_folder_of_the_run_directory(tmp_path):
    store = RunStore(tmp_path / "run")
    own = Workers(store, worker_start="fresh")._environment(None, 1, None)[child_env.ARTIFACT_CACHE]
    given = Workers(store, worker_start="fresh", cache=tmp_path / "cache")._environment(None, 1, None)
    assert Path(own) == store.root / "compile-cache" / "artifacts"
    assert Path(given[child_env.ARTIFACT_CACHE]) == tmp_path / "cache"


def test_artifacts_torch_cannot_save_leave_the_measurement_and_say_why(tiny_case, monkeypatch, tmp_path):
    from flux2bench import compile_artifacts
    from flux2bench.artifact_cache import ArtifactCache

    def refuse():
        raise RuntimeError("cannot pickle a tensor subclass")

    monkeypatch.setattr(compile_artifacts, "saved_from_torch", refuse)
    case = tiny_case(compile="regional", warmup=1, compile_cache="portable")
    code = compile_artifacts.CompiledCode(ArtifactCache(tmp_path), {"case": case.key})
    observed = compile_cache.CompileCacheObservation(case, code, code.restore(), {})
    assert observed._store(1.0, 2) == {"not_stored": "torch could not save its artifacts: RuntimeError: cannot "
                                                     "pickle a tensor subclass"}


def test_graphs_the_inductor_cache_cannot_keep_are_compiled_stored_nowhere_and_counted(tiny_case, monkeypatch,
                                                                                        tmp_path):
    from flux2bench import compile_artifacts
    from flux2bench.artifact_cache import ArtifactCache
    from flux2bench.axes import compile

    counts = {"fxgraph_hit": 0, "fxgraph_miss": 0, "fxgraph_bypass": 0}
    monkeypatch.setattr(compile, "compile_counts", lambda: dict(counts))
    case = tiny_case(compile="regional", warmup=1, compile_cache="portable")
    code = compile_artifacts.CompiledCode(ArtifactCache(tmp_path), {"case": case.key})
    observed = compile_cache.CompileCacheObservation(case, code, code.restore(), {})
    counts["fxgraph_bypass"] = 2  # the measured calls compiled two graphs outside the cache
    found = observed.found()
    assert found["outcome"] == "compiled" and found["not_cacheable"]["graphs"] == 2
    assert "stored" not in found and code.restore().artifacts is None  # the next run compiles them again


class _Transformer:
    config = {"num_layers": 1}


def test_the_cases_triton_kernel_files_are_stored_with_its_artifacts_and_put_in_place_for_the_next_case(
        tiny_case, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from flux2bench import compile_artifacts

    monkeypatch.setattr(compile_artifacts, "saved_from_torch", lambda: (b"artifacts", {"inductor": 2}))
    monkeypatch.setattr(compile_artifacts, "load_into_torch", lambda data: (0.01, {"inductor": 2}))
    monkeypatch.setenv(child_env.ARTIFACT_CACHE, str(tmp_path / "cache"))
    case = tiny_case(compile="regional", warmup=1, compile_cache="portable")
    pipe = SimpleNamespace(transformer=_Transformer())
    files = {"ab12/triton_poi_fused_0.cubin": b"kernel", "__grp__ab12.json": b"{}"}
    compile_artifacts.put_kernels(files, tmp_path / "first")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "first"))
    first = compile_cache.AXIS.observe(pipe, case, plan(case))
    assert first.entry.state == "miss"
    assert first._store(30.0, 2)["kernels"] == {"files": 2, "bytes": 8}

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "second"))  # the next case's empty folder
    second = compile_cache.AXIS.observe(pipe, case, plan(case))
    assert (second.entry.state, second.loaded["kernels"]) == ("hit", {"files": 2, "bytes": 8})
    assert compile_artifacts.kernels_in(tmp_path / "second") == files


def observing(tiny_case, monkeypatch, tmp_path, handed_to_torch: list[bytes]):
    """The axis's ``observe`` of a case over ``tmp_path/cache`` with an empty Triton folder, and its entry's code;
    what it hands to torch is appended to ``handed_to_torch``."""
    from types import SimpleNamespace

    from flux2bench import compile_artifacts
    from flux2bench.artifact_cache import ArtifactCache

    def load(data: bytes) -> tuple[float, dict[str, int]]:
        handed_to_torch.append(data)
        return 0.01, {"inductor": 2}

    monkeypatch.setattr(compile_artifacts, "load_into_torch", load)
    monkeypatch.setenv(child_env.ARTIFACT_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    case = tiny_case(compile="regional", warmup=1, compile_cache="portable")
    pipe = SimpleNamespace(transformer=_Transformer())
    code = compile_artifacts.CompiledCode(ArtifactCache(tmp_path / "cache"),
                                          compile_cache.key_inputs(case, pipe.transformer, CPU))
    return (lambda: compile_cache.AXIS.observe(pipe, case, plan(case))), code


MADE_BY = {"case": "tiny-0123456789ab", "at": "2025-06-01T12:00:00+00:00", "compile_s": 30.0, "graphs_compiled": 2}


@pytest.mark.parametrize("kernels, in_the_way, reason", [
    ({"x": b"a file", "x/y": b"and a folder of the same name"}, None, "both a kernel file and a folder"),
    ({"k" * 300: b"a name no file system takes"}, None, "too long"),
    ({"ab12/triton_poi_fused_0.cubin": b"kernel"}, "ab12", "cannot be put in place: FileExistsError"),
], ids=["colliding-paths", "name-too-long", "a-file-where-a-folder-goes"])
def test_an_entry_whose_kernel_files_cannot_be_put_in_place_is_discarded_before_torch_loads_any_of_it(
        tiny_case, monkeypatch, tmp_path, kernels, in_the_way, reason):
    handed_to_torch: list[bytes] = []
    observe, code = observing(tiny_case, monkeypatch, tmp_path, handed_to_torch)
    code.store(b"artifacts", MADE_BY, kernels)
    if in_the_way:
        (tmp_path / "triton").mkdir()
        (tmp_path / "triton" / in_the_way).write_bytes(b"")
    observed = observe()
    assert observed.entry.state.startswith("stale: ") and reason in observed.entry.state
    assert (observed.loaded, handed_to_torch) == ({}, [])  # the case compiles, as with no entry
    assert not (tmp_path / "triton").exists() and code.restore().state == "miss"


def test_an_entry_torch_cannot_load_leaves_none_of_its_kernel_files_in_the_cases_triton_folder(
        tiny_case, monkeypatch, tmp_path):
    from flux2bench.compile_artifacts import StaleEntry

    observe, code = observing(tiny_case, monkeypatch, tmp_path, [])
    code.store(b"artifacts", MADE_BY, {"ab12/triton_poi_fused_0.cubin": b"kernel"})

    def refuse(data: bytes) -> tuple[float, dict[str, int]]:
        raise StaleEntry("torch could not load it: RuntimeError: bad pickle")

    monkeypatch.setattr("flux2bench.compile_artifacts.load_into_torch", refuse)
    observed = observe()
    assert (observed.entry.state, observed.loaded) == ("stale: torch could not load it: RuntimeError: bad pickle", {})
    assert not (tmp_path / "triton").exists() and code.restore().state == "miss"


def test_what_made_a_loaded_entry_comes_into_the_record_as_it_was_stored(tiny_case, monkeypatch, tmp_path):
    handed_to_torch: list[bytes] = []
    observe, code = observing(tiny_case, monkeypatch, tmp_path, handed_to_torch)
    code.store(b"artifacts", MADE_BY, {"ab12/triton_poi_fused_0.cubin": b"kernel"})
    observed = observe()
    assert (observed.entry.state, handed_to_torch) == ("hit", [b"artifacts"])
    assert observed.found()["made_by"] == MADE_BY


# --- compile, then load, on the tiny pipeline -----------------------------------------------------------------------

SCENARIO = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 2, repeats: 1, warmup: 1, timeout_s: 600, seeds: 0,
           prompts: a red fox, compile: regional, compile_fullgraph: true, compile_cache: portable,
           drift_baseline: "off"}
blocks:
  kept: {}
"""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same scenario run twice, each in a new run directory, over one cache folder."""
    root = tmp_path_factory.mktemp("compile-cache")
    scenario = root / "scenario.yaml"
    scenario.write_text(textwrap.dedent(SCENARIO))
    runs = []
    for name in ("first", "second"):
        store, cases = start_run(scenario, run_dir=root / name)
        (result,) = Runner(store, SupervisorConfig(cache=root / "cache")).run(cases)
        assert result.status == "ok", f"{result.reason}\n{result.error}"
        runs.append((store.root, result))
    return runs


@pytest.mark.slow
def test_the_first_run_compiles_and_stores_the_compiled_code(two_runs):
    _, first = two_runs[0]
    kept = first.setup.axes["compile_cache"]
    assert (kept["entry"], kept["outcome"]) == ("miss", "compiled")
    assert kept["stored"]["bytes"] > 0 and kept["stored"]["artifacts"]["inductor"] == 2
    assert first.setup.axes["compile"]["inductor_cache"] == "cold"
    events = first.setup.axes["compile"]["events"]  # one graph per block class, each compiled once
    assert (events["compilations"], events["recompilations"], events["graph_breaks"]) == (2, 0, 0)


@pytest.mark.slow
def test_the_second_run_loads_it_and_reports_both_compile_times(two_runs):
    (_, first), (_, second) = two_runs
    kept = second.setup.axes["compile_cache"]
    assert (kept["entry"], kept["outcome"], kept["key"]) == ("hit", "loaded", first.setup.axes["compile_cache"]["key"])
    assert second.setup.axes["compile"]["cache_counters"]["fxgraph_miss"] == 0
    assert kept["made_by"]["case"] == first.key
    assert kept["made_by"]["compile_s"] == first.setup.axes["compile_cache"]["compile_s"] > 0
    assert kept["load_s"] > 0 and kept["compile_s"] > 0 and "stored" not in kept


@pytest.mark.slow
def test_each_case_compiles_in_an_inductor_cache_of_its_own(two_runs):
    for run_dir, result in two_runs:
        assert any((run_dir / "compile-cache" / "isolated" / result.key).iterdir())


@pytest.mark.slow
def test_loaded_code_computes_what_the_compiled_code_computed(two_runs):
    latents = [load_file(str(run_dir / result.outputs[0].latents))["latents"] for run_dir, result in two_runs]
    assert torch.equal(latents[0], latents[1])
