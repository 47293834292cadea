"""Scenario files: validation with messages that say where, and expansion of blocks into cases."""

from __future__ import annotations

import json
import re

import pytest

from flux2bench import scenario
from flux2bench.identity import case_from_dict
from flux2bench.scenario import (AXES, MAX_BLOCK_NAME, MAX_CASES, MAX_YAML_VALUES, ScenarioError, case_limit,
                                 load_cases, load_scenario)


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
    ("resolution: 10240x1024", "resolution", "at most 8192"),
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
    assert message == f"{path}, field 'blockz': unknown field; did you mean 'blocks'?"


def test_errors_of_several_blocks_are_all_reported(error_of):
    _, message = error_of("blocks:\n  a: {steps: 0}\n  b: {stepz: 4}\n")
    assert "block 'a', field 'steps" in message
    assert "block 'b', field 'stepz': unknown field" in message


def test_a_bad_default_is_reported_once_against_defaults(error_of):
    path, message = error_of("defaults:\n  steps: 0\n  stepz: 1\nblocks:\n  a: {}\n  b: {}\n  c: {steps: 4}\n")
    assert message.splitlines() == [f"{path}, defaults, field 'steps': Input should be greater than or equal to 1",
                                    f"{path}, defaults, field 'stepz': unknown field; did you mean 'steps'?"]


def test_a_block_that_overrides_a_bad_default_reports_only_its_own_errors(error_of):
    _, message = error_of("defaults:\n  steps: 0\nblocks:\n  a: {steps: 4, seeds: -1}\n")
    assert "defaults, field 'steps'" in message
    assert "block 'a', field 'seeds'" in message and "block 'a', field 'steps'" not in message


def test_a_rule_between_fields_is_checked_in_each_block_that_inherits_the_defaults(error_of):
    _, message = error_of("defaults: {model: tiny, weights: pretrained}\nblocks:\n  a: {source: /x}\n  b: {}\n")
    assert "block 'b'" in message and "source" in message
    assert "block 'a'" not in message and "defaults" not in message


@pytest.mark.parametrize("body, location", [
    ("steps: [4, 0]", "field 'steps' item 2:"),
    ("steps: 0", "field 'steps':"),
    ("resolution: [512, 1000]", "field 'resolution' item 2:"),
    ("prompts: [fox, 3]", "field 'prompts' item 2: 3 is not a prompt"),
    ("drift: {min_psnr: x}", "field 'drift.min_psnr':"),
])
def test_a_bad_item_of_a_list_is_named_by_its_position_and_a_single_value_by_its_field(error_of, body, location):
    _, message = error_of(f"blocks:\n  main:\n    {body}\n")
    assert f"block 'main', {location}" in message


def test_a_yaml_syntax_error_gives_line_and_column(error_of):
    path, message = error_of("blocks:\n  main:\n    steps: 4: 5\n")
    assert message.startswith(f"{path}: YAML syntax error")
    assert re.search(r"line 3, column \d+", message)


def test_a_file_that_is_not_utf8_is_reported_with_the_byte_position(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("blocks:\n  main:\n    prompts: a café\n".encode("latin-1"))
    with pytest.raises(ScenarioError) as raised:
        load_cases(path)
    assert str(raised.value) == (f"{path}: not UTF-8 text: the byte at offset 34 (line 3) is 0xe9; "
                                 "save the file as UTF-8")


def test_a_missing_file_is_a_scenario_error(tmp_path):
    with pytest.raises(ScenarioError, match=re.escape(f"{tmp_path / 'nope.yaml'}: no such file")):
        load_cases(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "- a list\n", "blocks: {}\n", "name: x\n"])
def test_a_file_without_blocks_is_rejected(error_of, text):
    path, message = error_of(text)
    assert message.startswith(path)
    assert "blocks" in message


def test_a_block_name_is_at_most_the_limit_since_case_keys_name_files(cases_of, error_of):
    longest = "b" * MAX_BLOCK_NAME
    (case,) = cases_of(f"blocks:\n  {longest}: {{}}\n")
    assert len(f"{case.key}.json") < 255
    path, message = error_of(f"blocks:\n  {longest}x: {{}}\n")
    assert message == (f"{path}, block '{'b' * 40}...': a block name has at most {MAX_BLOCK_NAME} characters (it is "
                       f"part of the case keys, which name files); this one has {MAX_BLOCK_NAME + 1}")


def test_a_block_name_with_a_space_is_rejected_naming_the_block(error_of):
    path, message = error_of("blocks:\n  'a b': {}\n")
    assert message == f"{path}, block 'a b': a block name has only letters, digits, '_', '.' and '-'"


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


def billion_laughs(levels: int) -> str:
    """Each anchor refers nine times to the previous one: the last expands to 9**levels strings."""
    lines = ["laughs:", "  - &l0 lol"]
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nblocks:\n  main:\n    prompts: [{{scene: *l{levels}}}]\n"


def test_a_document_whose_aliases_expand_beyond_the_limit_is_refused_with_its_size(error_of):
    path, message = error_of(billion_laughs(9))
    match = re.fullmatch(rf"{re.escape(str(path))}: the YAML expands to ([\d,]+) values once its aliases \(\*name\) "
                         rf"are replaced by what they refer to; the limit is {MAX_YAML_VALUES:,}", message)
    assert match and int(match.group(1).replace(",", "")) > 9 ** 9


def test_a_few_aliases_within_the_limit_are_fine(cases_of):
    (case,) = cases_of("defaults: &common {model: tiny, steps: 2}\nblocks:\n  main: *common\n")
    assert (case.model, case.steps) == ("tiny", 2)


def test_an_alias_inside_its_own_anchor_is_refused(error_of):
    path, message = error_of("blocks:\n  main:\n    prompts: &p [*p]\n")
    assert message == f"{path}: the value at line 3 contains an alias to itself"


def test_a_document_nested_too_deeply_is_refused(error_of):
    path, message = error_of("blocks:\n  main:\n    steps: " + "[" * 5000 + "]" * 5000 + "\n")
    assert message == f"{path}: the YAML is nested too deeply"


HUGE_MATRIX = """
blocks:
  main:
    steps: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    seeds: 0
    resolution: [16, 32, 48, 64, 80, 96, 112, 128, 144, 160]
    reference_images: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    precision: [bf16, nf4, fp8, fp8_row]
    offload: [none, model, sequential, group_leaf, group_block]
    text_encoder: [local, precomputed]
    low_cpu_mem_usage: [false, true]
    attention: [sdpa, fa3, native, _native_math, flash]
    model: [flux2-dev, tiny]
"""


def test_a_matrix_beyond_the_case_limit_is_refused_before_it_is_expanded(error_of, monkeypatch):
    monkeypatch.setattr(scenario, "expand_block", lambda *args: pytest.fail("expanded a matrix beyond the limit"))
    path, message = error_of(HUGE_MATRIX)
    total = 12 * 10 * 11 * 4 * 5 * 2 * 2 * 5 * 2
    assert total > 1_000_000
    assert message == (f"{path}: the blocks expand to {total:,} cases (before exclude rules; the largest, block "
                       f"'main', has {total:,}), more than the limit of {MAX_CASES:,}; to run them anyway, raise the "
                       f"limit: --max-cases {total}")


def test_the_case_limit_can_be_raised_or_lowered(write_scenario):
    path = write_scenario("blocks:\n  a: {steps: [1, 2, 3]}\n  b: {steps: [1, 2]}\n")
    assert len(load_cases(path, max_cases=5)) == 5
    with pytest.raises(ScenarioError, match="expand to 5 cases .* limit of 4; .* --max-cases 5"):
        load_cases(path, max_cases=4)
    with case_limit(4), pytest.raises(ScenarioError, match="limit of 4"):
        load_cases(path)
    assert len(load_cases(path, blocks=["a"], max_cases=3)) == 3


def test_pretrained_tiny_weights_need_a_source(error_of):
    _, message = error_of("blocks:\n  main:\n    model: tiny\n    weights: pretrained\n")
    assert "block 'main'" in message and "source" in message


# --- what a value means -----------------------------------------------------------------------------------

def test_only_true_and_false_are_yaml_booleans_so_off_and_no_mean_what_the_user_wrote(cases_of):
    (case,) = cases_of("blocks:\n  main:\n    drift_baseline: off\n    offload: group_leaf\n    use_stream: no\n"
                       "    record_stream: TRUE\n")
    assert case.drift_baseline == "off"
    assert case.settings["use_stream"] is False and case.settings["record_stream"] is True


@pytest.mark.parametrize("field, quoted, plain", [("reference_images", "'2'", "2"), ("steps", '"4"', "4"),
                                                  ("resolution", "'512'", "512"), ("seeds", "'7'", "7")])
def test_a_number_written_as_a_string_is_that_number(cases_of, field, quoted, plain):
    (written_quoted,) = cases_of(f"blocks:\n  main: {{{field}: {quoted}}}\n", "quoted.yaml")
    (written_plain,) = cases_of(f"blocks:\n  main: {{{field}: {plain}}}\n", "plain.yaml")
    assert written_quoted == written_plain and written_quoted.key == written_plain.key


def test_a_string_that_is_not_a_number_is_still_rejected(error_of):
    _, message = error_of("blocks:\n  main: {reference_images: 'two'}\n")
    assert "field 'reference_images': Input should be a valid integer" in message


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


def test_an_exclude_rule_with_a_list_of_values_drops_every_case_with_one_of_them(cases_of):
    cases = cases_of("""
        blocks:
          main:
            resolution: [128, 256, 512]
            steps: [2, 3]
            exclude:
              - {resolution: [256, 128], steps: 3}
    """)
    assert sorted((c.width, c.steps) for c in cases) == [(128, 2), (256, 2), (512, 2), (512, 3)]


def test_an_exclude_rule_listing_every_value_of_an_axis_empties_the_block(error_of):
    _, message = error_of("blocks:\n  main:\n    steps: [2, 3]\n    exclude:\n      - {steps: [3, 2]}\n")
    assert "exclude rules remove every case" in message


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


def test_every_quantization_backend_is_a_precision_of_both_components(cases_of):
    cases = cases_of("blocks:\n  main: {precision: [bf16, nf4, fp8, fp8_row, int8]}\n")
    assert sorted((c.settings["precision"], c.settings["text_encoder_precision"]) for c in cases) == [
        ("bf16", "bf16"), ("fp8", "fp8"), ("fp8_row", "fp8_row"), ("int8", "int8"), ("nf4", "nf4")]


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
        back = case_from_dict(json.loads(json.dumps(case.to_dict())))
        assert back == case
        assert back.key == case.key
        assert back.reference_image_size == (64, 32) and isinstance(back.seeds, tuple)


def test_load_scenario_returns_the_validated_blocks(write_scenario):
    scenario, blocks = load_scenario(write_scenario("name: demo\nblocks:\n  main: {steps: [1, 2]}\n"))
    assert scenario.name == "demo"
    assert list(blocks) == ["main"] and blocks["main"].steps == [1, 2]
    assert set(AXES) <= set(type(blocks["main"]).model_fields)
