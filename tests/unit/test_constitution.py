import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from alignment.constitution import (
    Check,
    Constitution,
    Principle,
    from_dict,
    lint,
    load_constitution,
)
from alignment.yaml_spec import SpecError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "constitutions").glob("*.yaml"))

VALID = """\
name: tiny
version: 1
principles:
  - id: harmless
    principle: Choose the less harmful response.
    critique: Say how it is harmful.
    revision: Remove the harm.
    weight: 2
    tags: [harmless]
  - id: concise
    principle: Choose the shorter response.
    critique: Say what is padding.
    revision: Cut the padding.
    checks:
      - max_words: 5
"""

# Same content: other key order, quoting, block scalars, comments, flow style, int weight.
REFORMATTED = """\
# a comment that must not change the id
principles:
  - revision: Remove the harm.
    critique: >-
      Say how it is
      harmful.
    principle: |
      Choose the less harmful response.
    tags:
      - harmless
    weight: 2.0
    id: "harmless"
  - {id: concise, principle: Choose the shorter response., critique: Say what is padding.,
     revision: Cut the padding., checks: [{max_words: 5}]}
version: "1"
name: 'tiny'
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """The str() of every problem lint finds in that text, written to tmp_path/c.yaml."""
    return [str(p) for p in lint([write(tmp_path, text)])]


def principle(**overrides) -> Principle:
    fields = {"id": "p", "text": "t", "critique": "c", "revision": "r", **overrides}
    return Principle(**fields)


# ---------------------------------------------------------------- shipped files


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_constitutions_load_and_lint_clean(path):
    constitution = load_constitution(path)
    assert constitution.path == str(path)
    assert lint([path]) == []


def test_shipped_set():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "demo.yaml"} <= names
    default = load_constitution(REPO / "constitutions" / "default.yaml")
    assert len(default.principles) >= 14
    assert all(p.text.startswith("Choose the response that") for p in default.principles)
    assert len({p.weight for p in default.principles}) > 1
    demo = load_constitution(REPO / "constitutions" / "demo.yaml")
    assert len(demo.principles) == 5
    assert any(p.checks for p in demo.principles)
    assert any(not p.checks for p in demo.principles)


def test_lint_accepts_a_directory():
    assert lint([REPO / "constitutions"]) == []


# ---------------------------------------------------------------- loading and identity


def test_load_fields(tmp_path):
    c = load_constitution(write(tmp_path, VALID))
    assert (c.name, c.version, c.description) == ("tiny", "1", "")
    harmless = c.principle("harmless")
    assert harmless == Principle(
        id="harmless",
        text="Choose the less harmful response.",
        critique="Say how it is harmful.",
        revision="Remove the harm.",
        weight=2.0,
        tags=("harmless",),
    )
    assert c.principle("concise").checks == (Check("max_words", 5),)


def test_content_is_canonical_json(tmp_path):
    c = load_constitution(write(tmp_path, VALID))
    content = json.loads(c.content)
    assert content["version"] == "1"
    assert content["principles"][1] == {
        "id": "concise",
        "text": "Choose the shorter response.",
        "critique": "Say what is padding.",
        "revision": "Cut the padding.",
        "weight": 1.0,
        "tags": [],
        "checks": [{"max_words": 5}],
    }
    assert c.content == json.dumps(content, sort_keys=True, separators=(",", ":"))


def test_id_is_stable_under_reformatting(tmp_path):
    a = load_constitution(write(tmp_path, VALID, "a.yaml"))
    b = load_constitution(write(tmp_path, REFORMATTED, "b.yaml"))
    assert a.constitution_id == b.constitution_id
    assert len(a.constitution_id) == 64
    assert a == b  # path is not part of equality


def test_id_is_the_same_in_memory():
    data = {
        "name": "tiny",
        "version": 1,
        "principles": [
            {"id": "p", "principle": "t", "critique": "c", "revision": "r", "weight": 1},
        ],
    }
    built = Constitution("tiny", "1", "", (principle(),))
    assert from_dict(data).constitution_id == built.constitution_id
    assert from_dict(data).path == ""


@pytest.mark.parametrize(
    "old, new",
    [
        ("Remove the harm.", "Remove all the harm."),
        ("weight: 2", "weight: 3"),
        ("tags: [harmless]", "tags: [harmless, safety]"),
        ("max_words: 5", "max_words: 6"),
        ("version: 1", "version: 2"),
        ("name: tiny", "name: tiny2"),
        ("id: concise", "id: short"),
    ],
)
def test_id_changes_with_content(tmp_path, old, new):
    assert old in VALID
    a = load_constitution(write(tmp_path, VALID, "a.yaml"))
    b = load_constitution(write(tmp_path, VALID.replace(old, new), "b.yaml"))
    assert a.constitution_id != b.constitution_id


def test_unknown_principle_is_a_clear_key_error(tmp_path):
    c = load_constitution(write(tmp_path, VALID))
    with pytest.raises(KeyError, match="no principle 'nope' in constitution 'tiny'"):
        c.principle("nope")


# ---------------------------------------------------------------- sampling


def weighted(weights: dict[str, float]) -> Constitution:
    return Constitution("w", "1", "", tuple(principle(id=k, weight=w) for k, w in weights.items()))


def test_sample_is_deterministic_in_seed_and_key():
    c = weighted({"a": 1, "b": 1, "c": 1, "d": 1})
    picks = [c.sample_principle(f"k{i}", seed=7).id for i in range(50)]
    assert picks == [c.sample_principle(f"k{i}", seed=7).id for i in range(50)]
    assert picks != [c.sample_principle(f"k{i}", seed=8).id for i in range(50)]


def test_sample_is_stable_across_processes():
    c = weighted({"a": 1, "b": 2, "c": 3})
    here = [c.sample_principle(f"k{i}", seed=3).id for i in range(20)]
    code = (
        "from alignment.constitution import Constitution, Principle\n"
        "c = Constitution('w', '1', '', tuple(Principle(k, 't', 'c', 'r', w)"
        " for k, w in [('a', 1), ('b', 2), ('c', 3)]))\n"
        "print(' '.join(c.sample_principle(f'k{i}', seed=3).id for i in range(20)))\n"
    )
    env = {"PYTHONHASHSEED": "123", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == here


def test_sample_follows_weights():
    c = weighted({"heavy": 3, "light": 1})
    counts = Counter(c.sample_principle(f"prompt-{i}", seed=0).id for i in range(2000))
    assert 2.4 < counts["heavy"] / counts["light"] < 3.8


# ---------------------------------------------------------------- checks


def test_checks_behaviour():
    must_not = Check("regex_must_not", r"(?i)\bkill\b")
    must = Check("regex_must", r"\d")
    assert must_not.passes("skills are fine") and not must_not.passes("I will KILL it")
    assert must.passes("room 101") and not must.passes("no digits")
    assert Check("max_words", 3).passes("one two  three") and not Check("max_words", 2).passes(
        "one two three"
    )
    assert Check("min_words", 3).passes("a b c") and not Check("min_words", 3).passes("a b")


def test_check_descriptions():
    assert Check("regex_must_not", r"(?i)\bkill\b").describe() == r"must not match /(?i)\bkill\b/"
    assert Check("regex_must", "x").describe() == "must match /x/"
    assert Check("max_words", 120).describe() == "at most 120 words"
    assert Check("min_words", 3).describe() == "at least 3 words"


def test_failed_checks():
    p = principle(checks=(Check("max_words", 2), Check("regex_must_not", "bad")))
    assert p.failed_checks("fine") == []
    assert p.failed_checks("bad words here") == list(p.checks)
    assert principle().failed_checks("anything at all") == []


# ---------------------------------------------------------------- validation messages

HEAD = "name: tiny\nversion: 1\nprinciples:\n"
ALLOWED = "allowed: id, principle, critique, revision, weight, tags, checks"
KINDS = "regex_must, regex_must_not, max_words, min_words"


def test_syntax_error(tmp_path):
    path = tmp_path / "c.yaml"
    assert problems(tmp_path, HEAD + "  - id: [a\n") == [
        f"{path}:5: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence, line 4)"
    ]


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    assert problems(tmp_path, "# x\n- a\n- b\n") == [
        f"{path}:2: top level must be a mapping with keys name, version, principles; got a list"
    ]
    assert problems(tmp_path, "# nothing\n") == [
        f"{path}:1: top level must be a mapping with keys name, version, principles; "
        "the file is empty"
    ]


def test_unknown_and_missing_keys_at_top_level(tmp_path):
    path = tmp_path / "c.yaml"
    text = "# header\nnmae: tiny\nversion: 1\ncolour: red\n"
    assert problems(tmp_path, text) == [
        f"{path}:2: unknown key 'nmae' at top level "
        "(allowed: name, version, description, principles); did you mean 'name'?",
        f"{path}:2: missing required key 'name' at top level",
        f"{path}:2: missing required key 'principles' at top level",
        f"{path}:4: unknown key 'colour' at top level "
        "(allowed: name, version, description, principles)",
    ]


def test_unknown_and_missing_keys_in_principle(tmp_path):
    path = tmp_path / "c.yaml"
    text = HEAD + (
        "  - id: harmless\n"  # 4
        "    principle: Choose.\n"
        "    critque: Say.\n"  # 6
        "    revision: Fix.\n"
    )
    assert problems(tmp_path, text) == [
        f"{path}:4: missing required key 'critique' in principle 'harmless'",
        f"{path}:6: unknown key 'critque' in principle 'harmless' ({ALLOWED}); "
        "did you mean 'critique'?",
    ]


def test_missing_id_uses_the_principle_number(tmp_path):
    path = tmp_path / "c.yaml"
    text = HEAD + VALID.split("principles:\n")[1] + "  - principle: P\n    critique: C\n"
    assert problems(tmp_path, text) == [
        f"{path}:16: missing required key 'id' in principle #3",
        f"{path}:16: missing required key 'revision' in principle #3",
    ]


def test_wrong_types(tmp_path):
    path = tmp_path / "c.yaml"
    text = (
        "name: [tiny]\n"  # 1
        "version: 1.10\n"  # 2
        "description: 5\n"  # 3
        "principles:\n"
        "  - id: 7\n"  # 5
        "    principle: Choose.\n"
        "    critique: {a: 1}\n"  # 7
        "    revision: Fix.\n"
        "    weight: heavy\n"  # 9
        "    tags: harmless\n"  # 10
        "  - id: two\n"  # 11
        "    principle: Choose.\n"
        "    critique: Say.\n"
        "    revision: Fix.\n"
        "    weight: 0\n"  # 15
        "    tags: [ok, 3]\n"  # 16
        "    checks: {max_words: 3}\n"  # 17
        "  - just text\n"  # 18
    )
    assert problems(tmp_path, text) == [
        f"{path}:1: name at top level must be a string, got a list",
        f"{path}:2: version must be a string or an integer, got the number 1.1; "
        'quote it (version: "...") so it is kept exactly',
        f"{path}:3: description must be a string, got 5",
        f"{path}:5: principle id must be a string, got 7",
        f"{path}:7: critique in principle #1 must be a string, got a mapping",
        f"{path}:9: weight in principle #1 must be a number > 0, got 'heavy'",
        f"{path}:10: tags in principle #1 must be a list of strings, got 'harmless'",
        f"{path}:15: weight in principle 'two' must be a number > 0, got 0",
        f"{path}:16: tags in principle 'two' must be a list of non-empty strings, got 3 at item 2",
        f"{path}:17: checks in principle 'two' must be a list, got a mapping",
        f"{path}:18: principle #3 must be a mapping with keys id, principle, critique, "
        "revision, got 'just text'",
    ]


@pytest.mark.parametrize(
    "value, shown",
    [("[]", "an empty list"), ("", "null"), ("{a: 1}", "a mapping"), ("yes", "true")],
)
def test_principles_must_be_a_non_empty_list(tmp_path, value, shown):
    path = tmp_path / "c.yaml"
    text = f"name: tiny\nversion: 1\nprinciples: {value}\n"
    assert problems(tmp_path, text) == [
        f"{path}:3: principles must be a non-empty list, got {shown}"
    ]


def test_empty_texts(tmp_path):
    path = tmp_path / "c.yaml"
    text = (
        "name: '  '\n"
        "version: ''\n"
        "principles:\n"
        "  - id: harmless\n"
        "    principle: ''\n"  # 5
        "    critique: |\n"  # 6
        "       \n"
        "    revision:\n"  # 8
    )
    assert problems(tmp_path, text) == [
        f"{path}:1: name at top level is empty",
        f"{path}:2: version at top level is empty",
        f"{path}:5: principle in principle 'harmless' is empty",
        f"{path}:6: critique in principle 'harmless' is empty",
        f"{path}:8: revision in principle 'harmless' must be a string, got null",
    ]


def test_duplicate_ids(tmp_path):
    path = tmp_path / "c.yaml"
    text = VALID.replace("id: concise", "id: harmless")
    assert problems(tmp_path, text) == [
        f"{path}:10: duplicate principle id 'harmless' (first defined at line 4)"
    ]


def test_bad_id_pattern(tmp_path):
    path = tmp_path / "c.yaml"
    text = VALID.replace("id: concise", "id: Be Concise")
    assert problems(tmp_path, text) == [
        f"{path}:10: principle id 'Be Concise' must match ^[a-z0-9][a-z0-9_-]*$ "
        "(lowercase letters, digits, '_' and '-')"
    ]


def test_bad_checks(tmp_path):
    path = tmp_path / "c.yaml"
    text = HEAD + (
        "  - id: p\n"
        "    principle: Choose.\n"
        "    critique: Say.\n"
        "    revision: Fix.\n"
        "    checks:\n"
        "      - max_words: 10\n"  # 9
        "        min_words: 2\n"
        "      - max_word: 10\n"  # 11
        "      - regex_must: '(unclosed'\n"  # 12
        "      - regex_must_not: ''\n"  # 13
        "      - max_words: -1\n"  # 14
        "      - min_words: 2.5\n"  # 15
        "      - min_words\n"  # 16
        "      - {}\n"  # 17
    )
    assert problems(tmp_path, text) == [
        f"{path}:9: check #1 in principle 'p' must have exactly one key (one of {KINDS}) "
        "and optionally scope, got 2 keys",
        f"{path}:11: unknown check 'max_word' in principle 'p' (allowed: {KINDS}); "
        "did you mean 'max_words'?",
        f"{path}:12: regex_must in principle 'p' is not a valid regex: "
        "missing ), unterminated subpattern at position 0",
        f"{path}:13: regex_must_not in principle 'p' must be a non-empty regex string, got ''",
        f"{path}:14: max_words in principle 'p' must be a positive integer, got -1",
        f"{path}:15: min_words in principle 'p' must be a positive integer, got 2.5",
        f"{path}:16: check #7 in principle 'p' must have exactly one key (one of {KINDS}) "
        "and optionally scope, got 'min_words'",
        f"{path}:17: check #8 in principle 'p' must have exactly one key (one of {KINDS}) "
        "and optionally scope, got 0 keys",
    ]


def test_min_words_above_max_words(tmp_path):
    path = tmp_path / "c.yaml"
    text = VALID + "      - min_words: 3\n      - min_words: 8\n"
    assert problems(tmp_path, text) == [
        f"{path}:17: min_words (8) is more than max_words (5) in principle 'concise'"
    ]


def test_every_problem_across_files_is_reported(tmp_path):
    good = write(tmp_path, VALID, "good.yaml")
    bad = write(tmp_path, VALID.replace("weight: 2", "weight: -2"), "bad.yaml")
    broken = write(tmp_path, "name: [\n", "broken.yaml")
    found = [str(p) for p in lint([good, bad, broken, tmp_path / "missing.yaml"])]
    assert found == [
        f"{bad}:8: weight in principle 'harmless' must be a number > 0, got -2",
        f"{broken}:2: YAML syntax error: expected the node content, but found '<stream end>' "
        "(while parsing a flow node, line 2)",
        f"{tmp_path / 'missing.yaml'}:1: file not found",
    ]


def test_load_raises_spec_error_with_all_problems(tmp_path):
    path = write(tmp_path, VALID.replace("weight: 2", "weight: lots").replace("5", "0"))
    with pytest.raises(SpecError) as info:
        load_constitution(path)
    assert str(info.value) == (
        f"{path}:8: weight in principle 'harmless' must be a number > 0, got 'lots'\n"
        f"{path}:15: max_words in principle 'concise' must be a positive integer, got 0"
    )


def test_from_dict_validates_the_same_way():
    with pytest.raises(SpecError) as info:
        from_dict({"name": "x", "version": 1, "principles": [{"id": "p"}]})
    assert [str(p) for p in info.value.problems] == [
        "<memory>:1: missing required key 'principle' in principle 'p'",
        "<memory>:1: missing required key 'critique' in principle 'p'",
        "<memory>:1: missing required key 'revision' in principle 'p'",
    ]
