"""The recipe's ingredient blocks of scenarios/fastest.yaml: each measures one ingredient, so each of its cases differs
from its base block's case in that ingredient's options and nothing else (a step count or a resolution changed in
one block alone would be read as the ingredient's gain)."""

from __future__ import annotations

from dataclasses import fields
from functools import cache

import pytest
from doc_tables import REPO

from flux2bench.case import Case
from flux2bench.scenario import load_cases

BOOKKEEPING = {"block", "key", "label", "timeout_s"}

# block: (its base block, the options it may change)
INGREDIENTS = {
    "recipe-flags": ("recipe-base", {"inductor_preset"}),
    "recipe-torch-flags": ("recipe-base", {"inductor_preset"}),
    "recipe-fp8-attention": ("recipe-base", {"attention_precision"}),
    "recipe-modes": ("recipe-base", {"compile_mode"}),
    "recipe-quick-fp8-attention": ("recipe-torch-flags", {"attention_precision"}),
    "recipe-quick-full": ("recipe-torch-flags", {"compile", "compile_mode", "attention_precision"}),
    # the recipe, regional: max-autotune and flux-fast's flags over the quick blocks, so that they are its gain
    "recipe": ("recipe-quick-fp8-attention", {"compile_mode", "inductor_preset"}),
    "recipe-bf16-attention": ("recipe-torch-flags", {"compile_mode", "inductor_preset"}),
}


@cache
def _block(name: str) -> list[Case]:
    return load_cases(REPO / "scenarios" / "fastest.yaml", blocks=[name])


def _values(case: Case) -> dict[str, object]:
    values = {f.name: getattr(case, f.name) for f in fields(Case) if f.name not in BOOKKEEPING | {"settings"}}
    return {**values, **case.settings}


def _differences(case: Case, base: Case) -> set[str]:
    mine, theirs = _values(case), _values(base)
    return {name for name in mine.keys() | theirs.keys() if mine.get(name) != theirs.get(name)}


@pytest.mark.parametrize("block", sorted(INGREDIENTS))
def test_an_ingredient_block_changes_only_its_ingredient_over_its_base(block):
    base_name, allowed = INGREDIENTS[block]
    (base,) = _block(base_name)
    changed = {name for case in _block(block) for name in _differences(case, base)}
    assert changed and changed <= allowed


def test_the_quick_base_is_todays_best_without_coordinate_descent_tuning():
    (quick_base,), (todays_best,) = _block("recipe-torch-flags"), _block("recipe-base")
    assert _differences(quick_base, todays_best) == {"inductor_preset"}
    assert quick_base.settings["inductor_preset"] == "torch-defaults"


def test_the_quick_klein_block_is_the_quick_full_block_on_klein_4b_with_its_steps_and_guidance():
    klein, dev = _block("recipe-quick-klein-4b"), _block("recipe-quick-full")
    fp8_klein = [case for case in klein if case.settings["precision"] == "fp8_row"]
    assert len(fp8_klein) == len(dev)
    for klein_case, dev_case in zip(fp8_klein, dev, strict=True):
        assert _differences(klein_case, dev_case) == {"model", "steps", "guidance_scale"}  # each model's own
