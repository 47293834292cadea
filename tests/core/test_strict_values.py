"""No value is silently read as another, no out-of-range value is accepted, no option is silently ignored."""

from __future__ import annotations

import textwrap

import pytest
import torch
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.scenario import MAX_SEED, ScenarioError, load_cases
from records import result, write_run


def invoke(*args) -> tuple[int, str]:
    outcome = CliRunner().invoke(app, [str(a) for a in args])
    return outcome.exit_code, " ".join(outcome.output.split())


def scenario(write_scenario, body: str):
    return write_scenario(textwrap.dedent("""
        defaults: {model: tiny, device: cpu}
        blocks:
          main: {%s}
    """ % body))


@pytest.mark.parametrize("value", ["1:30", "0x10", "0o10", "0b10"], ids=["base-60", "hex", "octal", "binary"])
def test_an_integer_is_a_decimal_literal(write_scenario, value):
    with pytest.raises(ScenarioError, match="field 'steps'"):
        load_cases(scenario(write_scenario, f"steps: {value}"))


def test_a_leading_zero_is_decimal_as_in_yaml_1_2(write_scenario):
    [case] = load_cases(scenario(write_scenario, "steps: 010"))
    assert case.steps == 10


@pytest.mark.parametrize("body, where", [("steps: true", "field 'steps'"),
                                         ("seeds: [0, false]", "field 'seeds' item 2"),
                                         ("repeats: true", "field 'repeats'"),
                                         ("drift: {min_psnr: true}", "field 'drift.min_psnr'")])
def test_a_boolean_is_not_a_number(write_scenario, body, where):
    with pytest.raises(ScenarioError, match=f"block 'main', {where}: (true|false) is a boolean, not a number$"):
        load_cases(scenario(write_scenario, body))


def test_a_boolean_in_defaults_is_one_problem_of_defaults_not_one_per_block(write_scenario):
    path = write_scenario("defaults: {model: tiny, device: cpu, steps: true}\nblocks: {a: {}, b: {resolution: 64}}\n")
    with pytest.raises(ScenarioError) as refused:
        load_cases(path)
    assert str(refused.value) == f"{path}, defaults, field 'steps': true is a boolean, not a number"


@pytest.mark.parametrize("body, field", [(f"seeds: {MAX_SEED + 1}", "seeds"), ("drift: {min_ssim: 7}", "min_ssim"),
                                         ("drift: {min_ms_ssim: -2}", "min_ms_ssim"),
                                         ("drift: {max_mae: 300}", "max_mae"),
                                         ("drift: {min_psnr: -1}", "min_psnr"), ("drift: {min_psnr: 1000}", "min_psnr"),
                                         ("drift: {min_latent_cosine: 1.5}", "min_latent_cosine"),
                                         ("drift: {max_latent_rel_l2: -0.1}", "max_latent_rel_l2")])
def test_a_value_outside_its_range_is_refused(write_scenario, body, field):
    with pytest.raises(ScenarioError, match=field):
        load_cases(scenario(write_scenario, body))


def test_the_largest_seed_is_one_the_generator_takes(write_scenario):
    [case] = load_cases(scenario(write_scenario, f"seeds: {MAX_SEED}"))
    torch.Generator().manual_seed(case.seeds[0])


@pytest.mark.parametrize("price", ["H100=-2", "H100=nan", "H100=inf", "=2"])
def test_a_negative_or_not_finite_price_exits_2(tmp_path, price):
    run = write_run(tmp_path / "run", [result()])
    code, output = invoke("report", run, "--price", price)
    assert code == 2 and f"--price {price!r}" in output


def test_gate_overrides_for_a_block_neither_run_has_exit_2(tmp_path):
    run = write_run(tmp_path / "run", [result()])
    rules = tmp_path / "gate.yaml"
    rules.write_text("blocks:\n  mian:\n    s_per_image: {threshold: 0.2}\n")
    code, output = invoke("compare", run, run, "--rules", rules)
    assert code == 2 and "the gate rules override blocks that neither run has: mian" in output


@pytest.mark.parametrize("option", ["--drift-only", "--retry-failed"])
def test_a_resume_option_without_resume_exits_2_and_creates_nothing(write_scenario, tmp_path, option):
    code, output = invoke("run", scenario(write_scenario, ""), "--out", tmp_path / "out", option)
    assert code == 2 and f"{option} continues a run: give it with --resume RUN_DIR" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_devices_on_a_machine_without_a_gpu_exit_2(write_scenario, tmp_path):
    code, output = invoke("run", scenario(write_scenario, ""), "--out", tmp_path / "out", "--devices", "0,1")
    assert code == 2 and "--devices 0,1: this machine has no NVIDIA GPU" in output
    assert not (tmp_path / "out").exists()
