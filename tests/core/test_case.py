"""The case: every committed record's case re-derives its key, its label and its stored form, so the axes' typed
settings read exactly what earlier versions wrote (CI gates keep those keys as baselines)."""

from __future__ import annotations

import json

import pytest

from flux2bench.identity import case_from_dict

from conftest import REPO

RECORDS = sorted((REPO / "reports").glob("**/results/*.json"))


def test_the_committed_records_are_all_found():
    assert len(RECORDS) >= 200


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(REPO / "reports")))
def test_every_committed_record_rederives_its_key_label_and_case(path):
    record = json.loads(path.read_text())
    stored = record["case"]
    case = case_from_dict({name: value for name, value in stored.items() if name != "key"})
    assert case.key == record["key"] == stored["key"]
    # Records written before the label put refs= ahead of the axes' trailing words hold the same words.
    assert sorted(case.label.split()) == sorted(record["label"].split())
    # Options added since a record was written take their defaults; everything it stored reads back the same.
    assert {name: value for name, value in case.to_dict().items() if name in stored} == stored
