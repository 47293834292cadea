"""``weights: checkpoint``: synthetic weights written once as a diffusers folder and loaded by from_pretrained."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

from flux2bench.axes import checkpoint
from flux2bench.axes.base import ArtifactPlaces
from flux2bench.errors import Unsupported
from flux2bench.sources import load_pipeline

from records import case

CASES = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 2, repeats: 1, warmup: 0, timeout_s: 300,
           prompts: a red fox, drift_baseline: "off"}
blocks:
  synthetic: {weights: synthetic}
  on-disk: {weights: checkpoint, text_encoder: [local, precomputed]}
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(checkpoint.CACHE_ENV, str(path))  # the workers inherit it
        yield path


@pytest.fixture(scope="module")
def on_disk(run_scenario, cache_dir):
    return run_scenario(CASES, "checkpoint")


@pytest.mark.slow
def test_the_checkpoint_is_a_diffusers_pipeline_folder_written_once(on_disk, cache_dir):
    (folder,) = cache_dir.iterdir()
    assert folder.name == "tiny-transformer_bf16-text_encoder_bf16-recipe1"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline" and index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert list((folder / "transformer").glob("*.safetensors")) and (folder / "tokenizer").is_dir()
    logs = sorted(p.name for p in (on_disk.store.root / "logs").glob("*-checkpoint.log"))
    assert len(logs) == 1  # two cases, one write


@pytest.mark.slow
def test_loading_the_checkpoint_gives_the_synthetic_image(on_disk):
    assert [r.status for r in on_disk.results] == ["ok"] * 3, [r.reason for r in on_disk.results]
    latents = [load_file(on_disk.store.root / r.outputs[0].latents)["latents"] for r in on_disk.results]
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[2])
    assert on_disk.results[1].setup.axes["checkpoint"]["path"].endswith("recipe1")


def test_an_interrupted_write_resumes_and_only_a_whole_checkpoint_is_used(tmp_path, monkeypatch):
    tiny = case(weights="checkpoint")
    final = checkpoint.checkpoint_path(tiny, tmp_path)
    partial = final.with_name(final.name + ".partial")
    written = []
    monkeypatch.setattr(checkpoint, "_parameter_bytes", lambda c, name, load: 1)
    monkeypatch.setattr(checkpoint, "_save_component",
                        lambda c, name, folder, load: written.append(name) or _fake_component(folder))
    monkeypatch.setattr(checkpoint, "_save_pipeline_files", lambda c, folder, load: None)
    (partial / "text_encoder").mkdir(parents=True)
    (partial / "text_encoder" / ".complete").write_text("")  # written before the kill
    (partial / "transformer").mkdir()  # cut mid-write: no marker
    assert not final.exists()
    checkpoint.AXIS.make_artifact(tiny, ArtifactPlaces(tmp_path, tmp_path), torch.device("cpu"), None,
                                  lambda message: None)
    assert written == ["transformer", "vae"] and final.is_dir() and not partial.exists()


def _fake_component(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".complete").write_text("")


@pytest.mark.slow  # builds FLUX.2-dev's full-size transformer and text encoder on the meta device
def test_a_checkpoint_that_does_not_fit_the_disk_is_refused_with_the_numbers(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**30, 99 * 2**30, 2**30))
    with pytest.raises(Unsupported, match=r"needs 110\.1 GiB more in .* has 1\.0 GiB free"):  # 104.8 GiB + 5%
        checkpoint.AXIS.make_artifact(case(model="flux2-dev", weights="checkpoint"), ArtifactPlaces(tmp_path, tmp_path),
                                      torch.device("cpu"), load_pipeline, lambda message: None)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux's fincore reads page-cache residency")
def test_eviction_leaves_none_of_the_checkpoint_in_the_page_cache(tmp_path):
    filesystem = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout
    if filesystem.strip() == "tmpfs":
        pytest.skip("the temporary folder is on tmpfs, whose pages are memory and cannot be evicted")
    shard = tmp_path / "transformer" / "model.safetensors"
    shard.parent.mkdir()
    shard.write_bytes(b"\x01" * 2**22)  # just written: dirty pages in the cache

    def resident_bytes() -> int:
        return int(subprocess.run(["fincore", "-bnr", "-o", "RES", str(shard)], capture_output=True, text=True,
                                  check=True).stdout)

    assert resident_bytes() > 0
    assert checkpoint.evict_from_page_cache(tmp_path).endswith("on 1 files (0.0 GiB)")
    assert resident_bytes() == 0


@pytest.mark.parametrize("settings, evicted", [
    ({"page_cache": "warm"}, False),
    ({"page_cache": "cold"}, True),
    ({"page_cache": "warm", "max_ram_gib": 16}, True),  # a cap counts only the pages its worker reads in
])
def test_a_cold_or_capped_case_starts_with_its_checkpoint_out_of_the_page_cache(settings, evicted, monkeypatch):
    monkeypatch.setattr(checkpoint, "evict_from_page_cache", lambda folder: f"evicted {folder.name}")
    applied = checkpoint.AXIS.before_load(case(weights="checkpoint", **settings), plan=None)
    assert ("page_cache_evicted" in applied) == evicted


def test_nf4_is_saved_pre_quantized_and_fp8_in_bf16():
    assert checkpoint.saved_precisions(case(precision="nf4", text_encoder_precision="fp8")) == {
        "vae": "bf16", "transformer": "nf4", "text_encoder": "bf16"}
