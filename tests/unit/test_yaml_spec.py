import datetime
from pathlib import Path

import pytest
import yaml

from alignment.yaml_spec import (
    MAX_YAML_BYTES,
    LocatedYaml,
    Problem,
    SpecError,
    load_yaml,
    parse_yaml,
)

DOC = """\
# a comment
name: demo
version: 1
empty:
principles:
  - id: a
    checks:
      - max_words: 3
      - regex_must: "x"
  - id: b
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_lines(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_yaml(path)
    return [str(p) for p in info.value.problems]


def test_data_matches_safe_load():
    text = DOC + "f: 1.5\nt: true\nn: ~\nd: 2024-01-02\ns: '007'\nhex: 0x1F\n"
    doc = parse_yaml(text)
    assert doc.data == yaml.safe_load(text)
    assert doc.data["d"] == datetime.date(2024, 1, 2)
    assert doc.data["hex"] == 31


def test_value_lines():
    doc = parse_yaml(DOC)
    assert doc.line("name") == 2
    assert doc.line("empty") == 4
    assert doc.line("principles", 0) == 6
    assert doc.line("principles", 0, "checks", 0, "max_words") == 8
    assert doc.line("principles", 0, "checks", 1, "regex_must") == 9
    assert doc.line("principles", 1, "id") == 10


def test_key_lines():
    doc = parse_yaml(DOC)
    assert doc.key_line("principles") == 5
    assert doc.key_line("principles", 0, "checks") == 7
    assert doc.key_line("principles", 1) == 10  # a list item: its own line


def test_lines_fall_back_to_nearest_ancestor_then_1():
    doc = parse_yaml(DOC)
    assert doc.line("principles", 1, "critique") == 10
    assert doc.line("principles", 7, "id") == 6  # no item 7: the list itself
    assert doc.key_line("principles", 0, "nope") == 6
    assert doc.line("nope") == 2  # the root mapping starts at its first key
    assert LocatedYaml({"a": 1}, "<memory>").line("a") == 1


def test_empty_file_is_none(tmp_path):
    doc = load_yaml(write(tmp_path, "# only a comment\n"))
    assert doc.data is None
    assert doc.line() == 1


def test_merge_keys_follow_yaml_semantics_and_lines():
    text = "base: &b\n  x: 1\n  y: 2\nder:\n  <<: *b\n  y: 3\n"
    doc = parse_yaml(text)
    assert doc.data == yaml.safe_load(text)
    assert doc.line("der", "y") == 6
    assert doc.line("der", "x") == 2  # from the anchor
    assert doc.line("der") == 5


def test_duplicate_keys_are_refused(tmp_path):
    path = write(tmp_path, "name: a\nsub:\n  k: 1\n  k: 2\nname: b\n")
    with pytest.raises(SpecError) as info:
        load_yaml(path)
    assert info.value.problems == [
        Problem(str(path), 4, "duplicate key 'k' (first at line 3)"),
        Problem(str(path), 5, "duplicate key 'name' (first at line 1)"),
    ]
    assert str(info.value) == (
        f"{path}:4: duplicate key 'k' (first at line 3)\n"
        f"{path}:5: duplicate key 'name' (first at line 1)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "a: 1\nb: [1, 2\nc: 3\n",
            "3: YAML syntax error: expected ',' or ']', but got ':' "
            "(while parsing a flow sequence, line 2)",
            id="syntax_error_points_at_its_line",
        ),
        pytest.param(
            "a: 1\n  b: 2\n",
            "2: YAML syntax error: mapping values are not allowed here",
            id="bad_indentation",
        ),
        pytest.param(
            "a: 1\n---\nb: 2\n",
            "2: YAML syntax error: but found another document "
            "(expected a single document in the stream, line 1)",
            id="several_documents_are_refused",
        ),
        pytest.param(
            'a: 1\nb: "\x01"\n',
            "2: YAML syntax error: unacceptable character #x0001: "
            "special characters are not allowed",
            id="control_character_line",
        ),
        pytest.param(
            "a: 1\nb: !foo 1\n",
            "2: YAML error: could not determine a constructor for the tag '!foo'",
            id="unknown_tag",
        ),
        pytest.param(
            "a: &x [1, *x]\n",
            "1: recursive alias: a node cannot contain itself",
            id="recursive_alias",
        ),
    ],
)
def test_refused_yaml_says_where_and_why(tmp_path, text, expected):
    path = tmp_path / "spec.yaml"
    assert error_lines(tmp_path, text) == [f"{path}:{expected}"]


def test_missing_file_and_not_utf8(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_yaml(missing)
    assert str(info.value) == f"{missing}:1: file not found"

    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: c\nversion: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_yaml(latin)
    assert str(info.value) == f"{latin}:2: not UTF-8 text (byte 0xe9 at column 13)"

    with pytest.raises(SpecError) as info:
        load_yaml(tmp_path)
    assert str(info.value) == f"{tmp_path}:1: is a directory, expected a YAML file"


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# x\n" * (MAX_YAML_BYTES // 4 + 1))
    with pytest.raises(SpecError) as info:
        load_yaml(big)
    message = f"{big}:1: file is 1.0 MiB; a YAML file written by hand must be at most 1 MiB"
    assert str(info.value) == message
