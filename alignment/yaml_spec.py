"""YAML with line numbers, for files people write by hand (constitutions, pipeline configs).

``load_yaml`` gives the same plain Python data as ``yaml.safe_load`` plus an index from
key paths to 1-based line numbers, so a validator can say ``file:line: what is wrong``.
It is stricter than ``safe_load`` in two ways: duplicate mapping keys are refused (safe_load
silently keeps the last one) and a stream must hold at most one document.

Problems that have no line of their own (the file is missing, unreadable or too big) are
reported at line 1, so ``file:line`` stays clickable in editors; a byte that is not UTF-8 is
reported at its own line.

A file over ``MAX_YAML_BYTES`` (1 MiB) is refused before it is read: these files are written
by hand and are a few kilobytes, and PyYAML, pure Python, would take minutes on 10 MB.

Why not ruamel.yaml's round-trip loader (installed with Prefect, 0.19): tried on the cases
tests/bad_inputs/ covers, it reports only the first duplicate key, accepts unknown tags
(``!foo`` becomes a TaggedScalar) and list keys (a tuple), gives merged keys no line, turns a
recursive alias into null without a word, and follows YAML 1.2 (``on`` a string, ``010`` ten) where
every file here was written against safe_load's YAML 1.1. Keeping those messages would need
this same walk over its output, so the composer below stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

KeyPath = tuple[Any, ...]  # mapping keys and list indices, from the root

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_YAML_BYTES = 1 << 20  # hand-written files only; the shipped ones are under 10 KB


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class SpecError(Exception):
    """One or more problems in a user-written file. str() is one 'file:line: message' per line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class LocatedYaml:
    data: Any  # plain python (dicts/lists/scalars) as yaml.safe_load would give
    file: str
    value_lines: dict[KeyPath, int] = field(default_factory=dict, repr=False)
    key_lines: dict[KeyPath, int] = field(default_factory=dict, repr=False)

    def line(self, *path: Any) -> int:
        """1-based line of the value at that key path (e.g. line("principles", 3, "checks", 0)).

        Falls back to the nearest ancestor that exists, and to 1.
        """
        for end in range(len(path), -1, -1):
            line = self.value_lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1

    def key_line(self, *path: Any) -> int:
        """1-based line of the key itself (an item's own line for a list index); else line()."""
        return self.key_lines.get(tuple(path)) or self.line(*path)


def load_yaml(path: str | Path) -> LocatedYaml:
    """Read and parse one YAML file; raises SpecError with the problem's line."""
    file = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_YAML_BYTES:
            message = (
                f"file is {size / 2**20:.1f} MiB; a YAML file written by hand must be at "
                f"most {MAX_YAML_BYTES // 2**20} MiB"
            )
            raise SpecError([Problem(file, 1, message)])
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise SpecError([Problem(file, 1, "file not found")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(file, 1, "is a directory, expected a YAML file")]) from None
    except OSError as e:
        raise SpecError([Problem(file, 1, f"cannot read file: {e.strerror or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        message = f"not UTF-8 text (byte {raw[e.start]:#04x} at column {column})"
        raise SpecError([Problem(file, line, message)]) from None
    return parse_yaml(text, file)


def parse_yaml(text: str, file: str = "<string>") -> LocatedYaml:
    """Parse YAML text; ``file`` only names the source in problems."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise SpecError([Problem(file, _error_line(e, text), _error_message(e))]) from None
    if root is None:  # empty file or only comments
        return LocatedYaml(None, file)
    builder = _Builder(file)
    data = builder.build(root, ())
    if builder.problems:
        raise SpecError(builder.problems)
    return LocatedYaml(data, file, builder.value_lines, builder.key_lines)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _error_line(error: yaml.YAMLError, text: str) -> int:
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(error, "position", None)  # ReaderError has an offset, not a mark
    if isinstance(position, int):
        return text.count("\n", 0, position) + 1
    return 1


def _error_message(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    if not problem:  # ReaderError and friends: their str() is already one sentence
        return f"YAML syntax error: {str(error).splitlines()[0]}"
    context = getattr(error, "context", None)
    if not context:
        return f"YAML syntax error: {problem}"
    context_mark = getattr(error, "context_mark", None)
    where = f", line {context_mark.line + 1}" if context_mark is not None else ""
    return f"YAML syntax error: {problem} ({context}{where})"


class _Builder:
    """Turns a composed node tree into plain data and a key-path → line index, in one pass."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []
        self.value_lines: dict[KeyPath, int] = {}
        self.key_lines: dict[KeyPath, int] = {}
        self._constructor = SafeConstructor()
        self._active: set[int] = set()  # nodes being built, to stop recursive aliases

    def fail(self, node: Node, message: str) -> None:
        self.problems.append(Problem(self.file, _line(node), message))

    def build(self, node: Node, path: KeyPath) -> Any:
        if id(node) in self._active:
            self.fail(node, "recursive alias: a node cannot contain itself")
            return None
        self._active.add(id(node))
        try:
            value = self._build_node(node, path)
        finally:
            self._active.discard(id(node))
        # Set after the children: a merge source built under this same path must not win.
        self.value_lines[path] = _line(node)
        return value

    def _build_node(self, node: Node, path: KeyPath) -> Any:
        if isinstance(node, ScalarNode):
            return self._scalar(node)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            self.fail(node, f"unsupported YAML tag {node.tag}")
            return None
        if isinstance(node, SequenceNode):
            return [self._item(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._mapping(node, path)

    def _scalar(self, node: ScalarNode) -> Any:
        try:
            return self._constructor.construct_object(node)
        except yaml.YAMLError as e:  # unknown tag such as !foo, or a malformed !!int
            self.fail(node, f"YAML error: {getattr(e, 'problem', None) or e}")
            return None

    def _item(self, node: Node, path: KeyPath) -> Any:
        self.key_lines[path] = _line(node)
        return self.build(node, path)

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[Any, Any]:
        merged = self._merge_sources(node, path)
        own: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode):
                self.fail(key_node, "mapping keys must be plain values, not lists or mappings")
                continue
            key = self._scalar(key_node)
            if key in first_line:
                self.fail(key_node, f"duplicate key '{key}' (first at line {first_line[key]})")
                continue
            first_line[key] = _line(key_node)
            self.key_lines[(*path, key)] = _line(key_node)
            own[key] = self.build(value_node, (*path, key))
        return {**merged, **own}

    def _merge_sources(self, node: MappingNode, path: KeyPath) -> dict[Any, Any]:
        """The mappings named by '<<' keys, earlier sources taking precedence (YAML merge)."""
        sources: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            is_seq = isinstance(value_node, SequenceNode)
            sources.extend(value_node.value if is_seq else [value_node])
        merged: dict[Any, Any] = {}
        for source in reversed(sources):
            if not isinstance(source, MappingNode):
                self.fail(source, "merge key '<<' needs a mapping or a list of mappings")
                continue
            merged.update(self.build(source, path))
        return merged


def show_value(value: Any) -> str:
    """A value as a short phrase for messages: 'heavy', 3, null, a mapping."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
