"""The artifact cache heals: a manifest that is not one, or an entry holding a link, is an entry to make again; a
full disk under the cache lets the run go on without it, says so once, leaves no partial entry, and the next run
makes the entry."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from flux2bench.artifact_cache import MANIFEST, ArtifactCache
from flux2bench.runner import Runner, RunProgress, SupervisorConfig, start_run

AXIS = "text_encoder"
NAME = "0123456789abcdef.safetensors"


def made(run_dir: Path, data: bytes = b"embeddings") -> Path:
    path = run_dir / "embeddings" / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def entry_of(cache_root: Path) -> Path:
    (entry,) = (cache_root / "entries").iterdir()
    return entry


@pytest.mark.parametrize("manifest", ["[]", "null", '{"identity": {}, "files": []}',
                                      '{"identity": IDENTITY, "files": {"NAME": null}}',
                                      '{"identity": IDENTITY, "files": {"NAME": {"bytes": "10", "sha256": "x"}}}',
                                      '{"identity": IDENTITY, "files": {"../../escape": {"bytes": 1, "sha256": "'
                                      + "0" * 64 + '"}}}'],
                         ids=["a-list", "null", "files-a-list", "null-file-entry", "wrong-types", "outside-name"])
def test_a_manifest_that_is_not_one_is_stale_removed_and_rebuilt(tmp_path, manifest):
    cache = ArtifactCache(tmp_path / "cache", warn=pytest.fail)
    cache.store(AXIS, made(tmp_path / "run1"))
    entry = entry_of(cache.root)
    identity = json.dumps(cache.identity(AXIS, made(tmp_path / "run1")))
    (entry / MANIFEST).write_text(manifest.replace("IDENTITY", identity).replace("NAME", NAME))
    target = tmp_path / "run2" / "embeddings" / NAME
    assert cache.restore(AXIS, target) in ("stale: no readable manifest", "stale: files missing or added")
    assert not entry.exists() and not target.exists()
    cache.store(AXIS, made(tmp_path / "run3", b"rebuilt"))
    assert cache.restore(AXIS, target) == "hit" and target.read_bytes() == b"rebuilt"


def test_an_entry_holding_a_link_is_never_read_through_it(tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"not the cache's")
    cache = ArtifactCache(tmp_path / "cache", warn=pytest.fail)
    cache.store(AXIS, made(tmp_path / "run1"))
    entry = entry_of(cache.root)
    (entry / NAME).unlink()
    (entry / NAME).symlink_to(secret)
    target = tmp_path / "run2" / "embeddings" / NAME
    assert cache.restore(AXIS, target) == f"stale: {NAME} is a link or not a regular file"
    assert not target.exists() and secret.read_bytes() == b"not the cache's" and not entry.exists()


def test_a_damaged_cache_folder_is_a_warning_not_a_failed_run(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "locks").write_text("a file where the locks folder goes")
    warnings: list[str] = []
    cache = ArtifactCache(tmp_path / "cache", warn=warnings.append)
    with cache.lock(AXIS, made(tmp_path / "run")):
        cache.store(AXIS, made(tmp_path / "run"))
    assert cache.restore(AXIS, tmp_path / "run2" / "embeddings" / NAME) == "miss"
    assert len(warnings) == 1 and "locks folder" in warnings[0]


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs (mounted as root where this machine allows it), filled to a few KiB but for ``free()``."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"no small tmpfs to fill here (mount -t tmpfs needs root): {done.stderr.strip()}")
    ballast = mount / "ballast"
    try:
        with open(ballast, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    yield mount, ballast.unlink
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_store_on_a_full_disk_warns_once_and_leaves_no_partial_entry(tmp_path, full_disk):
    mount, free = full_disk
    warnings: list[str] = []
    cache = ArtifactCache(mount / "cache", warn=warnings.append)
    for run in ("run1", "run2"):
        cache.store(AXIS, made(tmp_path / run, os.urandom(256 * 1024)))
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "goes on without it" in warnings[0]
    assert not [p for p in mount.rglob("*") if "partial" in p.name or p.suffix == ".tmp"]
    free()
    again = ArtifactCache(mount / "cache", warn=pytest.fail)
    again.store(AXIS, made(tmp_path / "run3", b"rebuilt"))
    assert again.restore(AXIS, tmp_path / "run4" / "embeddings" / NAME) == "hit"


PRECOMPUTED = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0, timeout_s: 120,
           prompts: "FAULT:none", drift_baseline: "off", text_encoder: precomputed}
blocks:
  only: {}
"""


def test_a_run_whose_cache_disk_is_full_goes_on_without_it_and_the_next_run_fills_it(tmp_path, full_disk,
                                                                                     fault_worker):
    mount, free = full_disk
    scenario = tmp_path / "precomputed.yaml"
    scenario.write_text(textwrap.dedent(PRECOMPUTED))
    warnings: list[str] = []
    outcomes = []
    for name in ("full", "freed"):
        if name == "freed":
            free()
        store, cases = start_run(scenario, run_dir=tmp_path / name)
        config = SupervisorConfig(worker_module=fault_worker, cache=mount / "cache")
        (result,) = Runner(store, config, progress=RunProgress(on_warning=warnings.append)).run(cases)
        outcomes.append((result.status, result.wall_split.artifacts_s > 0))
    assert outcomes == [("ok", True), ("ok", True)]  # the embeddings were made both times: nothing was cached
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert [p.name for p in (mount / "cache" / "entries").iterdir()] == [entry_of(mount / "cache").name]
    assert not [p for p in mount.rglob("*") if "partial" in p.name]


def test_the_command_says_once_that_it_goes_on_without_a_full_cache(tmp_path, full_disk, write_scenario):
    from typer.testing import CliRunner

    from conftest import TINY
    from flux2bench.cli import app

    mount, _ = full_disk
    scenario = write_scenario(textwrap.dedent(f"""
        defaults: {json.dumps({**TINY, "text_encoder": "precomputed", "drift_baseline": "off"})}
        blocks:
          only: {{}}
    """))
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "runs"), "--no-report",
                                      "--cache", str(mount / "cache")])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert output.count("warning: the artifact cache") == 1 and "No space left on device" in output
    assert "1 case: 1 ok" in output
