"""Report: the results table, fits-on logic, and the files build_report writes."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from flux2bench import metrics
from flux2bench.report import fits
from flux2bench.report.answers import build_answers
from flux2bench.results import RunnerSlot, Setup
from flux2bench.report import plots as drawing
from flux2bench.report import frame as frames
from flux2bench.report import NOTHING_FITS, build_report, cell_text, fits_on, gb_to_gib, results_frame
from records import (drift, gpu_result, gradient_image, phase, result, save_outputs, with_noise, write_run,
                     write_timeline)

SYNTHETIC = "numeric drift on synthetic weights"


# --- the results frame ----------------------------------------------------------------------------

def test_rows_are_grouped_by_block_in_first_seen_order():
    records = [result(block="a"), result(block="b"), result(block="a", precision="fp8")]
    frame = results_frame(records)
    assert list(frame["block"]) == ["a", "a", "b"]
    assert list(frame["number"]) == [1, 2, 3]


def on_card(gpu: str, **case_changes):
    record = result(**case_changes)
    record.setup = Setup(gpu=gpu)
    return record


def test_the_card_column_appears_only_where_cases_ran_on_different_cards():
    h100, h200 = on_card("H100"), on_card("H200", precision="fp8")
    assert list(results_frame([h100, h200])["card"]) == ["H100", "H200"]
    assert "card" not in results_frame([h100, on_card("H100", precision="fp8")])


def test_a_run_resumed_on_another_card_says_so_and_counts_each_cards_cases(tmp_path):
    records = [on_card("H200"), on_card("H100", precision="fp8"), on_card("H100", precision="nf4")]
    text = build_report(write_run(tmp_path, records)).markdown_text
    assert "GPU: H200 (1 cases), H100 (2 cases)" in text and "more than one kind of card" in text


def test_unmeasured_values_are_na_with_a_reason_never_zero():
    oom = result(status="oom", reason="CUDA out of memory at step 3")
    frame = results_frame([oom])
    reasons = frame.attrs["reasons"]
    assert cell_text(frame, oom.key, "s_per_image") == "n/a"
    assert reasons[(oom.key, "s_per_image")] == "case ended with status oom"
    assert reasons[(oom.key, "vram_device_inference_gib")] == "no inference memory record (status oom)"
    assert reasons[(oom.key, "status")] == "CUDA out of memory at step 3"


def test_timings_of_a_case_without_warm_up_carry_a_note_and_warm_ones_none():
    cold, warm = result(warmup=0), result(warmup=1)
    reasons = results_frame([cold, warm]).attrs["reasons"]
    assert reasons[(cold.key, "s_per_step")].startswith("no warm-up") and (cold.key, "s_per_image") in reasons
    assert (warm.key, "s_per_step") not in reasons


def test_timings_of_images_that_compiled_after_the_warm_up_carry_a_note():
    recompiled, warm = result(warmup=1), result(warmup=1, precision="fp8")
    recompiled.latency.compiled_graphs = [2, 0]
    warm.latency.compiled_graphs = [0, 0]
    reasons = results_frame([recompiled, warm]).attrs["reasons"]
    assert "compiled 2 graph(s) during the timed images" in reasons[(recompiled.key, "s_per_step")]
    assert (recompiled.key, "s_per_image") in reasons and (warm.key, "s_per_step") not in reasons


def test_the_median_step_of_a_cached_case_points_to_s_per_image():
    cached, uncached = result(warmup=1, cache="taylorseer"), result(warmup=1)
    reasons = results_frame([cached, uncached]).attrs["reasons"]
    assert "compare cached cases by s/image" in reasons[(cached.key, "s_per_step")]
    assert (cached.key, "s_per_image") not in reasons and (uncached.key, "s_per_step") not in reasons


def test_timings_of_a_case_where_dynamo_gave_up_recompiling_are_marked_partly_eager():
    limited, within = result(warmup=1), result(warmup=1, precision="fp8")
    limited.setup.axes["compile"] = {"cache_counters": {"graphs": 20, "over_recompile_limit": 2}}
    within.setup.axes["compile"] = {"cache_counters": {"graphs": 2, "over_recompile_limit": 0}}
    reasons = results_frame([limited, within]).attrs["reasons"]
    assert "recompile limit on 2 function(s)" in reasons[(limited.key, "s_per_image")]
    assert (within.key, "s_per_step") not in reasons


def test_a_first_call_whose_graphs_no_cache_can_keep_says_a_later_run_compiles_them_again():
    bypassed, kept = result(warmup=1, compile="regional"), result(warmup=1, compile="regional", precision="fp8")
    for record, fields in ((bypassed, {"outcome": "compiled", "not_cacheable": {"graphs": 2, "why": "bypassed"}}),
                           (kept, {"outcome": "compiled"})):
        record.setup.axes["compile_cache"] = fields
        record.latency.first_call_s = 21.1
    reasons = results_frame([bypassed, kept]).attrs["reasons"]
    assert "a later run with the same cache compiles them again" in reasons[(bypassed.key, "first_call_s")]
    assert (kept.key, "first_call_s") not in reasons


def test_memory_peaks_are_reported_per_phase_under_headers_that_name_it():
    record = result(memory={"load": phase(gpu_device=9.0, host_rss=30.0), "inference": phase(gpu_device=12.5,
                                                                                             host_rss=20.0)})
    row = results_frame([record]).loc[record.key]
    assert (row["vram_device_load_gib"], row["vram_device_inference_gib"]) == (9.0, 12.5)
    assert (row["ram_load_gib"], row["ram_inference_gib"]) == (30.0, 20.0)
    assert frames.COLUMN["vram_device_inference_gib"].header == "peak VRAM device GiB (inference)"
    assert results_frame([record]).attrs["reasons"][(record.key, "vram_allocated_load_gib")] == \
        "gpu_allocated_peak_gib not measured in this test"


def test_fits_on_reads_the_larger_of_the_two_phases():
    record = result(memory={"load": phase(gpu_device=9.0, host_rss=30.0), "inference": phase(gpu_device=12.5,
                                                                                             host_rss=20.0)})
    assert metrics.vram_needed(record) == (12.5, "device peak")
    assert metrics.host_ram_needed(record) == 30.0


def test_timings_come_from_the_raw_samples():
    record = result(s_per_image=5.0, steps=4)
    row = results_frame([record]).loc[record.key]
    assert (row["s_per_image"], row["s_per_step"], row["load_s"], row["denoise_s"]) == (5.0, 1.0, 10.0, 4.0)
    assert results_frame([record]).attrs["reasons"][(record.key, "reference_encoding_s")] == "no reference images"


def test_drift_cells_of_the_baseline_say_it_is_the_baseline_and_variants_show_their_metrics():
    baseline = result()
    variant = result(precision="fp8", drift=drift(baseline, psnr=31.5, ssim=0.97), status="drift_fail")
    variant.drift.failed = ["min_psnr"]
    frame = results_frame([baseline, variant])
    assert frame.attrs["reasons"][(baseline.key, "psnr")] == "this case is the bf16 baseline"
    assert cell_text(frame, variant.key, "psnr") == "31.50"
    assert cell_text(frame, variant.key, "drift_failed") == "min_psnr"
    assert frame.attrs["reasons"][(variant.key, "lpips")] == "not computed"


def test_a_variant_without_drift_says_how_to_attach_it():
    variant = result(precision="fp8")
    reason = results_frame([result(), variant]).attrs["reasons"][(variant.key, "psnr")]
    assert reason.startswith("no drift recorded") and "--drift-only" in reason


def test_change_against_another_run_is_shown_in_percent():
    now, before = result(s_per_image=2.0), result(s_per_image=4.0)
    frame = frames.with_changes(results_frame([now]), results_frame([before]))
    assert frame.at[now.key, "s_per_image_change_pct"] == pytest.approx(-50.0)
    assert cell_text(frame, now.key, "s_per_image") == "2.00 (-50.0%)"
    assert cell_text(frame, now.key, "status") == "ok"


def test_a_status_that_changed_against_another_run_names_the_old_one():
    now, before = result(status="oom"), result()
    frame = frames.with_changes(results_frame([now]), results_frame([before]))
    assert cell_text(frame, now.key, "status") == "oom (was ok)"
    assert cell_text(frame, now.key, "s_per_image") == "n/a"


def test_a_case_missing_from_the_other_run_shows_no_change():
    frame = frames.with_changes(results_frame([result()]), results_frame([result(steps=8)]))
    assert cell_text(frame, result().key, "s_per_image") == "2.00"


def test_drift_headers_carry_the_synthetic_label_only_when_weights_are_synthetic():
    psnr = frames.COLUMN["psnr"]
    assert frames.header(psnr, frames.drift_heading([result()])) == f"PSNR dB ({SYNTHETIC})"
    pretrained = frames.drift_heading([result(weights="pretrained", model="flux2-dev")])
    assert frames.header(psnr, pretrained) == "PSNR dB (drift against the bf16 baseline)"
    assert frames.header(frames.COLUMN["s_per_image"], SYNTHETIC) == "s/image"


# --- fits on --------------------------------------------------------------------------------------

def fitting(table: pd.DataFrame, resource: str = "GPU") -> dict[float, str]:
    """size GB -> the setup the table names for it."""
    rows = table[table["resource"] == resource]
    return dict(zip(rows["size_gb"], rows["setup"]))


def test_card_sizes_in_gb_are_converted_to_gib():
    assert gb_to_gib(24) == pytest.approx(22.352, abs=1e-3)
    assert gb_to_gib(80) == pytest.approx(74.506, abs=1e-3)


def test_a_peak_between_the_cards_gib_and_gb_size_does_not_fit():
    record = gpu_result(device=23.0)  # 23 GiB is 24.7 GB: more than a 24 GB card holds
    table = fitting(fits_on([record], gpu_sizes_gb=(24, 32)))
    assert table == {24: NOTHING_FITS, 32: record.label}


def test_the_fastest_fitting_setup_wins_each_size():
    fast_big = gpu_result(device=40.0, s_per_image=1.0)
    slow_small = gpu_result(device=10.0, s_per_image=5.0, offload="model")
    table = fitting(fits_on([fast_big, slow_small], gpu_sizes_gb=(8, 16, 48)))
    assert table == {8: NOTHING_FITS, 16: slow_small.label, 48: fast_big.label}


def test_fit_uses_the_device_peak_and_falls_back_to_the_reserved_peak_saying_so():
    table = fits_on([gpu_result(device=5.0, reserved=4.0)], gpu_sizes_gb=(8,), host_ram_gb=())
    assert table["basis"][0].startswith("device peak 5.00 GiB")
    table = fits_on([gpu_result(reserved=4.0)], gpu_sizes_gb=(8,), host_ram_gb=())
    assert table["basis"][0].startswith("reserved peak (no device-level measurement) 4.00 GiB")


def test_a_case_that_ran_ok_under_an_emulated_cap_fits_cards_at_least_that_large():
    capped = gpu_result(device=None, max_vram_gib=15.0)  # 15 GiB is 16.1 GB
    table = fitting(fits_on([capped], gpu_sizes_gb=(16, 24)))
    assert table == {16: NOTHING_FITS, 24: capped.label}


def test_an_oom_under_a_cap_rules_the_same_setup_out_of_cards_up_to_that_cap():
    measured = gpu_result(device=10.0, s_per_image=1.0)  # its measured peak alone would fit a 12 GB card
    oom = result(status="oom", max_vram_gib=12.0)
    offloaded = gpu_result(device=6.0, s_per_image=3.0, offload="model")
    table = fitting(fits_on([measured, oom, offloaded], gpu_sizes_gb=(12, 16)))
    assert table == {12: offloaded.label, 16: measured.label}


@pytest.mark.parametrize("status", ["oom", "host_oom", "timeout", "error", "unsupported"])
def test_failed_cases_never_fit(status):
    table = fits_on([gpu_result(device=1.0, rss=1.0, status=status)], gpu_sizes_gb=(141,), host_ram_gb=(512,))
    assert set(table["setup"]) == {NOTHING_FITS}


def test_a_case_that_broke_a_drift_threshold_still_fits_and_its_drift_is_shown():
    baseline = gpu_result(device=30.0, s_per_image=4.0)
    fp8 = gpu_result(device=20.0, s_per_image=2.0, precision="fp8", status="drift_fail",
                     drift=drift(baseline, psnr=25.0, failed=("min_psnr",)))
    table = fits_on([baseline, fp8], gpu_sizes_gb=(24,), host_ram_gb=())
    assert (table["setup"][0], table["drift"][0]) == (fp8.label, "PSNR 25.00 dB; breaks min_psnr")


def test_host_ram_fit_uses_the_rss_peak():
    record = gpu_result(device=5.0, rss=20.0)
    assert fitting(fits_on([record], host_ram_gb=(16, 32)), "host RAM") == {16: NOTHING_FITS, 32: record.label}


def test_a_case_that_survived_a_ram_cap_fits_hosts_at_least_that_large_whatever_its_file_backed_rss():
    streamed = gpu_result(rss=60.0, s_per_image=30.0, max_ram_gib=32.0)  # 60 GiB RSS: file-backed pages, evicted
    table = fits_on([streamed], gpu_sizes_gb=(), host_ram_gb=(32, 64), prices={})
    assert fitting(table, "host RAM") == {32: NOTHING_FITS, 64: streamed.label}  # 32 GiB is 34.4 GB
    assert table["basis"].iloc[1] == "ran ok under a RAM cap of 32 GiB <= 59.60 GiB"


def test_a_host_oom_under_a_ram_cap_rules_the_same_setup_out_of_hosts_up_to_that_cap():
    measured = gpu_result(rss=20.0, s_per_image=1.0)  # its RSS peak alone would fit a 32 GB host
    killed = result(status="host_oom", max_ram_gib=32.0)
    table = fits_on([measured, killed], gpu_sizes_gb=(), host_ram_gb=(32, 64))
    assert fitting(table, "host RAM") == {32: NOTHING_FITS, 64: measured.label}


def test_in_a_run_measured_on_two_gpu_models_each_fit_names_its_card():
    fast, slow = on_card("H200", s_per_image=1.0), on_card("H100", s_per_image=2.0, precision="fp8")
    for record in (fast, slow):
        record.memory = {"inference": phase(gpu_device=5.0)}
    table = fits_on([fast, slow], gpu_sizes_gb=(8,), host_ram_gb=())
    assert table["setup"][0] == f"{fast.label} [on H200]"
    assert fits_on([fast], gpu_sizes_gb=(8,), host_ram_gb=())["setup"][0] == fast.label


def test_each_workload_gets_its_own_answer():
    small, large = gpu_result(device=4.0), gpu_result(device=30.0, width=128, height=128)
    table = fits_on([small, large], gpu_sizes_gb=(8,), host_ram_gb=())
    assert dict(zip(table["workload"].str.contains("128x128"), table["setup"])) == {False: small.label,
                                                                                      True: NOTHING_FITS}


def test_prices_add_the_cost_of_1000_images():
    table = fits_on([gpu_result(device=5.0, s_per_image=3.6)], gpu_sizes_gb=(8,), host_ram_gb=(),
                    prices={"H100": 2.0})
    assert table[fits.cost_column("H100")][0] == pytest.approx(2.0)  # 3.6 s * 1000 / 3600 s/h * $2/h


def test_the_answers_give_each_model_its_own_table_and_the_fastest_setup_per_gpu_count(tmp_path):
    records = [gpu_result(device=6.0, s_per_image=3.0, model="tiny-klein"), gpu_result(device=20.0, s_per_image=1.0)]
    text = build_report(write_run(tmp_path / "two-models", records), plots=False).markdown_text
    assert text.index("## Answers") < text.index("## Results")
    assert "#### tiny-klein (synthetic weights), 64x64, 4 steps" in text and "#### tiny (synthetic weights)" in text
    fastest = "| tiny-klein (synthetic weights), 64x64, 4 steps | 1 | bf16 offload=none sdpa 64x64 4steps | 3.00 | 6.00 |"
    assert fastest in text


def test_sizes_with_one_answer_are_one_row_and_sizes_nothing_fits_one_sentence():
    small, large = gpu_result(device=6.0, s_per_image=3.0), gpu_result(device=20.0, s_per_image=1.0, precision="fp8")
    answers = build_answers([small, large], fits_on([small, large], gpu_sizes_gb=(4, 8, 12, 24, 48), host_ram_gb=()),
                            SYNTHETIC, {})
    rows = [row[:2] for row in answers.fits[0].rows]
    assert rows == [["GPU 8 GB (7.45 GiB) to 12 GB", "bf16 offload=none sdpa 64x64 4steps"],
                    ["GPU 24 GB (22.35 GiB) and up", "fp8 offload=none sdpa 64x64 4steps te=bf16"]]
    assert answers.fits[0].note == "Nothing measured fits GPU of 4 GB or less."


def test_a_run_without_gpu_memory_says_so_once_instead_of_a_row_per_card():
    cpu = result(memory={"inference": phase(host_rss=2.0)})
    cpu.setup.device = "cpu"
    answers = build_answers([cpu], fits_on([cpu]), SYNTHETIC, {})
    assert answers.measured == "Measured: 1 case of 1 workload on the CPU; 1 ran to the end."
    assert [row[0] for row in answers.fits[0].rows] == ["host RAM 16 GB (14.90 GiB) and up"]
    assert answers.fits[0].note == "" and "no card size is answered" in answers.fits_note


def test_each_answer_states_the_host_ram_it_needs_and_where_the_text_encoder_runs():
    offloaded = gpu_result(device=6.0, rss=96.0, s_per_image=9.0, offload="group_leaf")
    remote = gpu_result(device=30.0, rss=4.0, s_per_image=2.0, text_encoder="precomputed")
    rows = build_answers([offloaded, remote], fits_on([offloaded, remote], gpu_sizes_gb=(12, 48), host_ram_gb=()),
                         SYNTHETIC, {}).fits[0].rows
    assert [row[3:5] for row in rows] == [["96.00", "in the pipeline, offload=group_leaf"],
                                          ["4.00", "separate process (not in the peaks)"]]


def test_with_several_gpu_kinds_the_fastest_setups_stand_side_by_side():
    h100, h200 = on_card("NVIDIA H100", precision="fp8"), on_card("NVIDIA H200")
    fastest = build_answers([h100, h200], fits_on([h100, h200]), SYNTHETIC, {}).fastest
    assert fastest.headers == ["workload", "GPUs", "fastest on NVIDIA H100", "fastest on NVIDIA H200"]
    assert fastest.rows[0][2].startswith("fp8 offload=none") and fastest.rows[0][3].startswith("bf16 offload=none")


def test_several_gpu_kinds_answer_the_purchase_question_with_energy_and_cost_at_each_kinds_price(tmp_path):
    from flux2bench.results import Energy

    h100 = on_card("NVIDIA H100 80GB HBM3", s_per_image=4.0, precision="fp8")
    h200 = on_card("NVIDIA H200", s_per_image=3.0)
    slower_h200 = on_card("NVIDIA H200", s_per_image=5.0, precision="nf4")
    for record, joules in ((h100, 2000.0), (h200, 1500.0), (slower_h200, 2500.0)):
        record.energy = Energy("fixture", [joules, joules])
    records = [h100, h200, slower_h200]
    kinds = build_answers(records, fits_on(records), SYNTHETIC, {"H100": 2.0, "H200": 3.6}).kinds
    assert kinds.headers[1:5] == ["GPU", "fastest setup", "GPUs", "s/image"]
    assert [(row[1], row[4], row[6], row[7]) for row in kinds.rows] == [
        ("NVIDIA H200", "3.00", "1500", "3.00"),  # 3 s per image at 3.60 USD an hour: 3.00 USD per 1000 images
        ("NVIDIA H100 80GB HBM3", "4.00", "2000", "2.22")]
    plots = drawing.draw_plots(tmp_path, records, {r.key: i for i, r in enumerate(records, 1)})
    assert plots.paths["gpu_kinds"].is_file()
    assert build_answers([h200], fits_on([h200]), SYNTHETIC, {}).kinds is None  # one kind: nothing side by side


# --- plots ----------------------------------------------------------------------------------------

def test_pareto_front_keeps_the_points_no_other_point_beats_on_both_axes():
    points = [(1.0, 40.0), (2.0, 20.0), (3.0, 30.0), (4.0, 10.0), (2.0, 20.0)]
    assert drawing.pareto_front(points) == [True, True, False, True, True]


def test_scaling_plots_draw_only_setups_measured_at_several_values(tmp_path):
    records = [gpu_result(device=10.0 + n, reference_images=n) for n in (0, 2, 4)]
    records.append(gpu_result(device=8.0, precision="fp8"))  # one point: no line of its own
    plots = drawing.draw_plots(tmp_path, records, {r.key: i for i, r in enumerate(records, 1)})
    assert plots.paths["scaling_reference_images"].is_file()
    assert plots.skipped["scaling_resolution"] == "no setup was measured at two or more values of megapixels"
    assert drawing._series_names([r.case for r in records], ("reference_images",)) == \
        ["precision=bf16", "precision=bf16", "precision=bf16", "precision=fp8"]


def test_a_timeline_without_gpu_samples_still_plots_host_memory(tmp_path):
    record = write_timeline(tmp_path, result(memory={"inference": phase(host_rss=3.0)}), gpu=False)
    plots = drawing.draw_plots(tmp_path, [record], {record.key: 1}, timeline_case=record.key)
    assert plots.paths["timeline"].is_file()


# --- the written report ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small run: a baseline, a drifting fp8 variant, an offloaded variant, and an OOM under a cap."""
    root = tmp_path_factory.mktemp("run")
    images = [gradient_image(32) for _ in range(4)]
    baseline = save_outputs(root, gpu_result(device=20.0, rss=8.0, s_per_image=4.0), images)
    fp8 = gpu_result(device=12.0, rss=7.0, s_per_image=2.0, precision="fp8", status="drift_fail",
                     drift=drift(baseline, psnr=24.0, ssim=0.9, failed=("min_psnr",)))
    save_outputs(root, fp8, [with_noise(im, 10.0) for im in images])
    offload = gpu_result(device=6.0, rss=30.0, s_per_image=8.0, offload="model", drift=drift(baseline, psnr=60.0))
    save_outputs(root, offload, images)
    write_timeline(root, offload)
    oom = result(status="oom", reason="CUDA out of memory", max_vram_gib=8.0, block="capped")
    return write_run(root, [baseline, fp8, offload, oom])


@pytest.fixture(scope="module")
def built(run_dir):
    return build_report(run_dir, prices={"H100": 3.0})


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the run, for tests that rebuild its report with other options."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_build_report_writes_every_file_and_returns_the_markdown(run_dir, built):
    assert built.markdown == run_dir / "report.md" and built.markdown.read_text() == built.markdown_text
    assert built.csv.is_file() and built.html.is_file()
    assert set(built.plots) == {"pareto", "stages", "timeline", "drift_speedup"}
    assert all(path.stat().st_size > 1000 for path in built.plots.values())


def test_markdown_groups_by_block_flags_failures_and_footnotes_reasons(built):
    text = built.markdown_text
    assert text.index("### Block `main`") < text.index("### Block `capped`")
    oom_row = next(line for line in text.splitlines() if "cap=8GiB" in line)
    status_note = re.search(r"\*\*OOM\*\*\[\^(\d+)\]", oom_row).group(1)
    assert f"[^{status_note}]: CUDA out of memory" in text
    assert " 0.00 " not in oom_row and "n/a[^" in text
    assert "**DRIFT_FAIL**" in text
    assert "PSNR is capped at 100 dB" in text


def test_markdown_lists_plots_and_says_why_one_was_not_drawn(built):
    assert "![Peak VRAM vs s/image (Pareto front)](plots/pareto.png)" in built.markdown_text
    assert "Peak VRAM and s/step vs resolution: not drawn, no setup was measured at two or more values of megapixels" \
        in built.markdown_text


def test_every_drift_header_in_every_format_says_numeric_drift_on_synthetic_weights(built):
    drift_headers = {c.header: f"{c.header} ({SYNTHETIC})" for c in frames.COLUMNS if c.drift}
    with open(built.csv) as f:
        csv_headers = set(next(csv.reader(f)))
    html_text = built.html.read_text()
    markdown_headers = {h.strip() for line in built.markdown_text.splitlines() if line.startswith("| #")
                        or line.startswith("| memory") for h in line.strip("|").split("|")}
    assert set(drift_headers.values()) <= csv_headers
    shown = {h for h in markdown_headers if h.split(" (")[0] in drift_headers or h.startswith("drift")}
    assert {f"PSNR dB ({SYNTHETIC})", f"drift ({SYNTHETIC})"} <= shown
    assert all(h.endswith(f"({SYNTHETIC})") for h in shown)
    # HTML results tables: one header spanning the drift columns carries the label.
    assert f"drift vs the bf16 baseline ({SYNTHETIC})</th>" in html_text and f"drift ({SYNTHETIC})" in html_text
    assert "Drift groups (numeric drift on synthetic weights)" in html_text


def test_csv_has_one_row_per_case_with_na_and_the_reasons_in_notes(run_dir, built):
    rows = list(csv.DictReader(open(built.csv)))
    assert [r["block"] for r in rows] == ["main", "main", "main", "capped"]
    oom = rows[3]
    assert (oom["status"], oom["s/image"], oom["load s"]) == ("oom", "n/a", "n/a")
    assert "status: CUDA out of memory" in oom["notes"] and "s/image: case ended with status oom" in oom["notes"]
    assert float(rows[1]["s/image"]) == 2.0


def test_fits_on_table_in_markdown_names_sizes_in_gb_and_gib_and_costs(built):
    text = built.markdown_text
    assert "| GPU 8 GB (7.45 GiB) to 12 GB | bf16 offload=model" in text  # fp8's 12 GiB peak is 12.9 GB
    assert "| GPU 16 GB (14.90 GiB) and up | fp8" in text
    assert "USD per 1000 images at H100 $3/h |" in text and "| $1.67 |" in text  # 2 s/image at $3/h
    assert "| host RAM 16 GB (14.90 GiB) and up | fp8" in text
    assert "why it fits (the peak it needs, larger of load and inference)" in text


def test_html_is_self_contained_with_embedded_plots_and_thumbnail_grids(built):
    page = built.html.read_text()
    assert "<script" not in page and not re.search(r"(src|href)=\"(?!data:)", page)
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 4 + 3 * 4  # plots + baseline and 2 variants x 4 images
    assert "Baseline: tiny bf16 offload=none" in page and "NVIDIA H100 80GB HBM3" in page


def test_html_shows_reasons_as_titles_and_failed_status_highlighted(built):
    page = built.html.read_text()
    assert '<td class="bad text" title="CUDA out of memory">oom</td>' in page
    assert 'title="this case is the bf16 baseline">n/a</td>' in page


def test_comparing_with_another_run_shows_changes(run_copy, tmp_path):
    faster = gpu_result(device=20.0, rss=8.0, s_per_image=3.0)
    other = write_run(tmp_path / "other", [faster], run_id="other-run")
    built = build_report(other, other_run_dir=run_copy)
    assert "3.00 (-25.0%)" in built.markdown_text and "run `fixture-run`" in built.markdown_text


def test_an_unknown_timeline_case_is_an_error(run_copy):
    with pytest.raises(ValueError, match="no case has the key or label 'nope'"):
        build_report(run_copy, timeline_case="nope")


def test_a_chosen_case_without_timeline_skips_the_timeline_plot(run_copy):
    built = build_report(run_copy, timeline_case=result().label)
    assert "timeline" not in built.plots
    assert "VRAM and RAM timeline: not drawn, no timeline recorded for the chosen case" in built.markdown_text


def test_a_run_of_several_cases_at_a_time_says_so_and_one_at_a_time_does_not(built, tmp_path):
    assert "cases ran at a time" not in built.markdown_text
    spread = [gpu_result(device=20.0, rss=8.0, s_per_image=4.0), gpu_result(device=6.0, rss=30.0, s_per_image=8.0,
                                                                              offload="model")]
    for gpu, record in enumerate(spread):
        record.setup.runner = RunnerSlot(str(gpu), concurrent_slots=2)
    markdown = build_report(write_run(tmp_path / "spread", spread)).markdown_text
    assert "Up to 2 cases ran at a time, one per GPU" in markdown


def test_a_price_costs_only_the_setups_measured_on_the_card_it_names():
    h100, h200 = on_card("NVIDIA H100", s_per_image=1.0), on_card("NVIDIA H200", precision="fp8", s_per_image=0.5)
    h100.memory = {"inference": phase(gpu_device=30.0)}
    h200.memory = {"inference": phase(gpu_device=10.0)}
    table = fits_on([h100, h200], gpu_sizes_gb=(16, 48), host_ram_gb=(), prices={"H100": 3.6})
    assert table["usd_per_1000_images_H100"].tolist()[0] is None  # 16 GB: the H200 case, not priced as an H100
    with pytest.raises(ValueError, match="--price A100: no case of this run ran on such a GPU; its cases ran on "
                                         "NVIDIA H100, NVIDIA H200"):
        fits.check_prices({"A100": 1.0}, ["NVIDIA H100", "NVIDIA H200"])


@pytest.mark.parametrize("prices", [{"H100": -1.0}, {"H100": float("nan")}, {"": 2.0}])
def test_a_price_that_is_not_one_is_refused_from_python_too(prices):
    with pytest.raises(ValueError, match="a price is a GPU name and a finite, non-negative USD per hour"):
        fits.check_prices(prices, ["NVIDIA H100"])
