"""Bad input is refused before any work: one `FILE[:LINE]: message`, exit 2, nothing written.

Every file in tests/bad_inputs/ goes through the real CLI (click's CliRunner) as its
manifest entry says. The work itself (the collect flow, the loop, the judge's engine) is
replaced by a stub that fails the test, so a file that is not refused loads no model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from alignment.prompts import MAX_PROMPT_CHARS
from alignment.yaml_spec import MAX_YAML_BYTES
from flows.cli import OFFLINE_ENV, main

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path("tests") / "bad_inputs"  # relative: the messages name files as the user did
MANIFEST = yaml.safe_load((REPO / CORPUS / "manifest.yaml").read_text())
FILES = sorted(p.name for p in (REPO / CORPUS).iterdir() if p.name != "manifest.yaml")
CONSTITUTION = "constitutions/demo.yaml"


class Reached(Exception):
    """The command got past its checks to the work."""


def reached(*args: Any, **kwargs: Any) -> None:
    raise Reached


@pytest.fixture(autouse=True)
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run from the repo root (configs name constitutions/demo.yaml), offline as the CLI is,
    with an empty model cache, and with every kind of work stubbed out."""
    import flows.judge_eval
    import flows.loop
    import flows.pipeline

    monkeypatch.chdir(REPO)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(flows.pipeline, "collect_preferences", reached)
    monkeypatch.setattr(flows.loop, "self_improve", reached)
    monkeypatch.setattr(flows.judge_eval, "make_backend", reached)


def rlaif(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="rlaif")


def config_naming(tmp_path: Path, file: Path, via: str) -> str:
    """A good config that names `file` where `via` says."""
    text = {
        "constitution": f"constitution: {file}\n",
        "prompts": f"constitution: {CONSTITUTION}\nprompts:\n  source: {file}\n",
        "judge-audit": f"constitution: {CONSTITUTION}\nloop:\n  judge_audit: {file}\n",
        "policy-model": f"constitution: {CONSTITUTION}\npolicy:\n  model: {file}\n",
        "judge-model": f"constitution: {CONSTITUTION}\njudge:\n  mode: logprob\n"
        f"judge_model:\n  model: {file}\n",
    }[via]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


# The inputs that are model folders: the message names the config that names them.
MODEL_VIAS = ("policy-model", "judge-model")


def invoke(via: str, file: Path, tmp_path: Path) -> Result:
    store = str(tmp_path / "store")
    if via == "run":
        return rlaif("run", "--config", str(file), "--store", store)
    if via == "self-improve":
        return rlaif("self-improve", "--config", str(file), "--store", store)
    if via == "lint":
        return rlaif("constitution", "lint", str(file))
    if via == "judge-eval":
        return rlaif("judge", "eval", str(file), "--store", store)
    command = "self-improve" if via == "judge-audit" else "run"
    return rlaif(command, "--config", config_naming(tmp_path, file, via), "--store", store)


def assert_refused(result: Result, file: Path, line: int | None, says: str, store: Path) -> None:
    """Exit 2; stderr is one line, `FILE:LINE: ...` (or `FILE: ...`) with `says` in it."""
    assert not isinstance(result.exception, Reached), f"{file} was not refused"
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{file}:{line}: " if line else f"{file}: "), result.stderr
    assert says in result.stderr
    assert not store.exists()


def test_every_entry_has_its_file() -> None:
    assert sorted(MANIFEST) == FILES


@pytest.mark.parametrize("name", FILES)
def test_refused_before_any_work(name: str, tmp_path: Path) -> None:
    assert name in MANIFEST, f"tests/bad_inputs/{name} has no entry in manifest.yaml"
    entry = MANIFEST[name]
    file = CORPUS / name
    result = invoke(entry["via"], file, tmp_path)
    named = tmp_path / "config.yaml" if entry["via"] in MODEL_VIAS else file
    assert_refused(result, named, entry["line"], entry["says"], tmp_path / "store")


# --- too big to commit ------------------------------------------------------------------


@pytest.mark.parametrize("via", ["lint", "constitution"])
def test_a_10mb_constitution_is_refused_unread(via: str, tmp_path: Path) -> None:
    file = tmp_path / "huge.yaml"
    principle = "  - {id: p%d, principle: Choose., critique: Say., revision: Fix.}\n"
    body = "".join(principle % i for i in range(10 * 2**20 // len(principle)))
    file.write_text(f"name: huge\nversion: 1\nprinciples:\n{body}")
    assert file.stat().st_size > MAX_YAML_BYTES
    start = time.monotonic()
    result = invoke(via, file, tmp_path)
    assert time.monotonic() - start < 5
    says = "a YAML file written by hand must be at most 1 MiB"
    assert_refused(result, file, 1, says, tmp_path / "store")


def test_a_1mb_prompt_is_refused_at_its_line(tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"text": "Hello?"}\n{"text": "' + "x" * 2**20 + '"}\n')
    result = invoke("prompts", file, tmp_path)
    says = f"field 'text' is 1,048,576 characters; a prompt must be at most {MAX_PROMPT_CHARS:,}"
    assert_refused(result, file, 2, says, tmp_path / "store")


# --- a judge that cannot answer in its mode, by every command that judges ---------------

JUDGE = CORPUS / "judge-labels-merge-with-paren"  # its tokenizer reads "(A" as one word


@pytest.mark.parametrize("command", ["run", "self-improve", "judge eval"])
def test_a_judge_without_single_token_labels_is_refused_by_every_command(
    command: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    store = str(tmp_path / "store")
    if command == "judge eval":  # the mode comes from --mode, over the config's contrast
        config.write_text(f"constitution: {CONSTITUTION}\njudge_model:\n  model: {JUDGE}\n")
        args = ["judge", "eval", "builtin", "--config", str(config), "--mode", "logprob"]
        line = 3
    else:
        mode = "judge:\n  mode: cot\n"
        config.write_text(f"constitution: {CONSTITUTION}\n{mode}judge_model:\n  model: {JUDGE}\n")
        args = [command, "--config", str(config)]
        line = 5
    result = rlaif(*args, "--store", store)
    says = "reads the option labels A and B as one token each"
    assert_refused(result, config, line, says, tmp_path / "store")


@pytest.mark.parametrize("mode", ["contrast", "likelihood"])
def test_a_judge_mode_that_reads_no_labels_takes_that_judge(mode: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"constitution: {CONSTITUTION}\njudge:\n  mode: {mode}\njudge_model:\n  model: {JUDGE}\n"
    )
    result = rlaif("run", "--config", str(config), "--store", str(tmp_path / "store"))
    assert isinstance(result.exception, Reached), result.output


# --- not an error -----------------------------------------------------------------------


def test_duplicate_prompts_are_dropped_and_counted(tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    rows = ["Hi?", "Why?", "Hi?", " Why? ", "How?", "Hi?"]
    file.write_text("".join(f'{{"text": "{row}"}}\n' for row in rows))
    config = config_naming(tmp_path, file, "prompts")
    result = rlaif("self-improve", "--config", config, "--store", str(tmp_path / "store"))
    assert isinstance(result.exception, Reached)  # a warning; the loop goes on
    assert result.stderr == f"{file}: 3 duplicate prompts dropped (first at line 3)\n"
