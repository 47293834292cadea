"""Drift attached as cases finish: only against a drift baseline that no later one could replace (the batch-1
case of the same setup, or the bf16 baseline without offload), so that a run stopped early keeps what its end would
have attached. Hand-made records, no pipeline."""

from __future__ import annotations

from records import gradient_image, result, save_outputs

from flux2bench.runner.drift_plan import ready_drift


def test_drift_is_attached_as_cases_finish_only_against_a_baseline_no_later_one_replaces(tmp_path):
    def finished(**axes):
        return save_outputs(tmp_path, result(**axes), [gradient_image()] * 4)  # 2 prompts x 2 seeds

    fp8, offloaded, plain = finished(precision="fp8_row"), finished(offload="model"), finished()
    cases = [r.case for r in (fp8, offloaded, plain)]
    assert ready_drift(tmp_path, cases, [fp8], fp8) == []  # no baseline yet
    assert ready_drift(tmp_path, cases, [fp8, offloaded], offloaded) == []  # the one without offload may come
    assert ([r.key for _, r in ready_drift(tmp_path, cases, [fp8, offloaded, plain], plain)]
            == [fp8.key, offloaded.key])  # offloading is compared with the plain setup too
    assert [r.key for _, r in ready_drift(tmp_path, cases, [plain, fp8], fp8)] == [fp8.key]  # baseline first
