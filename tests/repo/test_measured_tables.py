"""Every measured number in README's answers tables and in the table of docs/throughput.md (docs/overhead.md's:
test_overhead_table.py) is re-derived here from the run directory its row names, with the project's loaders
(``RunStore``) and metric registry (``flux2bench.metrics``), and compared at the precision it is printed with: a cell
its records do not back fails.

Each table's rows are found by their first cells; ``ROWS`` below names, per row, the records (case keys) of the run
directory the row names. A row without records here, or records here without a row, fails too: a new row needs its
records named. A cell lists one value per record ("29.9, 25.9"), their range ("0.53-0.58", with ", median M" where
it says so), or one value every record has; a remark in parentheses is words, not checked ("19.0 (server)").
``doc_tables`` reads the tables and checks a cell.
"""

from __future__ import annotations

import re
from typing import Callable

import pytest

from doc_tables import REPO, Table, check, record, table_with
from flux2bench.metrics import BY_NAME, drift_value, host_ram_needed, s_per_call, s_per_image, s_per_step, vram_needed
from flux2bench.results import CaseResult


# --- README: which card, which setup ------------------------------------------------------------------------

README = REPO / "README.md"
DEV_ROWS = {  # the card cell -> the case key in the row's run directory
    "12, 16 GB": "group-offload-leaf-stream-ab1d2759eb9b",
    "24, 32 GB": "quantized-01ac03ec453e",
    "48, 80 GB": "compile-7836fe2ae816",
    "141 GB (H200)": "compile-7836fe2ae816",
    "2 x 80 GB": "ulysses-fp8-f0b26a077042",
    "4 x 80 GB": "four-gpus-af1669dd2204",
    "24 GB, text encoder local": "nf4-model-offload-8102a84fe5db",
    "80 GB, text encoder local": "bf16-model-offload-5a3793b9d0fb",
    "141 GB, text encoder local": "bf16-no-offload-269e1c61a59f",
}
KLEIN_ROWS = {  # (model, card) -> the case keys of the setup under each cap it ran under (and uncapped)
    ("klein 4B", "12, 16 GB"): ["klein-distilled-72192370c465", "klein-distilled-cbd6f3addc08",
                                "klein-distilled-39550685203e", "klein-distilled-6a1605290874"],
    ("klein 4B", "24 GB and up"): ["klein-distilled-b69d7447fe0f", "klein-distilled-91c81a1f6ae0",
                                   "klein-distilled.baseline-5b18e406f5af"],
    ("klein 9B", "12, 16 GB"): ["klein-group-offload-befc7c93b486", "klein-group-offload-01f33a879a03",
                                "klein-group-offload-0753e9630a58", "klein-group-offload-0e6d0ed5b82b"],
    ("klein 9B", "24, 32 GB"): ["klein-distilled-63205b5c4936", "klein-distilled-e4fc37f13f00",
                                "klein-distilled-76528b6deb6b"],
    ("klein 9B", "48 GB and up"): ["klein-distilled.baseline-ee72a3c4ebab"],
}


def _run_cell(cell: str) -> str:
    return cell.strip("` ").removeprefix("reports/")


def _gpu_short(result: CaseResult) -> str:
    return next(kind for kind in ("H100", "H200") if kind in (result.setup.gpu or ""))


def test_every_row_of_readmes_answers_tables_has_its_records_named_here():
    dev = table_with(README, "card", "fastest measured setup", "s/step")
    klein = table_with(README, "model", "card", "measured on")
    assert [row[0] for row in dev.rows] == list(DEV_ROWS)
    assert [(row[0], row[1]) for row in klein.rows] == list(KLEIN_ROWS)


@pytest.mark.parametrize("card", DEV_ROWS)
def test_readmes_flux2_dev_row_is_its_record(card):
    table = table_with(README, "card", "fastest measured setup", "s/step")
    row = next(r for r in table.rows if r[0] == card)
    result = record(_run_cell(row[table.column("run")]), DEV_ROWS[card])
    assert result.status == "ok"
    check(row[table.column("VRAM peak GiB")].removesuffix(" per GPU"), [vram_needed(result)[0]], f"{card}: VRAM")
    check(row[table.column("s/step")], [s_per_step(result)], f"{card}: s/step")
    seconds, steps = re.fullmatch(r"(\S+) \((\d+)\)", row[table.column("s/image")]).groups()
    check(seconds, [s_per_image(result)], f"{card}: s/image")
    assert int(steps) == result.case.steps, f"{card}: steps"
    check(row[table.column("host RAM GiB")], [host_ram_needed(result)], f"{card}: host RAM")
    precomputed = result.case.settings["text_encoder"] == "precomputed"
    assert (row[table.column("text encoder")] == "precomputed") == precomputed, f"{card}: text encoder"


@pytest.mark.parametrize("model,card", KLEIN_ROWS)
def test_readmes_klein_row_is_its_records(model, card):
    table = table_with(README, "model", "card", "measured on")
    row = next(r for r in table.rows if (r[0], r[1]) == (model, card))
    results = [record(_run_cell(row[table.column("run")]), key) for key in KLEIN_ROWS[model, card]]
    assert all(r.status == "ok" and model.split()[1].lower() in r.case.model for r in results)
    what = f"{model}, {card}"
    check(row[table.column("VRAM peak GiB")], [vram_needed(r)[0] for r in results], f"{what}: VRAM")
    check(row[table.column("s/image")], [s_per_image(r) for r in results], f"{what}: s/image")
    check(row[table.column("host RAM GiB")], [host_ram_needed(r) for r in results], f"{what}: host RAM")
    measured_on = {name.strip() for name in row[table.column("measured on")].split(",")}
    assert measured_on == {_gpu_short(r) for r in results}, f"{what}: measured on"


# --- docs/throughput.md ---------------------------------------------------------------------------------------

THROUGHPUT = REPO / "docs" / "throughput.md"
THROUGHPUT_ROWS = {  # (model, batch) -> case key
    ("klein 4B bf16", "1"): "klein-4b-5b18e406f5af", ("klein 4B bf16", "4"): "klein-4b-a06dfe4b7c84",
    ("klein 4B bf16", "8"): "klein-4b-7d3782539975", ("klein 4B bf16", "16"): "klein-4b-477cdc1def06",
    ("FLUX.2-dev bf16", "1"): "dev-bf16-eager-aa86698a7da0", ("FLUX.2-dev bf16", "2"): "dev-bf16-eager-33d021cc45b4",
    ("FLUX.2-dev FP8 per row, regional compile", "1"): "dev-fp8-regional-b1-7836fe2ae816",
    ("FLUX.2-dev FP8 per row, regional compile", "2"): "dev-fp8-regional-b2-536ffe48ba9c",
    ("FLUX.2-dev FP8 per row, regional compile", "4"): "dev-fp8-regional-b4-ce9ff6409132",
    ("FLUX.2-dev FP8 per row, regional compile", "8"): "dev-fp8-regional-b8-0f9493bf2936",
    ("klein 9B bf16", "1"): "klein-9b-ee72a3c4ebab", ("klein 9B bf16", "4"): "klein-9b-e057024f63c4",
    ("klein 9B bf16", "8"): "klein-9b-c27153635cf6", ("klein 9B bf16", "16"): "klein-9b-dd1b7867fac0",
}
THROUGHPUT_COLUMNS: dict[str, Callable[[CaseResult], float | None]] = {
    "s/call": s_per_call, "s/image": s_per_image,
    "images/h per GPU": BY_NAME["images_per_hour_per_gpu"].value, "device peak GiB": lambda r: vram_needed(r)[0],
    "J/image": BY_NAME["energy_j"].value,
}


ONE_RUN_ROWS = {  # (setup, batch) -> case key, in the run the one-run section's heading names
    ("FLUX.2-dev bf16 eager", "1"): "dev-bf16-eager-aa86698a7da0",
    ("FLUX.2-dev bf16 eager", "2"): "dev-bf16-eager-33d021cc45b4",
    ("FLUX.2-dev FP8 per row, regional compile", "1"): "dev-fp8-regional-b1-b0fef54e54e4",
    ("FLUX.2-dev FP8 per row, regional compile", "2"): "dev-fp8-regional-b2-b7ae94231ac5",
    ("FLUX.2-dev FP8 per row, regional compile", "4"): "dev-fp8-regional-b4-862f725a404d",
}
SECOND_ONE_RUN_ROWS = {
    ("FLUX.2-dev FP8 per row, regional compile", "1"): "dev-fp8-regional-b1-b0fef54e54e4",
    ("FLUX.2-dev FP8 per row, regional compile", "2"): "dev-fp8-regional-b2-b7ae94231ac5",
}
RELATIVE = "images/h relative to batch 1"
FIRST_CALL = {"first call s": BY_NAME["first_call_s"].value}
PSNR = "drift PSNR dB"
THROUGHPUT_TABLES = {  # a table: its headers, the run its heading names -> its rows, the columns it adds
    (("model", "batch", "s/call"), "throughput-20261203-161509"): (THROUGHPUT_ROWS, {}),
    (("setup", "batch", RELATIVE), "throughput-h100-20261207-135936"): (ONE_RUN_ROWS, FIRST_CALL),
    (("setup", "batch", RELATIVE), "throughput-h100-20261207-160726"): (
        SECOND_ONE_RUN_ROWS, {**FIRST_CALL, PSNR: lambda r: drift_value(r, "psnr").value}),
}


def _throughput_table(headers: tuple[str, ...], run: str) -> Table:
    return table_with(THROUGHPUT, *headers, heading=f"`reports/{run}`")


@pytest.mark.parametrize("headers,run", THROUGHPUT_TABLES)
def test_every_row_of_a_throughput_table_has_its_record_named_here(headers, run):
    table = _throughput_table(headers, run)
    assert [(row[0], row[1]) for row in table.rows] == list(THROUGHPUT_TABLES[headers, run][0])


@pytest.mark.parametrize("headers,run,setup,batch",
                         [(*table, *row) for table, (rows, _) in THROUGHPUT_TABLES.items() for row in rows])
def test_a_throughput_row_is_its_record(headers, run, setup, batch):
    rows, extra = THROUGHPUT_TABLES[headers, run]
    table = _throughput_table(headers, run)
    row = next(r for r in table.rows if (r[0], r[1]) == (setup, batch))
    result = record(run, rows[setup, batch])
    assert result.status == "ok" and result.batch_size == int(batch)
    for column, value in {**THROUGHPUT_COLUMNS, **extra}.items():
        check(row[table.column(column)], [value(result)], f"{setup} batch {batch}: {column}")
    if RELATIVE in table.header:  # images per hour against batch 1 of the same setup, in the same run
        per_hour = BY_NAME["images_per_hour_per_gpu"].value
        check(row[table.column(RELATIVE)], [per_hour(result) / per_hour(record(run, rows[setup, "1"]))],
              f"{setup} batch {batch}: {RELATIVE}")


# --- docs/speed.md: compiled once ------------------------------------------------------------------------------

def test_the_compiled_once_row_of_speed_md_is_the_compiling_and_the_loading_run():
    table = table_with(REPO / "docs" / "speed.md", "FLUX.2-dev, 1024x1024, 8 steps", "s/step", "first call s")
    row = next(r for r in table.rows if r[0].startswith("the same, compiled once"))
    runs = [_run_cell(cell) for cell in row[table.column("run")].split(" / ")]
    results = [record(path, "dev-fp8-regional-b1-b0fef54e54e4") for path in runs]
    assert [r.setup.axes["compile_cache"]["outcome"] for r in results] == ["compiled", "loaded"]
    for column, value in {"s/step": s_per_step, "first call s": BY_NAME["first_call_s"].value,
                          "drift PSNR dB": lambda r: drift_value(r, "psnr").value}.items():
        for printed, result in zip(row[table.column(column)].split(" / "), results, strict=True):
            check(printed, [value(result)], f"compiled once: {column}")


# --- docs/speed.md: the recipe's ingredients, one at a time ---------------------------------------------------

RECIPE_RUN = "fastest-recipe-h200-20261207-180327"
QUICK_RUN = "fastest-recipe-quick-h100-20261207-223654"
INGREDIENT_ROWS = {  # the row's first cell starts with -> its run and case key
    "today's best again": (RECIPE_RUN, "recipe-base-5053c7f3330d"),
    "+ `inductor_preset: flux-fast`": (RECIPE_RUN, "recipe-flags-d60127512bf6"),
    "with `inductor_preset: torch-defaults`": (RECIPE_RUN, "recipe-torch-flags-9f9fe1a62755"),
    "`recipe-torch-flags` again": (QUICK_RUN, "recipe-torch-flags-9f9fe1a62755"),
    "+ `attention_precision: fp8` (`recipe-quick": (QUICK_RUN, "recipe-quick-fp8-attention-64660072ca87"),
    "FP8 per row, whole transformer compiled": (QUICK_RUN, "recipe-quick-full-33626d30956b"),
    "the same, `reduce-overhead` (CUDA graphs": (QUICK_RUN, "recipe-quick-full-8aceff0c6944"),
    "the same, default mode, FP8 attention": (QUICK_RUN, "recipe-quick-full-22a807b2ff03"),
    "the same, `reduce-overhead`, FP8 attention": (QUICK_RUN, "recipe-quick-full-a3afd83225e2"),
}
KLEIN_RUNS = ("fastest-recipe-quick-klein-h100-20261208-011536", "fastest-recipe-quick-klein-loaded-h100-20261208-012209")
KLEIN_INGREDIENT_ROWS = {  # the same for the klein table of the recipe's results: compiled, then loaded
    "klein 4B, whole transformer, no coordinate descent tuning, bf16": "recipe-quick-klein-4b-8af0713dcff9",
    "the same, `reduce-overhead` (CUDA graphs": "recipe-quick-klein-4b-a6fdf15a3c1c",
    "the same, FP8 per row, default mode": "recipe-quick-klein-4b-a4dd16a7d441",
    "the same, FP8 per row, `reduce-overhead`": "recipe-quick-klein-4b-b2ebbfcdf718",
    "the same, FP8 per row, FP8 attention, default mode": "recipe-quick-klein-4b-4ce30e011f88",
    "the same, FP8 per row, FP8 attention, `reduce-overhead`": "recipe-quick-klein-4b-c6ad610cb86b",
}


def _check_ingredient_row(table, starts: str, run: str, key: str) -> tuple[list[str], CaseResult]:
    """The row starting with ``starts`` against its record: card, s/step, first call (compiled in that run)."""
    (row,) = [r for r in table.rows if r[0].startswith(starts)]
    assert _run_cell(row[table.column("run")]) == run
    result = record(run, key)
    assert result.status == "ok" and _gpu_short(result) in row[0]
    assert row[table.column("first call s")].endswith(" / -")  # compiled in this run, not loaded
    # (records older than the FX-graph cache's bypass count say "nothing compiled" for graphs it bypassed)
    assert result.setup.axes["compile"]["events"]["compile_s"] > 0
    assert result.setup.axes["compile_cache"]["outcome"] != "loaded"
    check(row[table.column("s/step")], [s_per_step(result)], f"{starts}: s/step")
    check(row[table.column("first call s")].split(" / ")[0], [BY_NAME["first_call_s"].value(result)],
          f"{starts}: first call")
    return row, result


@pytest.mark.parametrize("starts, run, key", [(starts, *where) for starts, where in INGREDIENT_ROWS.items()])
def test_an_ingredient_row_of_speed_md_is_its_record(starts, run, key):
    table = table_with(REPO / "docs" / "speed.md", "FLUX.2-dev, 1024x1024, 8 steps", "s/step", "first call s")
    row, result = _check_ingredient_row(table, starts, run, key)
    check(row[table.column("drift PSNR dB")], [drift_value(result, "psnr").value], f"{starts}: drift")


@pytest.mark.parametrize("starts, key", KLEIN_INGREDIENT_ROWS.items())
def test_a_klein_ingredient_row_of_speed_md_is_its_compiling_and_its_loading_record(starts, key):
    table = table_with(REPO / "docs" / "speed.md", "klein, 1024x1024, 4 steps", "s/step", "first call s")
    (row,) = [r for r in table.rows if r[0].startswith(starts)]
    assert [_run_cell(cell) for cell in row[table.column("run")].split(" / ")] == list(KLEIN_RUNS)
    compiled, loaded = (record(run, key) for run in KLEIN_RUNS)
    assert compiled.status == loaded.status == "ok" and _gpu_short(compiled) in row[0]
    check(row[table.column("s/step")], [s_per_step(compiled)], f"{starts}: s/step")
    check(row[table.column("drift PSNR dB")], [drift_value(compiled, "psnr").value], f"{starts}: drift")
    first_calls = row[table.column("first call s")].split(" (")[0].split(" / ")
    for printed, result in zip(first_calls, (compiled, loaded), strict=True):
        check(printed, [BY_NAME["first_call_s"].value(result)], f"{starts}: first call")
    assert compiled.setup.axes["compile_cache"]["outcome"] == "compiled"
    cacheable = "not cacheable" not in row[table.column("first call s")]
    assert (loaded.setup.axes["compile_cache"]["outcome"] == "loaded") == cacheable
    assert ("not_cacheable" in loaded.setup.axes["compile_cache"]) != cacheable
