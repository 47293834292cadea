"""What identifies a case: its key and label, made once when the case is made, and the parts of it that a drift
baseline and a card's answer share.

One list, derived from the ``role`` of each ``Case`` field (``flux2bench.case``) and from the axes' option
metadata (``keyed_when_default``, ``emulation``): the key covers what is computed, how it is measured and where;
the workload is what a drift baseline shares; the setup is what a card owner sets up, whatever cap it ran under.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from typing import Any

from flux2bench.axes import registry
from flux2bench.case import MEASUREMENT, PLACEMENT, WORKLOAD, Case

_DERIVED = ("key", "label")


def _fields_of(*roles: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(Case) if f.metadata["role"] in roles)


WORKLOAD_FIELDS = _fields_of(WORKLOAD)
KEYED_FIELDS = _fields_of(WORKLOAD, MEASUREMENT, PLACEMENT)
SETUP_FIELDS = _fields_of(WORKLOAD, PLACEMENT)
MEASUREMENT_FIELDS = _fields_of(MEASUREMENT)
_CASE_FIELDS = frozenset(f.name for f in fields(Case)) - {"settings"}
_TUPLES = ("reference_image_size", "seeds", "prompts")


def new_case(**values: Any) -> Case:
    """A case from its fields (``settings`` holds the axes' options; one missing takes its default), with its key
    and label derived."""
    values = {name: value for name, value in values.items() if name not in _DERIVED}
    values["settings"] = {**registry.defaults(), **values.get("settings", {})}
    for name in _TUPLES:
        if name in values:
            values[name] = tuple(values[name])
    values["drift_thresholds"] = tuple(tuple(pair) for pair in values.get("drift_thresholds", ()))
    provisional = Case(**values, key="", label="")
    return replace(provisional, key=case_key(provisional), label=case_label(provisional))


def case_from_dict(data: dict[str, Any]) -> Case:
    """A case from the flat form records store (``Case.to_dict``); an option missing from an older record takes
    its default. Raises ValueError for a field no case has."""
    options = set(registry.defaults())
    unknown = set(data) - _CASE_FIELDS - options
    if unknown:
        raise ValueError(f"unknown case fields {sorted(unknown)}")
    core = {name: value for name, value in data.items() if name in _CASE_FIELDS}
    return new_case(**core, settings={name: value for name, value in data.items() if name in options})


def changed(case: Case, **changes: Any) -> Case:
    """A copy with some fields or axis options changed, and its own key and label."""
    return case_from_dict({**case.to_dict(), **changes})


def _identity(case: Case, names: tuple[str, ...], with_option: Any) -> dict[str, Any]:
    data = case.to_dict()
    own = {name: data[name] for name in names}
    options = {o.name: data[o.name] for o in registry.options() if with_option(o, case.settings[o.name])}
    return own | options


def case_key(case: Case) -> str:
    """A stable identifier: the block name plus a hash of everything that defines the measurement.

    Options added after the first release enter the hash only when they differ from their default, so every
    key of an earlier run stays what it was.
    """
    identity = _identity(case, KEYED_FIELDS,
                         lambda option, value: option.keyed_when_default or value != option.default)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:12]
    return f"{case.block}-{digest}"


def setup_identity(case: Case) -> str:
    """What a case runs, whatever its block, its repeats and the cap it ran under: an OOM under one emulated cap
    speaks for the same setup under others."""
    return json.dumps(_identity(case, SETUP_FIELDS, lambda option, value: not option.emulation), sort_keys=True)


def workload(case: Case) -> tuple[Any, ...]:
    """What a case and its drift baseline must share: the same model, weights and workload."""
    return tuple(getattr(case, name) for name in WORKLOAD_FIELDS)


def case_label(case: Case) -> str:
    heads, tails = registry.label_words(case)
    refs = [f"refs={case.reference_images}"] if case.reference_images else []
    return " ".join([case.model, *heads, f"{case.width}x{case.height}", f"{case.steps}steps", *refs, *tails])
