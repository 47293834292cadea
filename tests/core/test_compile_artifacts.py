"""Entries of compiled code in the artifact cache: the key covers everything the compiled code depends on, and an
entry that is stale or corrupt in any way is removed and never handed to torch."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from flux2bench import compile_artifacts
from flux2bench.artifact_cache import ArtifactCache
from flux2bench.axes.compile_cache import key_inputs
from flux2bench.compile_artifacts import (BYTES_MEMBER, ENTRY_MEMBER, KERNELS, CompiledCode, StaleEntry, key_of,
                                          kernels_in, load_into_torch, put_kernels, read_entry, write_entry)

CPU = torch.device("cpu")
CONFIG = {"_class_name": "Flux2Transformer2DModel", "_diffusers_version": "0.42.1", "num_layers": 1,
          "num_attention_heads": 2, "attention_head_dim": 16}


class Transformer:
    """What the key reads of a transformer: its class and its config."""

    def __init__(self, **config: Any):
        self.config = {**CONFIG, **config}


def key(case, transformer: Transformer | None = None) -> str:
    return key_of(key_inputs(case, transformer or Transformer(), CPU))


# --- the key ---------------------------------------------------------------------------------------------------

COMPILED = {"compile": "regional", "warmup": 1}


@pytest.mark.parametrize("change", [
    {"precision": "int8"}, {"resolution": 128}, {"resolution": "64x128"}, {"reference_images": 1},
    {"batch_size": 2}, {"compile": "full"}, {"compile_mode": "max-autotune-no-cudagraphs"},
    {"compile_fullgraph": True}, {"inductor_preset": "flux-fast"}, {"attention_precision": "fp8"},
    {"fuse_qkv": True}, {"attention": "fa3"}, {"cache": "taylorseer"}, {"model": "tiny-klein"},
])
def test_each_option_and_shape_of_the_case_changes_the_key(tiny_case, change):
    assert key(tiny_case(**{**COMPILED, **change})) != key(tiny_case(**COMPILED))


def test_the_models_config_and_class_change_the_key_its_bookkeeping_does_not(tiny_case):
    case = tiny_case(**COMPILED)
    assert key(case, Transformer(num_layers=2)) != key(case)
    assert key(case, Transformer(_name_or_path="/elsewhere", _diffusers_version="0.43.0")) == key(case)

    class Other(Transformer):
        pass

    assert key(case, Other()) != key(case)


@pytest.mark.parametrize("library", ["torch", "triton", "diffusers", "torchao"])
def test_each_library_version_changes_the_key(tiny_case, monkeypatch, library):
    case = tiny_case(**COMPILED)
    before = key(case)
    real = compile_artifacts._version
    monkeypatch.setattr(compile_artifacts, "_version", lambda name: "9.9.9" if name == library else real(name))
    assert key(case) != before


def test_the_cuda_version_and_the_device_change_the_key(tiny_case, monkeypatch):
    case = tiny_case(**COMPILED)
    before = key(case)
    monkeypatch.setattr(torch.version, "cuda", "99.0")
    assert key(case) != before
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "another ISA")
    assert key(case) != before


def test_seeds_prompts_and_steps_leave_the_key_unchanged(tiny_case):
    case = tiny_case(**COMPILED)
    assert key(tiny_case(**COMPILED, seeds=[5, 6], prompts="a blue bird", steps=4, repeats=3)) == key(case)


# --- entries ---------------------------------------------------------------------------------------------------

INPUTS = {"format": 2, "model": "tiny", "options": {"compile": "regional"}}
MADE_BY = {"case": "tiny-0123456789ab", "at": "2025-06-01T12:00:00+00:00", "compile_s": 12.5, "graphs_compiled": 2}
KERNEL_FILES = {"ab12/triton_poi_fused_0.cubin": b"\x7fELF kernel", "ab12/triton_poi_fused_0.json": b"{}",
                "__grp__ab12.json": b'{"child_paths": {}}'}


def stored(tmp_path: Path, artifacts: bytes = b"compiled code") -> CompiledCode:
    code = CompiledCode(ArtifactCache(tmp_path / "cache"), INPUTS)
    code.store(artifacts, MADE_BY)
    return code


def entry_file(code: CompiledCode) -> Path:
    (path,) = (code.cache.root / "entries").glob(f"*/{code.name}")
    return path


def test_a_stored_entry_is_restored_whole_with_what_made_it(tmp_path):
    entry = stored(tmp_path).restore()
    assert (entry.state, entry.artifacts, entry.made_by) == ("hit", b"compiled code", MADE_BY)


def test_a_key_never_stored_is_a_miss(tmp_path):
    assert CompiledCode(ArtifactCache(tmp_path / "cache"), INPUTS).restore().state == "miss"


def test_the_kernel_files_of_a_triton_cache_folder_come_back_byte_for_byte_in_another(tmp_path):
    made = tmp_path / "made" / "triton"
    put_kernels(KERNEL_FILES, made)
    code = CompiledCode(ArtifactCache(tmp_path / "cache"), INPUTS)
    code.store(b"compiled code", MADE_BY, kernels_in(made))
    entry = code.restore()
    assert entry.kernels == KERNEL_FILES
    written = put_kernels(entry.kernels, tmp_path / "next" / "triton")
    assert written == {"files": 3, "bytes": sum(map(len, KERNEL_FILES.values()))}
    assert kernels_in(tmp_path / "next" / "triton") == KERNEL_FILES


def test_a_folder_that_does_not_exist_has_no_kernel_files(tmp_path):
    assert kernels_in(tmp_path / "none") == {}


def rewrite(path: Path, entry: dict[str, Any] | None = None, artifacts: bytes | None = None,
            members: dict[str, bytes] | None = None) -> None:
    """Write the entry file again with some of its content replaced (and its cache manifest made to match, as a
    manifest cannot tell a wrong entry that was written whole)."""
    with zipfile.ZipFile(path) as archive:
        old_entry, old_bytes = json.loads(archive.read(ENTRY_MEMBER)), archive.read(BYTES_MEMBER)
        old_members = {n: archive.read(n) for n in archive.namelist() if n.startswith(KERNELS)}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(ENTRY_MEMBER, json.dumps({**old_entry, **(entry or {})}))
        archive.writestr(BYTES_MEMBER, old_bytes if artifacts is None else artifacts)
        for name, data in (old_members if members is None else members).items():
            archive.writestr(name, data)


def listed(files: dict[str, bytes]) -> dict[str, Any]:
    return {"kernels": {name: compile_artifacts._sha256(data) for name, data in files.items()}}


@pytest.mark.parametrize("damage, reason", [
    (lambda path: rewrite(path, {"format": 0}), "format 0"),
    (lambda path: rewrite(path, {"inputs": {**INPUTS, "model": "other"}}), "made for other inputs"),
    (lambda path: rewrite(path, artifacts=b"compiled cod3"), "differ from their recorded SHA-256"),
    (lambda path: path.write_bytes(path.read_bytes()[:40]), "unreadable"),
    (lambda path: rewrite(path, members={KERNELS + "ab12/triton_poi_fused_0.json": b"{}"}),
     "kernel files differ from the files it lists"),
    (lambda path: rewrite(path, members={**{KERNELS + n: d for n, d in KERNEL_FILES.items()},
                                         KERNELS + "extra.cubin": b""}), "kernel files differ from the files it lists"),
    (lambda path: rewrite(path, members={KERNELS + n: d.upper() for n, d in KERNEL_FILES.items()}),
     "differs from its recorded SHA-256"),
    (lambda path: rewrite(path, listed({"../outside.cubin": b"x"}), members={KERNELS + "../outside.cubin": b"x"}),
     "leaves its folder"),
    (lambda path: rewrite(path, listed({"/etc/x": b"x"}), members={KERNELS + "/etc/x": b"x"}), "leaves its folder"),
    (lambda path: rewrite(path, {"kernels": ["ab12"]}), "kernels: Input should be a valid dictionary"),
    (lambda path: rewrite(path, {"key": "0" * 64}), "its key is not the hash of its inputs"),
    (lambda path: rewrite(path, {"bytes": True}), "bytes: Input should be a valid integer"),
])
def test_a_stale_or_corrupt_entry_is_refused_by_its_reader(tmp_path, damage, reason):
    path = tmp_path / "entry.zip"
    write_entry(path, b"compiled code", INPUTS, MADE_BY, KERNEL_FILES)
    damage(path)
    with pytest.raises(StaleEntry, match=reason):
        read_entry(path, INPUTS)


def replace_entry_json(path: Path, text: bytes) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != ENTRY_MEMBER}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(ENTRY_MEMBER, text)
        for name, data in members.items():
            archive.writestr(name, data)


NESTED = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize("files, reason", [
    ({"x": b"a file", "x/y": b"a file in a folder of the same name"}, "both a kernel file and a folder of others"),
    ({"k" * 300: b"a name longer than a file system allows"}, "too long"),
    ({"/".join(["k" * 200] * 6): b"a path longer than a kernel's"}, "too long"),
])
def test_kernel_files_that_cannot_be_put_in_a_folder_make_an_entry_stale(tmp_path, files, reason):
    path = tmp_path / "entry.zip"
    write_entry(path, b"compiled code", INPUTS, MADE_BY, files)  # manifest and SHA-256s consistent
    with pytest.raises(StaleEntry, match=reason):
        read_entry(path, INPUTS)


def test_an_entry_json_nested_beyond_any_parsers_depth_is_stale_not_an_error(tmp_path):
    path = tmp_path / "entry.zip"
    write_entry(path, b"compiled code", INPUTS, MADE_BY, KERNEL_FILES)
    replace_entry_json(path, NESTED)
    with pytest.raises(StaleEntry, match="recursion limit"):
        read_entry(path, INPUTS)


def without(field: str) -> dict[str, Any]:
    return {name: value for name, value in MADE_BY.items() if name != field}


@pytest.mark.parametrize("made_by, reason", [
    ({**MADE_BY, "compile_s": math.nan}, "made_by.compile_s: Input should be a finite number"),
    ({**MADE_BY, "compile_s": math.inf}, "made_by.compile_s: Input should be a finite number"),
    ({**MADE_BY, "compile_s": -1.0}, "made_by.compile_s: Input should be greater than or equal to 0"),
    ({**MADE_BY, "compile_s": 1e12}, "made_by.compile_s: Input should be less than or equal to"),
    ({**MADE_BY, "compile_s": "12.5"}, "made_by.compile_s: Input should be a valid number"),
    ({**MADE_BY, "compile_s": True}, "made_by.compile_s: Input should be a valid number"),
    ({**MADE_BY, "graphs_compiled": -1}, "made_by.graphs_compiled: Input should be greater than or equal to 0"),
    ({**MADE_BY, "graphs_compiled": 2.5}, "made_by.graphs_compiled: Input should be a valid integer"),
    ({**MADE_BY, "case": 5}, "made_by.case: Input should be a valid string"),
    ({**MADE_BY, "case": "../../results/x"}, "made_by.case: String should match pattern"),
    ({**MADE_BY, "at": "yesterday"}, "made_by.at: Value error, not an ISO 8601 time with its time zone"),
    ({**MADE_BY, "at": "2025-06-01T12:00:00"}, "made_by.at: Value error, not an ISO 8601 time with its time zone"),
    (without("compile_s"), "made_by.compile_s: Field required"),
    ({**MADE_BY, "extra": 1}, "made_by.extra: Extra inputs are not permitted"),
    (None, "made_by: Input should be"),
])
def test_what_made_an_entry_is_read_as_untrusted_input_and_an_entry_it_fails_is_stale(tmp_path, made_by, reason):
    path = tmp_path / "entry.zip"
    write_entry(path, b"compiled code", INPUTS, MADE_BY, KERNEL_FILES)
    rewrite(path, {"made_by": made_by})
    with pytest.raises(StaleEntry, match=reason):
        read_entry(path, INPUTS)


def store_entry_json(code: CompiledCode, text: bytes) -> None:
    """Store, whole and with a cache manifest that matches it, an entry whose entry.json is ``text``."""
    path = code.cache.root.parent / "made" / code.name
    path.parent.mkdir()
    write_entry(path, b"compiled code", INPUTS, MADE_BY, KERNEL_FILES)
    replace_entry_json(path, text)
    code.cache.store(compile_artifacts.AXIS_NAME, path)


@pytest.mark.parametrize("store_damaged, reason", [
    (lambda code: code.store(b"compiled code", MADE_BY, {"x": b"a file", "x/y": b"and a folder"}),
     "both a kernel file and a folder of others"),
    (lambda code: code.store(b"compiled code", MADE_BY, {"k" * 300: b"a name too long"}), "too long"),
    (lambda code: code.store(b"compiled code", {**MADE_BY, "compile_s": math.nan}), "made_by.compile_s"),
    (lambda code: store_entry_json(code, NESTED), "recursion limit"),
], ids=["colliding-kernel-paths", "kernel-name-too-long", "nan-compile-time", "nested-entry-json"])
def test_a_damaged_entry_stored_whole_is_removed_on_restore_and_made_again(tmp_path, store_damaged, reason):
    code = CompiledCode(ArtifactCache(tmp_path / "cache", warn=pytest.fail), INPUTS)
    store_damaged(code)
    entry = code.restore()
    assert entry.state.startswith("stale: ") and reason in entry.state
    assert (entry.artifacts, entry.made_by, entry.kernels) == (None, {}, {})
    assert code.restore().state == "miss"
    code.store(b"new code", MADE_BY, KERNEL_FILES)
    assert (code.restore().artifacts, code.restore().kernels) == (b"new code", KERNEL_FILES)


def test_an_entry_whose_file_changed_in_the_cache_is_removed_and_made_again(tmp_path):
    code = stored(tmp_path)
    path = entry_file(code)
    path.write_bytes(path.read_bytes().replace(b"compiled code", b"compiled cod3"))
    entry = code.restore()
    assert entry.state.startswith("stale: ") and entry.artifacts is None
    assert not path.exists() and code.restore().state == "miss"
    code.store(b"new code", MADE_BY)
    assert code.restore().artifacts == b"new code"


def test_an_entry_that_passes_the_caches_manifest_but_not_its_own_checks_is_removed(tmp_path):
    code = stored(tmp_path)
    wrong = tmp_path / "elsewhere" / code.name
    wrong.parent.mkdir()
    wrong.write_bytes(entry_file(code).read_bytes())
    rewrite(wrong, {"inputs": {"format": 1}})
    code.cache.store(compile_artifacts.AXIS_NAME, wrong)  # stored whole, with a manifest that matches it
    entry = code.restore()
    assert entry.state == "stale: made for other inputs than its name says"
    assert code.restore().state == "miss"


def test_bytes_torch_cannot_read_are_a_stale_entry_not_an_error():
    with pytest.raises(StaleEntry, match="torch could not"):
        load_into_torch(b"not torch's artifacts")
