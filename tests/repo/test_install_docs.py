"""README's install and test commands are the ones CI runs, and the GPU install pins the torch the numbers used."""

from __future__ import annotations

import json
import re
import shlex

import yaml

from conftest import REPO

ROOT = REPO
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
WORKFLOW = ROOT / "examples" / "github-actions-gpu.yml"


def _bash_blocks(markdown: str) -> list[list[str]]:
    """The lines of every ```bash block."""
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)]


def _pip_install(line: str) -> list[str] | None:
    """A `pip install ...` command as its arguments after `install`, spelled however it is invoked
    (`pip`, `python3 -m pip`) and without the flags that only change what pip prints."""
    if "pip install" not in line or line.lstrip().startswith("#"):
        return None
    words = shlex.split(line)
    if words[:2] in (["python3", "-m"], ["python", "-m"]):
        words = words[2:]
    if words[:2] != ["pip", "install"]:
        return None
    return [word for word in words[2:] if word not in ("--quiet", "-q")]


def _readme_block_with(marker: str) -> list[str]:
    blocks = [block for block in _bash_blocks(README.read_text()) if any(marker in line for line in block)]
    assert len(blocks) == 1, f"README should have one bash block with {marker!r}, found {len(blocks)}"
    return blocks[0]


def _torch_requirements(commands: list[list[str]]) -> list[str]:
    return [word for command in commands for word in command if re.match(r"torch\b", word)]


def test_ci_installs_with_readmes_cpu_commands():
    readme = [cmd for line in _readme_block_with("+cpu") if (cmd := _pip_install(line))]
    ci = [cmd for line in CI_SCRIPT.read_text().splitlines() if (cmd := _pip_install(line))]
    assert readme, "README's CPU block has no pip install"
    assert ci == readme


def test_the_cpu_torch_can_only_come_from_pytorchs_cpu_index():
    commands = [cmd for line in _readme_block_with("+cpu") if (cmd := _pip_install(line))]
    torch_command = next(cmd for cmd in commands if _torch_requirements([cmd]))
    (requirement,) = _torch_requirements([torch_command])
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+\+cpu", requirement), requirement
    index = torch_command[torch_command.index("--extra-index-url") + 1]
    assert index == "https://download.pytorch.org/whl/cpu"


def test_ci_runs_readmes_test_command():
    ci_lines = [line.strip() for line in CI_SCRIPT.read_text().splitlines() if line.strip()]
    test_command = ci_lines[-1]
    assert "pytest" in test_command
    assert any(test_command in block for block in _bash_blocks(README.read_text()))


def _workflow_install_commands() -> list[list[str]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    return [cmd for step in steps for line in step.get("run", "").splitlines() if (cmd := _pip_install(line.strip()))]


def test_the_gpu_workflow_pins_torch_to_readmes_gpu_build():
    workflow_pins = _torch_requirements(_workflow_install_commands())
    assert workflow_pins, "the workflow installs no torch"
    assert all(re.fullmatch(r"torch==\S+", pin) for pin in workflow_pins), workflow_pins
    readme_gpu = _torch_requirements(
        [cmd for line in _readme_block_with('".[quant]"') if (cmd := _pip_install(line))])
    assert workflow_pins == readme_gpu


def test_readmes_gpu_torch_is_the_one_the_committed_gpu_runs_used():
    (pin,) = _torch_requirements([cmd for line in _readme_block_with('".[quant]"') if (cmd := _pip_install(line))])
    version = pin.removeprefix("torch==")
    gpu_runs = {}
    for run_json in sorted(ROOT.glob("reports/*/run.json")):
        environment = json.loads(run_json.read_text())["environment"]
        if environment.get("gpu_name"):
            gpu_runs[run_json.parent.name] = (environment["versions"]["torch"], environment["cuda"])
    assert gpu_runs, "no committed GPU run to check against"
    assert {torch for torch, _ in gpu_runs.values()} == {version}, gpu_runs
    (cuda,) = {cuda for _, cuda in gpu_runs.values()}
    assert f"CUDA {cuda}" in README.read_text()
