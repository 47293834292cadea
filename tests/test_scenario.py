"""Scenario files: validation with messages that say where, and expansion of blocks into cases."""

from __future__ import annotations

import json
import re

import pytest

from flux2bench.scenario import AXES, Case, ScenarioError, load_cases, load_scenario


@pytest.fixture
def cases_of(write_scenario):
    """``cases_of(text)``: the cases a scenario text expands to."""
    return lambda text, name="scenario.yaml": load_cases(write_scenario(text, name))


@pytest.fixture
def error_of(write_scenario):
    """``error_of(text)``: (file path, message) of the ScenarioError a scenario text raises."""
    def error(text: str) -> tuple[str, str]:
        path = write_scenario(text, "bad.yaml")
        with pytest.raises(ScenarioError) as raised:
            load_cases(path)
        return str(path), str(raised.value)

    return error


# --- validation: every bad input names the file, the block and the field -----------------------------

@pytest.mark.parametrize("body, field, problem", [
    ("stepz: 4", "stepz", "unknown field"),
    ("steps: many", "steps", "valid integer"),
    ("steps: [4, 0]", "steps", "greater than or equal to 1"),
    ("reference_images: 11", "reference_images", "less than or equal to 10"),
    ("resolution: 1000", "resolution", "multiple of 16"),
    ("resolution: 1024x1000", "resolution", "multiple of 16"),
    ("resolution: big", "resolution", "WIDTHxHEIGHT"),
    ("resolution: true", "resolution", "not a resolution"),
    ("precision: fp4", "precision", "bf16"),
    ("offload: disk", "offload", "group_leaf"),
    ("attention: 'flash attn'", "attention", "not an attention backend name"),
    ("prompts: '  '", "prompts", "must not be empty"),
    ("steps: []", "steps", "at least 1 item"),
    ("exclude: {steps: 4}", "exclude", "valid list"),
])
def test_a_bad_field_in_a_block_is_reported_with_file_block_and_field(error_of, body, field, problem):
    path, message = error_of(f"blocks:\n  good: {{}}\n  main:\n    model: tiny\n    {body}\n")
    assert message.startswith(path)
    assert "block 'main'" in message and "block 'good'" not in message
    assert f"field '{field}" in message
    assert problem in message


def test_an_unknown_top_level_key_is_reported_with_file_and_field(error_of):
    path, message = error_of("blockz: {}\nblocks:\n  main: {}\n")
    assert message == f"{path}, field 'blockz': unknown field"


def test_errors_of_several_blocks_are_all_reported(error_of):
    _, message = error_of("blocks:\n  a: {steps: 0}\n  b: {stepz: 4}\n")
    assert "block 'a', field 'steps" in message
    assert "block 'b', field 'stepz': unknown field" in message


def test_a_bad_default_is_reported_for_each_block_it_is_merged_into(error_of):
    _, message = error_of("defaults:\n  steps: 0\nblocks:\n  a: {}\n  b: {}\n")
    assert "block 'a', field 'steps" in message and "block 'b', field 'steps" in message


def test_a_yaml_syntax_error_gives_line_and_column(error_of):
    path, message = error_of("blocks:\n  main:\n    steps: 4: 5\n")
    assert message.startswith(f"{path}: YAML syntax error")
    assert re.search(r"line 3, column \d+", message)


def test_a_missing_file_is_a_scenario_error(tmp_path):
    with pytest.raises(ScenarioError, match=re.escape(f"{tmp_path / 'nope.yaml'}: no such file")):
        load_cases(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "- a list\n", "blocks: {}\n", "name: x\n"])
def test_a_file_without_blocks_is_rejected(error_of, text):
    path, message = error_of(text)
    assert message.startswith(path)
    assert "blocks" in message


def test_a_block_that_is_not_a_mapping_is_rejected(error_of):
    _, message = error_of("blocks:\n  main: [1, 2]\n")
    assert "block 'main'" in message


def test_an_exclude_rule_naming_an_unknown_axis_is_rejected(error_of):
    path, message = error_of("blocks:\n  main:\n    steps: [4, 8]\n    exclude:\n      - {seed: 0}\n")
    assert message.startswith(f"{path}, block 'main'")
    assert "exclude rule" in message and "'seed'" in message


def test_exclude_rules_that_remove_every_case_are_an_error(error_of):
    path, message = error_of("blocks:\n  main:\n    steps: [4, 8]\n    exclude:\n      - {model: flux2-dev}\n")
    assert message.startswith(path)
    assert "exclude rules remove every case" in message


def test_a_block_whose_exclude_rules_remove_all_its_cases_is_an_error_naming_the_block(error_of):
    _, message = error_of("blocks:\n  kept: {}\n  emptied:\n    steps: [4, 8]\n    exclude:\n"
                          "      - {model: flux2-dev}\n")
    assert "block 'emptied'" in message


def test_a_bad_resolution_in_an_exclude_rule_is_a_scenario_error(error_of):
    _, message = error_of("blocks:\n  main:\n    steps: [4, 8]\n    exclude:\n      - {resolution: 1000}\n")
    assert "block 'main'" in message and "exclude" in message


def test_pretrained_tiny_weights_need_a_source(error_of):
    _, message = error_of("blocks:\n  main:\n    model: tiny\n    weights: pretrained\n")
    assert "block 'main'" in message and "source" in message


# --- expansion ----------------------------------------------------------------------------------------

def test_one_value_and_a_one_item_list_are_the_same_axis(cases_of):
    single = cases_of("blocks:\n  main: {steps: 4, resolution: 512}\n", "a.yaml")
    listed = cases_of("blocks:\n  main: {steps: [4], resolution: [512]}\n", "b.yaml")
    assert len(single) == 1
    assert single == listed and [c.key for c in single] == [c.key for c in listed]


def test_a_block_expands_to_the_cartesian_product_of_its_axes(cases_of):
    cases = cases_of("""
        blocks:
          main:
            precision: [bf16, fp8]
            offload: [none, model, sequential]
            resolution: [512, 1024x768]
            steps: 4
    """)
    assert len(cases) == 2 * 3 * 2
    combos = {(c.settings["precision"], c.settings["offload"], c.width, c.height) for c in cases}
    assert len(combos) == 12
    assert ("fp8", "sequential", 1024, 768) in combos
    assert {c.steps for c in cases} == {4}


def test_seeds_and_prompts_are_not_axes_but_belong_to_every_case(cases_of):
    (case,) = cases_of("blocks:\n  main: {seeds: [0, 1, 2], prompts: [a fox, a bird]}\n")
    assert case.seeds == (0, 1, 2) and case.prompts == ("a fox", "a bird")


def test_exclude_rules_drop_the_combinations_they_match(cases_of):
    cases = cases_of("""
        blocks:
          main:
            precision: [bf16, fp8]
            offload: [none, model]
            exclude:
              - {precision: fp8, offload: model}
    """)
    assert sorted((c.settings["precision"], c.settings["offload"]) for c in cases) == [("bf16", "model"), ("bf16", "none"),
                                                                 ("fp8", "none")]


@pytest.mark.parametrize("written", ["1024", "'1024'", "1024x1024", "[1024, 1024]"])
def test_an_exclude_rule_matches_a_resolution_however_it_is_written(cases_of, written):
    cases = cases_of(f"""
        blocks:
          main:
            resolution: [512, 1024x1024]
            exclude:
              - {{resolution: {written}}}
    """)
    assert [(c.width, c.height) for c in cases] == [(512, 512)]


def test_defaults_apply_to_every_block_and_a_block_overrides_them(cases_of):
    cases = cases_of("""
        defaults:
          model: tiny
          steps: 8
          device: cpu
        blocks:
          inherits: {}
          overrides:
            steps: [2, 3]
    """)
    by_block = {}
    for case in cases:
        by_block.setdefault(case.block, []).append(case)
    assert [c.steps for c in by_block["inherits"]] == [8]
    assert sorted(c.steps for c in by_block["overrides"]) == [2, 3]
    assert {(c.model, c.device) for c in cases} == {("tiny", "cpu")}


def test_the_text_encoder_precision_defaults_to_the_case_precision(cases_of):
    cases = cases_of("blocks:\n  main: {precision: [bf16, fp8]}\n  pinned: {precision: fp8, "
                     "text_encoder_precision: bf16}\n")
    assert {(c.block, c.settings["precision"], c.settings["text_encoder_precision"]) for c in cases} == {
        ("main", "bf16", "bf16"), ("main", "fp8", "fp8"), ("pinned", "fp8", "bf16")}


def test_a_case_listed_twice_is_kept_once(cases_of):
    assert len(cases_of("blocks:\n  main: {steps: [4, 4, 8]}\n")) == 2


def test_cases_come_in_file_order(cases_of):
    cases = cases_of("blocks:\n  zeta: {}\n  alpha: {steps: [1, 2]}\n")
    assert [(c.block, c.steps) for c in cases] == [("zeta", 50), ("alpha", 1), ("alpha", 2)]


def test_json_prompts_are_accepted_and_stored_as_canonical_json(cases_of):
    (case,) = cases_of("""
        blocks:
          main:
            prompts:
              - {scene: a red fox, style: {medium: photo, light: noon}}
              - plain text
    """)
    assert json.loads(case.prompts[0]) == {"scene": "a red fox", "style": {"medium": "photo", "light": "noon"}}
    assert case.prompts[1] == "plain text"


# --- case keys -----------------------------------------------------------------------------------------

SCENARIO = """
defaults:
  model: tiny
blocks:
  main:
    precision: [bf16, fp8]
    steps: 4
    resolution: 512x256
    prompts: [{scene: fox, style: photo}]
"""
REORDERED = """
blocks:
  main:
    prompts: [{style: photo, scene: fox}]
    resolution: 512x256
    steps: 4
    precision: [bf16, fp8]
defaults:
  model: tiny
"""


def test_case_keys_are_stable_across_loads(cases_of):
    first = [c.key for c in cases_of(SCENARIO, "one.yaml")]
    again = [c.key for c in cases_of(SCENARIO, "two.yaml")]
    assert first == again
    assert len(set(first)) == 2
    assert all(re.fullmatch(r"main-[0-9a-f]{12}", key) for key in first)


def test_case_keys_do_not_depend_on_the_order_of_yaml_keys(cases_of):
    assert {c.key for c in cases_of(SCENARIO, "one.yaml")} == {c.key for c in cases_of(REORDERED, "two.yaml")}


def test_the_same_settings_in_another_block_have_another_key(cases_of):
    cases = cases_of("blocks:\n  a: {steps: 4}\n  b: {steps: 4}\n")
    assert len(cases) == 2 and cases[0].key != cases[1].key


def test_every_measured_setting_changes_the_key(cases_of):
    base = "blocks:\n  main: {model: tiny, steps: 4, guidance_scale: 4.0, repeats: 3, seeds: 0}\n"
    variants = [base.replace("steps: 4", "steps: 5"), base.replace("4.0", "3.5"),
                base.replace("repeats: 3", "repeats: 4"), base.replace("seeds: 0", "seeds: 1")]
    keys = {cases_of(text, f"{i}.yaml")[0].key for i, text in enumerate([base] + variants)}
    assert len(keys) == 5


def test_timeout_is_not_part_of_the_key(cases_of):
    short = cases_of("blocks:\n  main: {timeout_s: 10}\n", "short.yaml")
    long = cases_of("blocks:\n  main: {timeout_s: 9000}\n", "long.yaml")
    assert short[0].timeout_s != long[0].timeout_s
    assert short[0].key == long[0].key


def test_a_case_round_trips_through_json(cases_of):
    for case in cases_of(SCENARIO + "    reference_images: 2\n    reference_image_size: 64x32\n"):
        back = Case.from_dict(json.loads(json.dumps(case.to_dict())))
        assert back == case
        assert back.key == case.key
        assert back.reference_image_size == (64, 32) and isinstance(back.seeds, tuple)


def test_load_scenario_returns_the_validated_blocks(write_scenario):
    scenario, blocks = load_scenario(write_scenario("name: demo\nblocks:\n  main: {steps: [1, 2]}\n"))
    assert scenario.name == "demo"
    assert list(blocks) == ["main"] and blocks["main"].steps == [1, 2]
    assert set(AXES) <= set(type(blocks["main"]).model_fields)
