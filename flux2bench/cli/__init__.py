"""The command line: a thin layer over the library (scenario, runner, report, compare, export), one module per
command. Importing it imports neither torch nor the runner: help, ``plan`` and refusals answer at once."""

from flux2bench.cli import compare, export, history, plan, report, run
from flux2bench.cli.app import app

app.command()(plan.plan)
app.command(epilog=run.EPILOG)(run.run)
app.command("report")(report.report)
app.command()(compare.compare)
app.command(epilog=history.EPILOG)(history.history)
app.command()(export.export)

__all__ = ["app"]
