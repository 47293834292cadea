"""What a run adds up to: run's exit code and its one-line summary, from the records of the cases it was asked for."""

from __future__ import annotations

import pytest

from flux2bench.exit_codes import EXIT_FAILED, EXIT_NOTHING_MEASURED, EXIT_OK
from flux2bench.outcome import run_outcome
from records import result


def records(*statuses: str):
    """One record per status, each of another case (so another key)."""
    return [result(status=status, steps=i + 1) for i, status in enumerate(statuses)]


def outcome_of(*statuses: str):
    made = records(*statuses)
    return run_outcome([r.key for r in made], made)


@pytest.mark.parametrize("statuses", [("ok",), ("ok", "oom", "host_oom", "unsupported"), ("oom",), ("host_oom",)])
def test_a_run_whose_cases_all_have_a_result_and_none_failed_exits_0(statuses):
    assert outcome_of(*statuses).exit_code == EXIT_OK


@pytest.mark.parametrize("failed", ["error", "timeout", "killed", "drift_fail"])
def test_a_run_with_a_failed_case_exits_1(failed):
    assert outcome_of("ok", failed).exit_code == EXIT_FAILED
    assert outcome_of("unsupported", failed).exit_code == EXIT_FAILED


def test_a_run_in_which_every_case_is_unsupported_measured_nothing_and_exits_3():
    assert outcome_of("unsupported", "unsupported").exit_code == EXIT_NOTHING_MEASURED


def test_a_case_without_a_record_counts_as_failed():
    made = records("ok", "ok")
    outcome = run_outcome([r.key for r in made], made[:1])
    assert outcome.exit_code == EXIT_FAILED
    assert outcome.missing == (made[1].key,)
    assert outcome.summary() == "2 cases: 1 ok, 1 without a result"


def test_records_of_cases_the_run_was_not_asked_for_do_not_count():
    asked, baseline = records("unsupported", "error")
    assert run_outcome([asked.key], [asked, baseline]).exit_code == EXIT_NOTHING_MEASURED


def test_the_summary_counts_each_status_in_a_fixed_order():
    assert outcome_of("unsupported", "ok", "oom", "ok").summary() == "4 cases: 2 ok, 1 oom, 1 unsupported"
    assert outcome_of("error").summary() == "1 case: 1 error"
