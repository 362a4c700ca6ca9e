"""The constitution: written principles, loaded from YAML, validated with file and line.

A principle is one CAI principle: the text the judge is asked to apply ("Choose the response
that ..."), an SL-CAI critique request and revision request, an optional sampling ``weight``,
optional ``tags``, and optional ``checks``: propositions decided without a model.

A constitution's identity is the sha256 of its canonical JSON form, so comments, formatting,
key order and YAML quoting style never change it and any change of content always does.
Texts are stripped of leading/trailing whitespace (a ``|`` block and a plain scalar with the
same words are the same principle). An optional key given an empty value counts as absent.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from alignment.yaml_spec import LocatedYaml, Problem, SpecError, load_yaml, show_value

CheckKind = Literal["regex_must", "regex_must_not", "max_words", "min_words"]
# What a check reads: the response (the assistant's last turn), or every assistant turn of
# a multi-turn prompt's conversation and then the response.
Scope = Literal["last_turn", "conversation"]
SCOPES: tuple[Scope, ...] = ("last_turn", "conversation")

TOP_KEYS = ("name", "version", "description", "principles")
TOP_REQUIRED = ("name", "version", "principles")
PRINCIPLE_KEYS = ("id", "principle", "critique", "revision", "weight", "tags", "checks")
PRINCIPLE_REQUIRED = ("id", "principle", "critique", "revision")
CHECK_KINDS: tuple[CheckKind, ...] = ("regex_must", "regex_must_not", "max_words", "min_words")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Check:
    kind: CheckKind
    value: str | int
    scope: Scope = "last_turn"

    def passes(self, response: str, earlier: Sequence[str] = ()) -> bool:
        """Whether the response passes; ``earlier``: the assistant's earlier turns, read
        too under the conversation scope (joined by blank lines, so words never merge)."""
        if self.scope == "conversation":
            response = "\n\n".join([*earlier, response])
        if self.kind == "regex_must":
            return re.search(str(self.value), response) is not None
        if self.kind == "regex_must_not":
            return re.search(str(self.value), response) is None
        words = len(response.split())
        return words <= int(self.value) if self.kind == "max_words" else words >= int(self.value)

    def describe(self) -> str:
        what = {
            "regex_must": f"must match /{self.value}/",
            "regex_must_not": f"must not match /{self.value}/",
            "max_words": f"at most {self.value} words",
            "min_words": f"at least {self.value} words",
        }[self.kind]
        return what if self.scope == "last_turn" else f"{what} (whole conversation)"

    def as_dict(self) -> dict[str, Any]:
        """As written in a constitution; the default scope is left out, so a check's
        canonical form (and the ids hashing it) is what it was before scopes."""
        written: dict[str, Any] = {self.kind: self.value}
        return written if self.scope == "last_turn" else written | {"scope": self.scope}


@dataclass(frozen=True)
class Principle:
    id: str
    text: str
    critique: str
    revision: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()

    def failed_checks(self, response: str, earlier: Sequence[str] = ()) -> list[Check]:
        """The checks the response fails; [] when all pass or there are none. ``earlier``:
        the assistant's earlier turns in the conversation (conversation-scope checks)."""
        return [check for check in self.checks if not check.passes(response, earlier)]


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    description: str
    principles: tuple[Principle, ...]
    path: str = field(default="", compare=False)  # where it was loaded from; "" when in memory

    @property
    def content(self) -> str:
        """Canonical JSON text: what the id hashes, and what the store keeps."""
        canonical = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "principles": [_canonical_principle(p) for p in self.principles],
        }
        return json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def constitution_id(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        known = ", ".join(p.id for p in self.principles)
        raise KeyError(f"no principle '{principle_id}' in constitution '{self.name}' ({known})")

    def sample_principle(self, key: str, seed: int) -> Principle:
        """One principle drawn by weight, deterministic in (seed, key), across processes.

        An exponential race: each principle draws its own uniform u from (seed, key, its
        id) and the smallest -ln(u) / weight wins, which is P(weight / total). Because
        each principle's draw depends only on its own id, editing one principle's weight
        (or adding or removing one) moves only the draws that principle wins or loses,
        so incremental re-labelling recomputes only those comparisons.
        """

        def arrival(p: Principle) -> float:
            digest = hashlib.sha256(f"{seed}:{key}:{p.id}".encode()).digest()
            u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64  # in (0, 1)
            return -math.log(u) / p.weight if p.weight > 0 else math.inf

        return min(self.principles, key=arrival)


def _canonical_principle(p: Principle) -> dict[str, Any]:
    return {
        "id": p.id,
        "text": p.text,
        "critique": p.critique,
        "revision": p.revision,
        "weight": p.weight,
        "tags": list(p.tags),
        "checks": [c.as_dict() for c in p.checks],
    }


def load_constitution(path: str | Path) -> Constitution:
    """Load and validate one constitution file; raises SpecError listing every problem."""
    doc = load_yaml(path)
    constitution, problems = _read(doc)
    if problems or constitution is None:
        raise SpecError(problems)
    return replace(constitution, path=str(path))


def from_dict(data: dict, file: str = "<memory>") -> Constitution:
    """Validate already-parsed data (no line numbers: problems point at line 1)."""
    constitution, problems = _read(LocatedYaml(data, file))
    if problems or constitution is None:
        raise SpecError(problems)
    return constitution


def lint(paths: Sequence[str | Path]) -> list[Problem]:
    """Every problem across the files ([] if all are valid); a directory means its *.yaml/*.yml."""
    problems: list[Problem] = []
    for path in _expand(paths):
        try:
            load_constitution(path)
        except SpecError as e:
            problems.extend(e.problems)
    return problems


def _expand(paths: Sequence[str | Path]) -> Iterator[str | Path]:
    for path in paths:
        if Path(path).is_dir():
            yield from sorted([*Path(path).glob("*.yaml"), *Path(path).glob("*.yml")])
        else:
            yield path


# ---------------------------------------------------------------- validation


class _Reader:
    """Collects problems while reading one document; every check reports, none stops the rest."""

    def __init__(self, doc: LocatedYaml):
        self.doc = doc
        self.problems: list[Problem] = []

    def at(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.doc.file, line, message))

    def value(self, path: tuple[Any, ...], message: str) -> None:
        self.at(self.doc.line(*path), message)

    def keys(
        self,
        mapping: dict,
        path: tuple,
        allowed: Sequence[str],
        required: Sequence[str],
        where: str,
    ) -> None:
        """Report unknown keys (at the key's line) and missing required ones (at the mapping)."""
        for key in mapping:
            if key not in allowed:
                self.at(self.doc.key_line(*path, key), _unknown_key(key, allowed, where))
        for key in required:
            if key not in mapping:
                self.value(path, f"missing required key '{key}' {where}")

    def text(self, mapping: dict, path: tuple, key: str, where: str) -> str | None:
        """A required non-empty string; None (and a problem) otherwise. Missing keys are
        reported by keys()."""
        if key not in mapping:
            return None
        value = mapping[key]
        if not isinstance(value, str):
            self.value((*path, key), f"{key} {where} must be a string, got {show_value(value)}")
            return None
        if not value.strip():
            self.value((*path, key), f"{key} {where} is empty")
            return None
        return value.strip()

    def optional_list(self, raw: Any, path: tuple, key: str, where: str, holding: str) -> list:
        """The list under ``key``: empty when absent, and empty (and a problem) when it is not
        a list; ``holding`` says what the list must be, for the message."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.value((*path, key), f"{key} {where} must be {holding}, got {show_value(raw)}")
            return []
        return raw


def _read(doc: LocatedYaml) -> tuple[Constitution | None, list[Problem]]:
    r = _Reader(doc)
    data = doc.data
    if not isinstance(data, dict):
        expected = f"a mapping with keys {', '.join(TOP_REQUIRED)}"
        got = "the file is empty" if data is None else f"got {show_value(data)}"
        r.value((), f"top level must be {expected}; {got}")
        return None, r.problems
    where = "at top level"
    r.keys(data, (), TOP_KEYS, TOP_REQUIRED, where)
    name = r.text(data, (), "name", where)
    version = _version(r, data)
    description = _description(r, data)
    principles = _principles(r, data.get("principles"), "principles" in data)
    if r.problems:
        return None, sorted(r.problems, key=lambda p: p.line)
    assert name is not None and version is not None
    return Constitution(name, version, description, tuple(principles)), []


def _version(r: _Reader, data: dict) -> str | None:
    if "version" not in data:
        return None
    version = data["version"]
    if isinstance(version, int) and not isinstance(version, bool):
        return str(version)
    if isinstance(version, float):
        r.value(
            ("version",),
            f"version must be a string or an integer, got the number "
            f'{version}; quote it (version: "...") so it is kept exactly',
        )
        return None
    return r.text(data, (), "version", "at top level")


def _description(r: _Reader, data: dict) -> str:
    description = data.get("description")
    if description is None:
        return ""
    if not isinstance(description, str):
        r.value(("description",), f"description must be a string, got {show_value(description)}")
        return ""
    return description.strip()


def _principles(r: _Reader, raw: Any, present: bool) -> list[Principle]:
    if not present:
        return []
    if not isinstance(raw, list) or not raw:
        r.value(("principles",), f"principles must be a non-empty list, got {show_value(raw)}")
        return []
    principles = [_principle(r, i, item) for i, item in enumerate(raw)]
    _duplicate_ids(r, raw)
    return [p for p in principles if p is not None]


def _duplicate_ids(r: _Reader, raw: list) -> None:
    first: dict[str, int] = {}
    for i, item in enumerate(raw):
        pid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(pid, str):
            continue
        line = r.doc.line("principles", i, "id")
        if pid in first:
            r.at(line, f"duplicate principle id '{pid}' (first defined at line {first[pid]})")
        else:
            first[pid] = line


def _principle(r: _Reader, i: int, raw: Any) -> Principle | None:
    path: tuple[Any, ...] = ("principles", i)
    if not isinstance(raw, dict):
        allowed = ", ".join(PRINCIPLE_REQUIRED)
        got = show_value(raw)
        r.value(path, f"principle #{i + 1} must be a mapping with keys {allowed}, got {got}")
        return None
    before = len(r.problems)
    where = f"in {_label(raw, i)}"
    r.keys(raw, path, PRINCIPLE_KEYS, PRINCIPLE_REQUIRED, where)
    pid = _principle_id(r, raw, path)
    texts = [r.text(raw, path, key, where) for key in ("principle", "critique", "revision")]
    weight = _weight(r, raw.get("weight"), path, where)
    tags = _tags(r, raw.get("tags"), path, where)
    checks = _checks(r, raw.get("checks"), path, where)
    if len(r.problems) > before:
        return None
    text, critique, revision = texts
    assert pid is not None and text and critique and revision
    return Principle(pid, text, critique, revision, weight, tags, checks)


def _label(raw: dict, i: int) -> str:
    pid = raw.get("id")
    return f"principle '{pid}'" if isinstance(pid, str) and pid.strip() else f"principle #{i + 1}"


def _principle_id(r: _Reader, raw: dict, path: tuple) -> str | None:
    if "id" not in raw:
        return None
    pid = raw["id"]
    if not isinstance(pid, str):
        r.value((*path, "id"), f"principle id must be a string, got {show_value(pid)}")
        return None
    if not ID_PATTERN.match(pid):
        r.value(
            (*path, "id"),
            f"principle id '{pid}' must match {ID_PATTERN.pattern} "
            "(lowercase letters, digits, '_' and '-')",
        )
        return None
    return pid


def _weight(r: _Reader, raw: Any, path: tuple, where: str) -> float:
    if raw is None:
        return 1.0
    is_number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if not is_number or not math.isfinite(raw) or raw <= 0:
        r.value((*path, "weight"), f"weight {where} must be a number > 0, got {show_value(raw)}")
        return 1.0
    return float(raw)


def _tags(r: _Reader, raw: Any, path: tuple, where: str) -> tuple[str, ...]:
    raw = r.optional_list(raw, path, "tags", where, "a list of strings")
    for j, tag in enumerate(raw):
        if not isinstance(tag, str) or not tag.strip():
            r.value(
                (*path, "tags", j),
                f"tags {where} must be a list of non-empty strings, "
                f"got {show_value(tag)} at item {j + 1}",
            )
    return tuple(tag.strip() for tag in raw if isinstance(tag, str))


def _checks(r: _Reader, raw: Any, path: tuple, where: str) -> tuple[Check, ...]:
    raw = r.optional_list(raw, path, "checks", where, "a list")
    checks = [_check(r, item, (*path, "checks", j), where) for j, item in enumerate(raw)]
    found = [c for c in checks if c is not None]
    _word_limits_agree(r, found, checks, path, where)
    return tuple(found)


def _check(r: _Reader, raw: Any, path: tuple, where: str) -> Check | None:
    number = path[-1] + 1
    kinds = ", ".join(CHECK_KINDS)
    named = {k: v for k, v in raw.items() if k != "scope"} if isinstance(raw, dict) else {}
    if not isinstance(raw, dict) or len(named) != 1:
        got = f"{len(named)} keys" if isinstance(raw, dict) else show_value(raw)
        r.value(
            path,
            f"check #{number} {where} must have exactly one key (one of {kinds}) and "
            f"optionally scope, got {got}",
        )
        return None
    ((kind, value),) = named.items()
    if kind not in CHECK_KINDS:
        r.at(r.doc.key_line(*path, kind), _unknown_key(kind, CHECK_KINDS, where, "check"))
        return None
    scope = raw.get("scope", "last_turn")
    if scope not in SCOPES:
        r.value(
            (*path, "scope"),
            f"scope of check #{number} {where} must be one of {', '.join(SCOPES)}, "
            f"got {show_value(scope)}",
        )
        return None
    if kind in ("regex_must", "regex_must_not"):
        check = _regex_check(r, kind, value, (*path, kind), where)
        return None if check is None else replace(check, scope=scope)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value <= 0:
        got = show_value(value)
        r.value((*path, kind), f"{kind} {where} must be a positive integer, got {got}")
        return None
    return Check(kind, value, scope)


def _regex_check(r: _Reader, kind: CheckKind, value: Any, path: tuple, where: str) -> Check | None:
    if not isinstance(value, str) or not value:
        r.value(path, f"{kind} {where} must be a non-empty regex string, got {show_value(value)}")
        return None
    try:
        re.compile(value)
    except re.error as e:
        r.value(path, f"{kind} {where} is not a valid regex: {e}")
        return None
    return Check(kind, value)


def _word_limits_agree(
    r: _Reader, found: list[Check], checks: list[Check | None], path: tuple, where: str
) -> None:
    mins = [c for c in found if c.kind == "min_words"]
    maxes = [c for c in found if c.kind == "max_words"]
    if not mins or not maxes:
        return
    low = max(mins, key=lambda c: int(c.value))
    high = min(maxes, key=lambda c: int(c.value))
    if int(low.value) > int(high.value):
        j = checks.index(low)
        r.value(
            (*path, "checks", j, "min_words"),
            f"min_words ({low.value}) is more than max_words ({high.value}) {where}",
        )


def _unknown_key(key: Any, allowed: Sequence[str], where: str, what: str = "key") -> str:
    message = f"unknown {what} '{key}' {where} (allowed: {', '.join(allowed)})"
    close = difflib.get_close_matches(str(key), allowed, n=1)
    return f"{message}; did you mean '{close[0]}'?" if close else message
