"""The one loader of the YAML files a user hands flux2bench (scenarios, ``compare --rules``): a regular file of at
most ``MAX_YAML_BYTES``, UTF-8, YAML 1.2 booleans and numbers, no duplicate key, nested at most ``MAX_YAML_DEPTH``
deep and bounded in the size its aliases expand to."""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

# Cases a scenario may expand to unless the caller raises the limit (flux2bench plan/run --max-cases).
MAX_CASES = 2000

# Values in the YAML once every alias is replaced by what it refers to: real scenarios have a few hundred, a
# "billion laughs" document of nested aliases billions.
MAX_YAML_VALUES = 100_000
# Mappings and lists inside one another: a scenario nests about 4 deep.
MAX_YAML_DEPTH = 32
MAX_YAML_BYTES = 4 * 2**20


class InputFileError(Exception):
    """A file the user gave that cannot be read as one; the message names it and is meant for the user as is."""


class ScenarioError(InputFileError):
    """A scenario file that cannot be run; the message is meant for the user as is."""


class _ScenarioLoader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans (only true/false: ``drift_baseline: off`` stays the string 'off'), which
    rejects a key given twice in one mapping instead of silently keeping the last."""

    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(None, None, "a key must be text, not a list or mapping",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_ScenarioLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$", re.IGNORECASE),
                                      list("tTfF"))
# Numbers as YAML 1.2 reads them: an integer is a decimal literal (YAML 1.1 read ``1:30`` as 90 and ``010`` as 8),
# a float has no base-60 form. Anything else is text, which a number field refuses.
for _first, _resolvers in list(_ScenarioLoader.yaml_implicit_resolvers.items()):
    _ScenarioLoader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in _resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
_ScenarioLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_ScenarioLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """Base 10 only: PyYAML's own constructor would still read ``010`` as octal."""
    return int(loader.construct_scalar(node))


_ScenarioLoader.add_constructor("tag:yaml.org,2002:int", _construct_decimal_int)


class _RecursiveAlias(Exception):
    def __init__(self, node: yaml.Node):
        self.line = node.start_mark.line + 1


class _TooDeep(Exception):
    def __init__(self, node: yaml.Node):
        self.line = node.start_mark.line + 1


def _expanded_size(node: yaml.Node, sizes: dict[int, tuple[int, int]], open_nodes: set[int],
                   depth: int = 1) -> tuple[int, int]:
    """The number of values under ``node`` once every alias is replaced by a copy of its anchor's node, and how deep
    they nest, counted on the composed graph (an alias is the anchor's node object again), so the expanded document
    is never built."""
    if depth > MAX_YAML_DEPTH:
        raise _TooDeep(node)
    if id(node) in sizes:
        size, height = sizes[id(node)]
        if depth + height - 1 > MAX_YAML_DEPTH:
            raise _TooDeep(node)
        return size, height
    if id(node) in open_nodes:
        raise _RecursiveAlias(node)
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    measured = [_expanded_size(child, sizes, open_nodes, depth + 1) for child in children]
    sizes[id(node)] = (1 + sum(size for size, _ in measured), 1 + max((height for _, height in measured), default=0))
    open_nodes.discard(id(node))
    return sizes[id(node)]


def _check_expanded_size(path: Path, node: yaml.Node) -> None:
    try:
        size, _ = _expanded_size(node, {}, set())
    except _RecursiveAlias as exc:
        raise InputFileError(f"{path}: the value at line {exc.line} contains an alias to itself") from None
    except _TooDeep as exc:
        raise InputFileError(f"{path}: the value at line {exc.line} is nested more than {MAX_YAML_DEPTH} mappings "
                             "or lists deep") from None
    if size > MAX_YAML_VALUES:
        raise InputFileError(f"{path}: the YAML expands to {size:,} values once its aliases (*name) are replaced by "
                             f"what they refer to; the limit is {MAX_YAML_VALUES:,}")


def _read_text(path: Path, kind: str) -> str:
    """The file's text; only a regular file is read (a FIFO would block, /dev/zero never end), and only so much."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        near = [c for c in (path.with_suffix(".yaml"), Path("scenarios") / path.name,
                            Path("scenarios") / f"{path.name}.yaml") if c != path and c.is_file()]
        siblings = [p.stem for p in path.parent.glob("*.yaml")] if path.parent.is_dir() else []
        near += [path.parent / f"{stem}.yaml" for stem in difflib.get_close_matches(path.stem, siblings, 1)]
        raise InputFileError(f"{path}: no such file" + (f"; did you mean {near[0]}?" if near else "")) from None
    except OSError as exc:  # a link loop, no permission
        raise InputFileError(f"{path}: cannot be read: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # checked before fdopen, which refuses a directory with an OSError of its own
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise InputFileError(f"{path}: is a directory, not a {kind} file")
        raise InputFileError(f"{path}: is not a regular file (a device, FIFO or socket); a {kind} file is a YAML "
                             "file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_YAML_BYTES + 1)
        except OSError as exc:
            raise InputFileError(f"{path}: cannot be read: {exc.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise InputFileError(f"{path}: larger than {MAX_YAML_BYTES // 2**20} MiB; a {kind} file is far smaller")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputFileError(f"{path}: not UTF-8 text: the byte at offset {exc.start} (line {line}) is "
                             f"0x{data[exc.start]:02x}; save the file as UTF-8") from None


def _construct_bounded(path: Path, loader: _ScenarioLoader) -> Any:
    """The document, once its alias-expanded size is known to be within the limit."""
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(path, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path, kind: str = "scenario") -> Any:
    """The document in the user's YAML file ``path`` (a ``kind`` file: "scenario", "gate rules"); InputFileError
    (ScenarioError for a scenario) with one line naming the file otherwise."""
    error = ScenarioError if kind == "scenario" else InputFileError
    try:
        text = _read_text(path, kind)
        return _construct_bounded(path, _ScenarioLoader(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{path}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise error(f"{path}: the YAML is nested too deeply") from None
    except InputFileError as exc:
        raise error(str(exc)) from None
