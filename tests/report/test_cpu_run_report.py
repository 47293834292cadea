"""A report of a run no case of which ran on a GPU speaks of the CPU and host RAM, never of GPUs, VRAM or cards; a
number other than zero never reads as zero; and in the HTML every header is aligned as its column's cells are."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from flux2bench.metrics import formatted
from flux2bench.progress_display import _case_line
from flux2bench.report import build_report, summary_lines
from flux2bench.report.plots import plot_titles
from flux2bench.results import WallSplit
from records import environment, phase, result, write_run

GPU_WORDS = re.compile(r"GPU|VRAM|card", re.IGNORECASE)


def on_cpu(block: str, s_per_image: float = 1.0, **case):
    record = result(block=block, s_per_image=s_per_image, memory={"load": phase(host_rss=0.7),
                                                                   "inference": phase(host_rss=0.8)}, **case)
    record.setup.device = "cpu"
    record.wall_split = WallSplit("fixture", timed_s=2 * s_per_image, worker_wall_s=10.0)
    return record


def on_gpu(block: str, **case):
    record = result(block=block, memory={"inference": phase(gpu_device=20.0, gpu_allocated=18.0, host_rss=2.0)},
                    **case)
    record.setup.device, record.setup.gpu = "cuda", "NVIDIA H100 80GB HBM3"
    record.wall_split = WallSplit("fixture", timed_s=4.0, worker_wall_s=20.0)
    return record


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    records = [on_cpu("a", 1.0), on_cpu("b", 2.0, width=128, height=128), on_cpu("c", 3.0, width=256, height=256)]
    return build_report(write_run(tmp_path_factory.mktemp("cpu") / "run", records, environment=NO_GPU))


NO_GPU = environment(gpu_name=None, gpu_memory_gib=None, gpus=[], driver=None, cuda=None)


def test_a_cpu_runs_markdown_speaks_of_no_gpu_vram_or_card(cpu_report):
    gpu_lines = [line for line in cpu_report.markdown_text.splitlines() if GPU_WORDS.search(line)]
    assert [line for line in gpu_lines if not line.startswith("No case of this run ran on a GPU, so no card")] == []
    assert "### Fastest setup per workload, on the CPU" in cpu_report.markdown_text
    assert "### Fastest setup that fits, per host RAM size" in cpu_report.markdown_text
    assert ", on the CPU, flux2bench 0.1.0." in cpu_report.markdown_text


def test_a_cpu_run_on_a_host_with_a_gpu_says_the_gpu_was_not_used(tmp_path):
    built = build_report(write_run(tmp_path / "run", [on_cpu("a")]))  # run.json names the host's H100
    assert ", on the CPU (the host's NVIDIA H100 80GB HBM3 was not used), " in built.markdown_text


def test_a_cpu_run_says_once_that_no_card_size_is_answered(cpu_report):
    assert cpu_report.markdown_text.count("no card size is answered") == 1
    assert all(table.note == "" for table in cpu_report.answers.fits)


def test_a_cpu_runs_time_held_is_its_workers_seconds(cpu_report):
    text = cpu_report.markdown_text
    assert "The cases' workers ran for 30 s and timed images during 12.0 s of it: 2.5 s held per timed s over 3 cases" \
        in text
    assert "| s held per timed s |" in text


def test_the_terminal_summary_of_a_cpu_run_names_the_cpu(cpu_report):
    lines = summary_lines(cpu_report.answers)
    assert lines[0] == "Measured: 3 cases of 3 workloads on the CPU; 3 ran to the end."
    assert all("on the CPU:" in line and "GPU" not in line for line in lines[1:])


def test_a_cpu_runs_html_and_plot_titles_speak_of_no_gpu_vram_or_card(cpu_report):
    page = cpu_report.html.read_text()
    body = page.split("<h2>Environment</h2>")[0]  # run.json's fields are listed under their own names
    visible = re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]+"', "", body))
    assert [m for m in GPU_WORDS.finditer(visible)
            if "no card size is answered" not in visible[m.start() - 40:m.end() + 30]] == []
    assert not any(GPU_WORDS.search(title) for title in plot_titles(on_gpu=False).values())


def test_a_gpu_run_keeps_its_gpu_wording(tmp_path):
    built = build_report(write_run(tmp_path / "run", [on_gpu("a"), on_gpu("b", precision="fp8")]))
    assert "### Fastest setup per number of GPUs" in built.markdown_text
    assert "held their GPUs for 40 GPU-s" in built.markdown_text
    assert "| GPU-s held per timed GPU-s |" in built.markdown_text
    assert "### Fastest setup that fits, per card size" in built.markdown_text
    assert summary_lines(built.answers)[1].startswith("  fastest, tiny (synthetic weights), 64x64, 4 steps, 1 GPU:")


def test_a_cases_progress_line_shows_vram_only_where_it_was_measured():
    assert "VRAM" not in _case_line(on_cpu("a")) and "RAM 0.70/0.80 GiB" in _case_line(on_cpu("a"))
    assert "VRAM allocated n/a/18.00 GiB" in _case_line(on_gpu("a"))


@pytest.mark.parametrize("value,fmt,shown", [
    (0.000177, "{:.0f}", "0.00018"), (0.0004, "{:.2f}", "0.0004"), (-0.003, "{:.2f}", "-0.003"),
    (0.0, "{:.2f}", "0.00"), (1003.4, "{:.0f}", "1003"), (0.282, "{:.3f}", "0.282"), ("ok", "{}", "ok")])
def test_a_number_other_than_zero_never_reads_as_zero(value, fmt, shown):
    assert formatted(value, fmt) == shown


def test_a_change_against_another_run_stands_beside_a_value_shown_with_its_digits(tmp_path):
    before, now = on_cpu("a"), on_cpu("a")
    before.memory["inference"] = phase(host_rss=0.8, host_shared=0.0020)
    now.memory["inference"] = phase(host_rss=0.8, host_shared=0.0004)
    other = write_run(tmp_path / "before", [before], run_id="before")
    built = build_report(write_run(tmp_path / "now", [now]), other_run_dir=other)
    row = next(line for line in built.markdown_text.splitlines() if line.startswith("| 1 |"))
    assert "| 0.0004 (-80.0%) |" in row and not re.search(r"\| 0\.0+ \(", row)


class _Tables(HTMLParser):
    """Per table, each header's and each cell's classes, row by row (the spanning group row left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, bool]]]] = []
        self._group = False

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._group = "groups" in classes
            if not self._group:
                self.tables[-1].append([])
        elif tag in ("th", "td") and not self._group:
            self.tables[-1][-1].append((tag, "text" in classes))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_every_html_header_is_aligned_as_its_columns_cells(tmp_path, kind):
    records = [on_cpu("a"), on_cpu("b")] if kind == "cpu" else [on_gpu("a"), on_gpu("b", precision="fp8")]
    page = build_report(write_run(tmp_path / "run", records)).html.read_text()
    assert "th.text, td.text { text-align: left; }" in page  # words left, numbers right (th, td), headers alike
    parser = _Tables()
    parser.feed(page)
    checked = 0
    for table in parser.tables:
        head, *rows = table
        assert all(tag == "th" for tag, _ in head)
        for row in rows:
            assert [text for _, text in row] == [text for _, text in head]
            checked += 1
    assert checked > 5
