"""The command line: a thin layer over the library (scenario, runner, report, compare, export)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flux2bench.results import CaseResult
from flux2bench.runner import Runner, RunProgress, resume_run, start_run
from flux2bench.scenario import ScenarioError, load_cases

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark and memory-profile FLUX.2 pipelines: what each setup costs on this hardware.")
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

STATUS_STYLE = {"ok": "green", "drift_fail": "yellow", "unsupported": "cyan"}


def fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _case_line(result: CaseResult) -> str:
    style = STATUS_STYLE.get(result.status, "red")
    vram = result.peak("gpu_allocated_peak_gib")
    detail = (result.reason or "")[:160] or (f"s/image {_fmt(result.s_per_image)}  s/step {_fmt(result.s_per_step, 3)}  "
                               f"VRAM {_fmt(vram)} GiB  RAM {_fmt(result.peak('host_rss_peak_gib'))} GiB")
    return f"[{style}]{result.status:>11}[/]  {result.label}  {detail}"


@app.command()
def plan(scenario: Path = typer.Argument(..., help="scenario YAML file")) -> None:
    """Print the cases a scenario expands to, without running them."""
    try:
        cases = load_cases(scenario)
    except ScenarioError as exc:
        raise fail(str(exc))
    table = Table(title=f"{scenario}: {len(cases)} cases")
    for column in ("#", "block", "case", "key"):
        table.add_column(column)
    for i, case in enumerate(cases, 1):
        table.add_row(str(i), case.block, case.label, case.key)
    console.print(table)


def _drift_line(result: CaseResult) -> str:
    if result.status == "drift_fail":
        return _case_line(result)
    metrics = result.drift.metrics
    if result.drift.baseline_key is None:
        return f"[dim]      drift[/]  {result.label}  not measured: {metrics['psnr'].reason}"
    return (f"[dim]      drift[/]  {result.label}  PSNR {_fmt(metrics['psnr'].value)} dB  "
            f"SSIM {_fmt(metrics['ssim'].value, 3)}  ({result.drift.label})")


def _parse_devices(devices: Optional[str]) -> list[str] | None:
    if devices is None:
        return None
    values = [d.strip() for d in devices.split(",")]
    if not all(values) or len(set(values)) != len(values):
        raise fail(f"--devices {devices!r}: expected distinct comma-separated GPU indices or UUIDs, e.g. 0,1,2,3")
    return values


@app.command()
def run(
    scenario: Optional[Path] = typer.Argument(None, help="scenario YAML file (omit with --resume)"),
    out: Path = typer.Option(Path("reports"), help="folder that receives the new run directory"),
    resume: Optional[Path] = typer.Option(None, help="run directory to continue; finished cases are skipped"),
    report: bool = typer.Option(True, help="write the report when the run ends"),
    block: list[str] = typer.Option([], help="run only this block (repeatable); --resume runs the rest later"),
    devices: Optional[str] = typer.Option(
        None, help="GPUs to spread cases over, one case per GPU at a time (CUDA_VISIBLE_DEVICES values, e.g. 0,1,2,3); "
                   "cases then share the host's CPU, RAM and PCIe bandwidth"),
) -> None:
    """Run every case of a scenario, each in its own process, and store the results."""
    if (scenario is None) == (resume is None):
        raise fail("give a scenario file, or --resume RUN_DIR (not both)")
    slots = _parse_devices(devices)
    try:
        store, cases = resume_run(resume, block) if resume else start_run(scenario, out_root=out, blocks=block)
    except (ScenarioError, FileNotFoundError, FileExistsError) as exc:
        raise fail(str(exc))
    console.print(f"run directory: [bold]{store.root}[/]  ({len(cases)} cases"
                  f"{f', {len(slots)} at a time on GPUs {devices}' if slots else ''})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        expected = {c.key for c in cases} - store.completed_keys()
        task = progress.add_task("cases", total=len(expected))
        running: dict[str, tuple[str, str]] = {}  # case key -> ("[gpu N] label", stage)

        def show() -> None:
            lines = [f"{label} [dim]({stage})[/]" for label, stage in running.values()]
            progress.update(task, description="\n".join(lines) or "cases")

        def on_start(case, device) -> None:
            if case.key not in expected:  # a bf16 baseline the drift step needs
                expected.add(case.key)
                progress.update(task, total=len(expected))
            running[case.key] = (f"{f'[gpu {device}] ' if device else ''}{case.label}", "starting")
            show()

        def on_stage(case, stage: str) -> None:
            if case.key in running:
                running[case.key] = (running[case.key][0], stage)
                show()

        def on_end(result: CaseResult) -> None:
            running.pop(result.key, None)
            show()
            progress.console.print(_case_line(result), highlight=False)
            progress.advance(task)

        hooks = RunProgress(on_case_start=on_start, on_stage=on_stage, on_case_end=on_end,
                            on_drift=lambda result: progress.console.print(_drift_line(result), highlight=False))
        Runner(store, progress=hooks, devices=slots).run(cases)
    if hooks.skipped:
        console.print(f"skipped {len(hooks.skipped)} finished case(s) (--resume)")
    if report:
        _report(store.root)


def _report(run_dir: Path, **options) -> None:
    from flux2bench.report import build_report

    built = build_report(run_dir, **options)
    console.print(built.markdown_text, markup=False, highlight=False)
    console.print(f"report written to {built.markdown}, {built.csv} and {built.html}")


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="run directory"),
    baseline: Optional[Path] = typer.Option(None, help="another run directory to show changes against"),
    price: list[str] = typer.Option([], help="GPU=USD_PER_HOUR, e.g. H100=2.5 (repeatable)"),
    timeline_case: Optional[str] = typer.Option(None, help="case key whose memory timeline is plotted"),
) -> None:
    """Write report.md, report.csv, report.html and plots into a run directory."""
    prices = {}
    for item in price:
        name, _, value = item.partition("=")
        try:
            prices[name] = float(value)
        except ValueError:
            raise fail(f"--price {item!r}: expected GPU=USD_PER_HOUR")
    try:
        _report(run_dir, baseline_dir=baseline, prices=prices or None, timeline_case=timeline_case)
    except FileNotFoundError as exc:
        raise fail(str(exc))


@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="baseline run directory"),
    current: Path = typer.Argument(..., help="current run directory"),
    rules: Optional[Path] = typer.Option(None, help="gate.yaml with thresholds and per-block overrides"),
    allow_env_change: bool = typer.Option(False, help="compare although driver or library versions differ"),
    fail_on_improvement: bool = typer.Option(False, help="also fail on unexplained large improvements"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the JSON verdict here"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the Markdown summary here"),
) -> None:
    """Gate regressions: exit 0 on pass, 1 on a regression, 2 on bad input."""
    from flux2bench.compare import CompareError, compare_runs, load_rules

    try:
        verdict = compare_runs(baseline, current, rules=load_rules(rules) if rules else None,
                               allow_env_change=allow_env_change, fail_on_improvement=fail_on_improvement)
    except CompareError as exc:
        raise fail(str(exc))
    markdown = verdict.markdown()
    console.print(markdown, markup=False, highlight=False)
    if json_out:
        json_out.write_text(verdict.to_json())
    if markdown_out:
        markdown_out.write_text(markdown, encoding="utf-8")
    raise typer.Exit(verdict.exit_code)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="run directory"),
    format: str = typer.Option("pytest-benchmark", help="output format (pytest-benchmark)"),
    output: Optional[Path] = typer.Option(None, help="output file (default: RUN_DIR/pytest-benchmark.json)"),
) -> None:
    """Export a run in another tool's format."""
    from flux2bench.export import write_pytest_benchmark

    if format != "pytest-benchmark":
        raise fail(f"unknown format {format!r}; supported: pytest-benchmark")
    try:
        path = write_pytest_benchmark(run_dir, output or run_dir / "pytest-benchmark.json")
    except FileNotFoundError as exc:
        raise fail(str(exc))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
