"""The artifact cache across runs: hit, miss, stale, corrupt, concurrent writers, and the runner using it."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from flux2bench.artifact_cache import MANIFEST, ArtifactCache, cache_root
from flux2bench.axes.text_encoder import embedding_cache_path

AXIS = "text_encoder"


def made(run_dir: Path, text: bytes = b"embeddings") -> Path:
    """An artifact as an axis's worker leaves it in a run directory."""
    path = run_dir / "embeddings" / "0123456789abcdef.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    return path


def in_run(run_dir: Path) -> Path:
    return run_dir / "embeddings" / "0123456789abcdef.safetensors"


def test_a_stored_artifact_is_restored_into_another_run(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    cache.store(AXIS, made(tmp_path / "run1"))
    target = in_run(tmp_path / "run2")
    assert cache.restore(AXIS, target) == "hit"
    assert target.read_bytes() == b"embeddings"


def test_an_artifact_never_stored_is_a_miss(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.restore(AXIS, in_run(tmp_path / "run")) == "miss"
    assert not in_run(tmp_path / "run").exists()


def test_an_entry_made_with_other_library_versions_is_never_used(tmp_path):
    old = ArtifactCache(tmp_path / "cache")
    old.versions = {**old.versions, "diffusers": "0.0.1"}
    old.store(AXIS, made(tmp_path / "run1"))
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.restore(AXIS, in_run(tmp_path / "run2")) == "miss"  # the versions are part of the key
    assert old.restore(AXIS, in_run(tmp_path / "run3")) == "hit"
    assert old.checkpoints_dir != cache.checkpoints_dir


@pytest.mark.parametrize("damage,problem", [
    (lambda entry: (entry / "0123456789abcdef.safetensors").write_bytes(b"embeddingz"), "checksum differs"),
    (lambda entry: (entry / "0123456789abcdef.safetensors").write_bytes(b"embed"), "size differs"),
    (lambda entry: (entry / MANIFEST).write_text("{not json"), "no readable manifest"),
    (lambda entry: (entry / MANIFEST).unlink(), "no readable manifest"),
    (lambda entry: (entry / "extra.bin").write_bytes(b"x"), "files missing or added"),
])
def test_a_corrupt_entry_is_never_used_and_is_removed(tmp_path, damage, problem):
    cache = ArtifactCache(tmp_path / "cache")
    cache.store(AXIS, made(tmp_path / "run1"))
    (entry,) = (tmp_path / "cache" / "entries").iterdir()
    damage(entry)
    target = in_run(tmp_path / "run2")
    state = cache.restore(AXIS, target)
    assert state.startswith("stale: ") and state.endswith(problem)
    assert not target.exists() and not entry.exists()
    cache.store(AXIS, made(tmp_path / "run3", b"rebuilt"))
    assert cache.restore(AXIS, target) == "hit" and target.read_bytes() == b"rebuilt"


def test_a_checkpoint_folder_in_the_cache_is_verified_in_place(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    folder = cache.checkpoints_dir / "flux2-dev-transformer_bf16-text_encoder_bf16-recipe1"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "transformer" / ".complete").write_text("")
    assert cache.restore("checkpoint", folder) == "stale: no readable manifest"  # a folder nobody vouched for
    assert not folder.exists()
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    cache.store("checkpoint", folder)
    assert cache.restore("checkpoint", folder) == "hit"
    (folder / "transformer" / "config.json").write_text("[]")
    assert cache.restore("checkpoint", folder).startswith("stale: transformer/config.json: checksum differs")


def _writer(root: str, run_dir: str, builds: str) -> str:
    cache, target = ArtifactCache(Path(root)), in_run(Path(run_dir))
    with cache.lock(AXIS, target):
        state = cache.restore(AXIS, target)
        if state != "hit":
            with open(builds, "a") as log:
                log.write("built\n")
            time.sleep(0.3)  # a slow maker: the other writer must wait, not make it too
            made(Path(run_dir), b"made once")
            cache.store(AXIS, target)
    return target.read_bytes().decode()


def test_concurrent_writers_make_an_artifact_once_and_both_use_it(tmp_path):
    builds = tmp_path / "builds.log"
    args = [(str(tmp_path / "cache"), str(tmp_path / f"run{i}"), str(builds)) for i in range(4)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        contents = pool.starmap(_writer, args)
    assert contents == ["made once"] * 4
    assert builds.read_text() == "built\n"
    assert not list((tmp_path / "cache" / "entries").glob(".*"))  # no partial entry left behind


def test_the_cache_folder_comes_from_the_option_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUX2BENCH_CACHE", raising=False)
    assert cache_root(None) is None
    monkeypatch.setenv("FLUX2BENCH_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env"
    assert cache_root(tmp_path / "option") == tmp_path / "option"


PRECOMPUTED = {"blocks": {"precomputed": {**TINY, "text_encoder": "precomputed"}}}


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory):
    """The same scenario run twice with one cache folder: cold, then warm."""
    from flux2bench.runner import Runner, SupervisorConfig, start_run

    root = tmp_path_factory.mktemp("cached")
    scenario = root / "precomputed.yaml"
    scenario.write_text(yaml.safe_dump(PRECOMPUTED))
    cache = ArtifactCache(root / "cache")
    runs = []
    for name in ("cold", "warm"):
        store, cases = start_run(scenario, run_dir=root / name)
        (result,) = Runner(store, SupervisorConfig(cache=cache.root)).run(cases)
        assert result.status == "ok", f"{result.reason}\n{result.error}"
        runs.append((store.root, cases[0], result))
    return runs


@pytest.mark.slow
def test_a_warm_cache_skips_the_embedding_worker(cached_runs):
    (cold_dir, case, cold), (warm_dir, _, warm) = cached_runs
    assert (cold_dir / "logs" / f"{case.key}-text_encoder.log").exists()
    assert not (warm_dir / "logs" / f"{case.key}-text_encoder.log").exists()
    assert cold.wall_split.artifacts_s > 0 and warm.wall_split.artifacts_s == 0
    assert embedding_cache_path(warm_dir, case).read_bytes() == embedding_cache_path(cold_dir, case).read_bytes()


@pytest.mark.slow
def test_a_warm_cache_measures_the_same_images(cached_runs):
    (cold_dir, _, cold), (warm_dir, _, warm) = cached_runs
    assert [o.image for o in cold.outputs] == [o.image for o in warm.outputs]
    for output in cold.outputs:
        assert (cold_dir / output.latents).read_bytes() == (warm_dir / output.latents).read_bytes()


def test_a_cache_folder_that_is_a_file_is_refused_before_a_run_directory_exists(tmp_path):
    from typer.testing import CliRunner

    from flux2bench.cli import app

    scenario = tmp_path / "s.yaml"
    scenario.write_text("defaults: {model: tiny, device: cpu, resolution: 64, steps: 1}\nblocks: {a: {}}\n")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "runs"),
                                      "--cache", str(not_a_folder)])
    assert result.exit_code == 2 and "--cache" in result.output and "is a file, not a folder" in result.output
    assert not (tmp_path / "runs").exists()
