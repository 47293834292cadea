"""The summary's "Reported, not gated" section says why its findings are not gated: the reasons of those findings,
never a fixed one that does not apply (a run compared with itself is on the same host)."""

from __future__ import annotations

from pathlib import Path

from flux2bench.compare import compare_runs
from records import environment
from runs import make_case, make_run

REPO = Path(__file__).resolve().parents[2]
CPU_SMOKE_RUN = REPO / "reports" / "smoke-20261126-084139"


def cpu_case(key: str = "base-0a1b2c3d4e5f"):
    return make_case(key, image_s=[1.0, 1.01, 1.02, 0.99, 1.0], device="cpu", memory={"host_rss_peak_gib": 1.0})


def reported_section(markdown: str) -> str:
    return markdown.split("#### Reported, not gated", 1)[1].split("####", 1)[0].split("<details>", 1)[0]


def test_a_committed_cpu_run_compared_with_itself_reports_cpu_timings_and_no_host_difference():
    verdict = compare_runs(CPU_SMOKE_RUN, CPU_SMOKE_RUN)
    markdown = verdict.markdown()
    assert verdict.host_differences == [] and verdict.exit_code == 0
    section = reported_section(markdown)
    assert "Why: ran on the CPU" in section
    assert "hosts differ" not in markdown and "Other host" not in markdown


def test_timings_reported_because_the_hosts_differ_say_so(tmp_path):
    offloaded = make_case("offload-2c3d4e5f6a7b", image_s=[3.0, 3.01, 3.02, 2.99, 3.0], setting={"offload": "model"},
                          memory={"host_rss_peak_gib": 30.0})
    baseline = make_run(tmp_path, "baseline", [offloaded])
    current = make_run(tmp_path, "current", [offloaded], environment=environment(cpu="Intel(R) Xeon(R) Platinum 8480+"))
    section = reported_section(compare_runs(baseline, current).markdown())
    assert "Why: host-bound and the hosts differ (CPU" in section and "ran on the CPU" not in section


def test_each_distinct_reason_is_named_once(tmp_path):
    baseline = make_run(tmp_path, "baseline", [cpu_case()])
    current = make_run(tmp_path, "current", [cpu_case()])
    section = reported_section(compare_runs(baseline, current).markdown())
    why = next(line for line in section.splitlines() if line.startswith("Why:"))
    assert why.count("ran on the CPU") == 1 and "hosts differ" not in section
