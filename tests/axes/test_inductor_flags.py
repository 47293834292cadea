"""``inductor_preset``: flux-fast's inductor flags, or the same flags at torch's defaults, as a named preset, set after
loading (over what the quantization set) and before anything compiles, recorded with the values they replaced;
refused where nothing is compiled or a flag is gone."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config
from pydantic import ValidationError

from conftest import TINY
from flux2bench.axes import inductor_flags, registry
from flux2bench.axes.base import LoadPlan
from flux2bench.errors import Unsupported
from flux2bench.scenario import Block

CPU = torch.device("cpu")
FLUX_FAST = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
             "epilogue_fusion": False}


def plan(case) -> LoadPlan:
    return registry.plan_load(case, LoadPlan(device=CPU, home=CPU))


def test_the_flux_fast_preset_is_its_four_flags(tiny_case):
    assert inductor_flags.AXIS.flags(tiny_case(inductor_preset="flux-fast")) == FLUX_FAST
    assert inductor_flags.AXIS.flags(tiny_case()) == {}


def test_an_unknown_preset_is_refused_by_the_scenario():
    with pytest.raises(ValidationError):
        Block.model_validate({**TINY, "inductor_preset": "fastest"})


def test_the_flags_are_set_after_loading_over_what_quantization_set_and_recorded_with_what_they_replaced(tiny_case):
    case = tiny_case(inductor_preset="flux-fast", compile="regional", warmup=1)
    untouched = {name: getattr(inductor_config, name) for name in FLUX_FAST}
    quantized = {**untouched, "coordinate_descent_tuning": True, "epilogue_fusion": True}  # as torchao's FP8 leaves it
    with inductor_config.patch(quantized):  # puts the flags back when the test ends
        inductor_flags.AXIS.check(case, plan(case))
        assert inductor_flags.AXIS.before_load(case, plan(case)) is None  # nothing is set before loading
        applied = inductor_flags.AXIS.apply(None, case, plan(case))
        assert {name: getattr(inductor_config, name) for name in FLUX_FAST} == FLUX_FAST
    assert {name: getattr(inductor_config, name) for name in FLUX_FAST} == untouched
    assert applied["flags"] == FLUX_FAST and applied["before"] == quantized and applied["preset"] == "flux-fast"
    assert applied["in_effect"] == FLUX_FAST and "after loading" in applied["method"]
    assert "inductor=flux-fast" in case.label


def test_torch_defaults_undoes_the_coordinate_descent_tuning_torchaos_fp8_turned_on(tiny_case):
    case = tiny_case(inductor_preset="torch-defaults", compile="regional", warmup=1)
    with inductor_config.patch({"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}):
        applied = inductor_flags.AXIS.apply(None, case, plan(case))
    assert applied["before"]["coordinate_descent_tuning"] is True
    assert applied["in_effect"]["coordinate_descent_tuning"] is False


def test_torch_defaults_are_torchs_own_defaults():
    assert inductor_flags.PRESETS["torch-defaults"] == {name: inductor_config._config[name].default
                                                        for name in FLUX_FAST}
    assert set(inductor_flags.PRESETS["torch-defaults"]) == set(FLUX_FAST)


def test_a_compiled_case_records_the_flags_in_effect_after_loading_whoever_set_them(tiny_case):
    compiled, eager = tiny_case(compile="regional", warmup=1), tiny_case()
    # torchao's FP8 config sets coordinate descent tuning as it quantizes, without a preset
    with inductor_config.patch({"coordinate_descent_tuning": True, "epilogue_fusion": True}):
        found = inductor_flags.AXIS.apply(None, compiled, plan(compiled))
    assert found["in_effect"]["coordinate_descent_tuning"] is True and found["in_effect"]["epilogue_fusion"] is True
    assert set(found["in_effect"]) == set(FLUX_FAST) and "after loading" in found["in_effect_method"]
    assert inductor_flags.AXIS.apply(None, eager, plan(eager)) is None


def test_a_preset_on_a_case_that_compiles_nothing_is_refused(tiny_case):
    case = tiny_case(inductor_preset="flux-fast")
    with pytest.raises(Unsupported, match="this case compiles nothing"):
        inductor_flags.AXIS.check(case, plan(case))


def test_a_flag_this_torch_does_not_have_is_refused_naming_it(tiny_case, monkeypatch):
    monkeypatch.setitem(inductor_flags.PRESETS, "flux-fast", {**FLUX_FAST, "a_flag_torch_dropped": True})
    case = tiny_case(inductor_preset="flux-fast", compile="regional", warmup=1)
    with pytest.raises(Unsupported, match="no flag a_flag_torch_dropped"):
        inductor_flags.AXIS.check(case, plan(case))


def test_the_preset_is_out_of_the_key_at_its_default_and_off_in_a_drift_baseline(tiny_case):
    assert tiny_case(inductor_preset="none").key == tiny_case().key
    assert registry.drift_baseline_values()["inductor_preset"] == "none"
