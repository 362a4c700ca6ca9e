"""The `rlaif` command through click's CliRunner: exit codes and exact output, errors included.

Nothing here starts a flow: `flows.pipeline` is replaced by a module that fails the test if
`run` ever gets past its config and constitution checks.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import click
import pytest
from click.testing import CliRunner, Result

from alignment.model_ref import ModelRef
from flows.cli import OFFLINE_ENV, main
from storage import Store

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "constitutions").glob("*.yaml"))
CONSTITUTION = REPO / "constitutions" / "demo.yaml"
RUN = "run-1"

BAD_CONSTITUTION = """\
name: bad
version: 1
principles:
  - id: Bad Id
    principle: Choose.
    critique: Say.
    revison: Fix.
"""
BAD_CONSTITUTION_PROBLEMS = (
    "bad.yaml:4: missing required key 'revision' in principle 'Bad Id'\n"
    "bad.yaml:4: principle id 'Bad Id' must match ^[a-z0-9][a-z0-9_-]*$ "
    "(lowercase letters, digits, '_' and '-')\n"
    "bad.yaml:7: unknown key 'revison' in principle 'Bad Id' (allowed: id, principle, "
    "critique, revision, weight, tags, checks); did you mean 'revision'?\n"
)

PROMPTS = [
    {"prompt_id": "p1", "text": "Hi?", "source": "seed", "split": "train", "category": "chat"},
    {"prompt_id": "p2", "text": 'Tell me, "why"?', "source": "seed", "split": "eval"},
]
JUDGMENTS = [
    {
        "judgment_id": "j1", "prompt_id": "p1", "response_a_id": "r1", "response_b_id": "r2",
        "principle_id": "helpful", "mode": "pairwise", "p_a": 0.75,
        "position_consistent": True, "status": "ok",
    },
    {
        "judgment_id": "j2", "prompt_id": "p1", "response_a_id": "r2", "response_b_id": "r3",
        "principle_id": "honest", "mode": "pairwise", "p_a": 0.5,
        "position_consistent": False, "status": "ok", "rationale": "a tie",
    },
]  # fmt: skip


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in tmp_path, keep main()'s environment defaults out of other tests, start no flow."""
    monkeypatch.chdir(tmp_path)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)  # restored (or removed) after the test

    def collect_preferences(**kwargs: object) -> str:
        raise AssertionError("`rlaif run` went past its checks and started the flow")

    pipeline = types.ModuleType("flows.pipeline")
    pipeline.collect_preferences = collect_preferences  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flows.pipeline", pipeline)


def rlaif(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="rlaif")


def assert_refused(result: Result, stderr: str) -> None:
    """Exit 2, exactly `stderr` on stderr, nothing on stdout, no traceback."""
    assert (result.exit_code, result.stderr, result.stdout) == (2, stderr, "")
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


# --- constitution lint -----------------------------------------------------------------


def test_lint_shipped_constitutions() -> None:
    result = rlaif("constitution", "lint", *map(str, SHIPPED))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "2 file(s) ok\n", "")


def test_lint_a_folder_counts_its_files() -> None:
    result = rlaif("constitution", "lint", str(REPO / "constitutions"))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "2 file(s) ok\n", "")


def test_lint_bad_file() -> None:
    Path("bad.yaml").write_text(BAD_CONSTITUTION)
    assert_refused(rlaif("constitution", "lint", "bad.yaml"), BAD_CONSTITUTION_PROBLEMS)


def test_lint_reports_only_the_bad_files() -> None:
    Path("bad.yaml").write_text(BAD_CONSTITUTION)
    result = rlaif("constitution", "lint", str(SHIPPED[0]), "bad.yaml", "absent.yaml")
    assert_refused(result, BAD_CONSTITUTION_PROBLEMS + "absent.yaml:1: file not found\n")


def test_lint_empty_folder() -> None:
    Path("empty").mkdir()
    assert_refused(
        rlaif("constitution", "lint", "empty"), "empty: no *.yaml or *.yml files in this folder\n"
    )


def test_lint_needs_a_file() -> None:
    result = rlaif("constitution", "lint")
    assert result.exit_code == 2
    assert "Missing argument 'FILES...'" in result.stderr


# --- run -------------------------------------------------------------------------------


def test_run_refuses_a_bad_config_before_writing() -> None:
    Path("config.yaml").write_text(
        f"store: store\nconstitution: {REPO / 'constitutions' / 'demo.yaml'}\nbatch_size: 0\n"
    )
    assert_refused(
        rlaif("run", "--config", "config.yaml"),
        "config.yaml:3: batch_size: Input should be greater than 0 (got 0)\n",
    )
    assert not Path("store").exists()


def test_run_reports_every_config_problem() -> None:
    Path("config.yaml").write_text(
        "store: store\nconstitution: nope.yaml\ngeneration:\n  temprature: 1\n"
    )
    assert_refused(
        rlaif("run", "--config", "config.yaml", "--store", "other"),
        "config.yaml:2: constitution: constitution file 'nope.yaml' does not exist\n"
        "config.yaml:4: unknown key 'temprature' in generation "
        "(allowed: n, temperature, top_p, max_tokens); did you mean 'temperature'?\n",
    )
    assert not Path("store").exists()
    assert not Path("other").exists()


def test_run_missing_config_file() -> None:
    assert_refused(rlaif("run", "--config", "absent.yaml"), "absent.yaml:1: file not found\n")


def test_run_refuses_a_bad_constitution_before_writing() -> None:
    Path("bad.yaml").write_text(BAD_CONSTITUTION)
    Path("config.yaml").write_text("store: store\nconstitution: bad.yaml\npolicy:\n  model: tiny\n")
    assert_refused(rlaif("run", "--config", "config.yaml"), BAD_CONSTITUTION_PROBLEMS)
    assert not Path("store").exists()


# --- sql -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    db = Store(tmp_path / "store")
    db.write("prompts", PROMPTS, RUN)
    db.write("judgments", JUDGMENTS, RUN)
    yield str(db.root)


def test_sql_csv(store: str) -> None:
    query = (
        "SELECT p.prompt_id, p.text, p.category, count(j.judgment_id) AS judgments "
        "FROM prompts p LEFT JOIN judgments j USING (prompt_id) GROUP BY ALL ORDER BY 1"
    )
    result = rlaif("sql", "--store", store, query, "--format", "csv")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        'prompt_id,text,category,judgments\np1,Hi?,chat,2\np2,"Tell me, ""why""?",,0\n'
    )


def test_sql_json(store: str) -> None:
    query = "SELECT judgment_id, p_a, position_consistent, rationale FROM judgments ORDER BY 1"
    result = rlaif("sql", "--store", store, query, "--format", "json")
    assert (result.exit_code, result.stderr) == (0, "")
    rows = [
        {"judgment_id": "j1", "p_a": 0.75, "position_consistent": True, "rationale": None},
        {"judgment_id": "j2", "p_a": 0.5, "position_consistent": False, "rationale": "a tie"},
    ]
    assert result.stdout == json.dumps(rows, indent=2) + "\n"  # one key a line, NULL as null


def test_sql_json_no_rows(store: str) -> None:
    result = rlaif("sql", "--store", store, "SELECT * FROM prompts WHERE false", "--format", "json")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "[]\n", "")


def test_sql_table_is_the_default(store: str) -> None:
    result = rlaif("sql", "--store", store, "SELECT prompt_id, category FROM prompts ORDER BY 1")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        "┏━━━━━━━━━━━┳━━━━━━━━━━┓\n"
        "┃ prompt_id ┃ category ┃\n"
        "┡━━━━━━━━━━━╇━━━━━━━━━━┩\n"
        "│ p1        │ chat     │\n"
        "│ p2        │          │\n"
        "└───────────┴──────────┘\n"
    )


def sql_error(store: str, query: str) -> str:
    """stderr of a refused `rlaif sql`: exit 2, nothing on stdout, one line, no traceback."""
    result = rlaif("sql", "--store", store, query)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    return result.stderr


def test_sql_bad_query_is_one_line(store: str) -> None:
    error = sql_error(store, "SELEC 1")
    assert error.startswith('error: Parser Error: syntax error at or near "SELEC"')


def test_sql_unknown_column_is_one_line(store: str) -> None:
    error = sql_error(store, "SELECT nope FROM prompts")
    assert error.startswith('error: Binder Error: Referenced column "nope" not found')


def test_sql_is_read_only(store: str) -> None:
    error = sql_error(store, "CREATE TABLE x (a INT)")
    assert error.startswith("error: ")
    assert "read-only" in error
    tables = rlaif(
        "sql", "--store", store, "SELECT count(*) AS n FROM duckdb_tables()", "--format", "csv"
    )
    assert tables.stdout == "n\n0\n"


def test_sql_missing_store(tmp_path: Path) -> None:
    db = tmp_path / "nostore" / "rlaif.duckdb"
    assert_refused(
        rlaif("sql", "--store", "nostore", "SELECT 1"),
        f"error: No rlaif database at {Path('nostore') / 'rlaif.duckdb'}. "
        "Run `rlaif run` or `rlaif demo` first to create it.\n",
    )
    assert not db.parent.exists()


def test_sql_bad_format(store: str) -> None:
    result = rlaif("sql", "--store", store, "SELECT 1", "--format", "xml")
    assert result.exit_code == 2
    assert "'xml' is not one of 'table', 'csv', 'json'" in result.stderr


# --- summary ---------------------------------------------------------------------------


def test_summary_of_an_empty_folder(tmp_path: Path) -> None:
    Path("empty").mkdir()
    assert_refused(
        rlaif("summary", "--store", "empty"),
        f"error: No rlaif database at {tmp_path.resolve() / 'empty' / 'rlaif.duckdb'}. "
        "Run `rlaif run` or `rlaif demo` first to create it.\n",
    )


def test_summary_of_a_store_without_runs(store: str) -> None:
    assert_refused(
        rlaif("summary", "--store", store),
        f"error: no runs in {store}; run `rlaif demo` first\n",
    )


# --- train -----------------------------------------------------------------------------


TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train-demo.yaml"


def test_train_without_a_store_is_refused(tmp_path: Path) -> None:
    assert_refused(
        rlaif("train", "dpo", "--config", str(TRAIN_CONFIG), "--store", "nowhere"),
        f"error: No rlaif database at {tmp_path.resolve() / 'nowhere' / 'rlaif.duckdb'}. "
        "Run `rlaif run` or `rlaif demo` first to create it.\n",
    )
    assert not Path("nowhere").exists()


def test_train_with_no_matching_rows_is_refused(store: str) -> None:
    assert_refused(
        rlaif("train", "sft", "--config", str(TRAIN_CONFIG), "--store", store, "--run", "r9"),
        f"error: no sft training rows in {store} match the data filters runs=['r9'] "
        "split='train'; run `rlaif run` or `rlaif demo` first\n",
    )
    assert Store(store).count("models") == 0


def test_train_passes_nproc_per_node_to_the_flow(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.training

    seen = []
    monkeypatch.setattr(flows.training, "has_training_rows", lambda config, stage: True)
    monkeypatch.setattr(
        flows.training, "train_flow", lambda config, stage: seen.append(config) or "m-2"
    )
    args = ("train", "dpo", "--config", str(TRAIN_CONFIG), "--store", store)
    result = rlaif(*args, "--nproc-per-node", "2")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "dpo model m-2 registered\n", "")
    assert rlaif(*args).exit_code == 0
    assert [config.nproc_per_node for config in seen] == [2, 1]  # 1: the config's default


def test_train_refuses_nproc_per_node_below_one(store: str) -> None:
    result = rlaif("train", "dpo", "--config", str(TRAIN_CONFIG), "--nproc-per-node", "0")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.endswith(
        "Error: Invalid value for '--nproc-per-node': 0 is not in the range x>=1.\n"
    )


# --- judge eval ------------------------------------------------------------------------

GOLD = [
    {"prompt": "Hi?", "chosen": "good answer", "rejected": "bad one here now", "subset": "chat"},
    {"prompt": "Why?", "chosen": "plain answer with more words", "rejected": "good answer",
     "principle_id": "honest"},
]  # fmt: skip


@pytest.fixture
def scripted_judge(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A judge that says 0.77 for whichever option starts with "good"; no model is built."""
    import flows.judge_eval
    from tests.scripted_backend import ScriptedBackend, last_user_message

    def score(chat: Any, options: Any) -> dict[str, float | None]:
        p_first = 0.77 if "(A) good" in last_user_message(chat) else 0.23
        return {options[0]: math.log(p_first), options[1]: math.log(1 - p_first)}

    made: list[object] = []
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)  # the command sets it

    def make_backend(config: Any, seed: int) -> ScriptedBackend:
        made.append(ScriptedBackend("scripted", score_fn=score))
        return made[-1]  # type: ignore[return-value]

    monkeypatch.setattr(flows.judge_eval, "make_backend", make_backend)
    monkeypatch.setattr(flows.judge_eval, "model_ref", lambda config: ModelRef("judge-x", "/x"))
    return made


def write_gold(rows: list[Any]) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    Path("gold.jsonl").write_text("".join(f"{line}\n" for line in lines))
    return "gold.jsonl"


def test_judge_eval_json(scripted_judge: list[object]) -> None:
    demo = str(REPO / "configs" / "demo.yaml")
    args = ["judge", "eval", write_gold(GOLD), "--config", demo, "--mode", "logprob"]
    result = rlaif(*args, "--store", "store", "--format", "json")
    assert (result.exit_code, result.stderr) == (0, "")
    out = json.loads(result.stdout)
    assert list(out) == [
        "n", "accuracy", "position_consistency", "first_position_rate", "ece",
        "accuracy_chosen_longer", "accuracy_chosen_shorter", "by_principle", "by_subset",
        "by_length", "not_ok", "judge_model", "mode",
    ]  # fmt: skip
    assert out == {
        "n": 2, "accuracy": 0.5, "position_consistency": 1.0, "first_position_rate": 0.5,
        "ece": pytest.approx(0.27), "accuracy_chosen_longer": 0.0, "accuracy_chosen_shorter": 1.0,
        "by_principle": {"generic": {"accuracy": 1.0, "n": 1}, "honest": {"accuracy": 0.0, "n": 1}},
        "by_subset": {"chat": {"accuracy": 1.0, "n": 1}},
        "by_length": {
            "chosen_much_shorter": {"accuracy": 1.0, "mean_p_chosen": pytest.approx(0.77), "n": 1},
            "chosen_much_longer": {"accuracy": 0.0, "mean_p_chosen": pytest.approx(0.23), "n": 1},
        },
        "not_ok": 0, "judge_model": "judge-x", "mode": "logprob",
    }  # fmt: skip
    rows = Store("store").query("SELECT metric FROM judge_evals")
    assert {"accuracy", "ece", "by_principle/honest/accuracy"} <= {r["metric"] for r in rows}
    again = rlaif(*args, "--store", "store", "--format", "json")
    assert (again.exit_code, again.stdout, len(scripted_judge)) == (0, result.stdout, 1)


def test_judge_eval_table(scripted_judge: list[object]) -> None:
    gold = write_gold(GOLD[:1])
    result = rlaif("judge", "eval", gold, "--store", "store", "--limit", "1", "--mode", "logprob")
    assert (result.exit_code, result.stderr) == (0, "")
    first_line = "judge judge-x (logprob) on gold.jsonl: 1 pairs, 0 not ok; run "
    assert result.stdout.startswith(first_line)
    for text in ("accuracy", "position_consistency", "1.000", "first_position_rate", "chat"):
        assert text in result.stdout
    # p_chosen by length bucket: the one pair's chosen is 2 words against 4.
    assert re.search(r"chosen_much_shorter\s*│\s*1\.000\s*│\s*0\.770\s*│\s*1", result.stdout)


@pytest.mark.parametrize(
    ("data", "stderr"),
    [
        ("absent.jsonl", "absent.jsonl: no such file or folder; expected 'builtin', "),
        ([GOLD[0], {"prompt": "p", "chosen": "c"}],
         "gold.jsonl:2: missing column 'rejected' (columns: chosen, prompt)\n"),
        ([GOLD[0], "{oops"], "gold.jsonl:2: invalid JSON: Expecting property name "
         "enclosed in double quotes (column 2)\n"),
        ([{**GOLD[0], "principle_id": "nope"}], "gold.jsonl:1: unknown principle_id "
         "'nope' (constitution 'default' has: "),
    ],
)  # fmt: skip
def test_judge_eval_refuses_bad_data_before_anything(
    data: Any, stderr: str, scripted_judge: list[object]
) -> None:
    source = data if isinstance(data, str) else write_gold(data)
    result = rlaif("judge", "eval", source, "--store", "store")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith(stderr) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not Path("store").exists() and not scripted_judge


def test_judge_eval_refuses_a_mode_the_judge_settings_forbid(
    scripted_judge: list[object],
) -> None:
    Path("c.yaml").write_text(f"constitution: {CONSTITUTION}\njudge:\n  min_confidence: 0.7\n")
    result = rlaif("judge", "eval", write_gold(GOLD), "--config", "c.yaml", "--mode", "cot")
    assert_refused(
        result,
        "error: --mode cot: min_confidence=0.7 exceeds cot_clamp[1]=0.6: in cot mode every "
        "pair would be dropped\n",
    )
    assert not scripted_judge


def test_judge_eval_offers_every_judge_mode() -> None:
    from alignment.judge_config import JudgeConfig

    modes = get_args(JudgeConfig.model_fields["mode"].annotation)
    result = rlaif("judge", "eval", "builtin", "--mode", "coin-flip")
    assert result.exit_code == 2
    assert f"'coin-flip' is not one of {', '.join(repr(m) for m in modes)}" in result.stderr


# --- help ------------------------------------------------------------------------------


def all_commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from all_commands(sub, (*path, name))


COMMANDS = list(all_commands(main))


def test_walk_finds_every_command() -> None:
    assert {" ".join(path) for path, _ in COMMANDS} == {
        "", "constitution", "constitution lint", "run", "demo", "summary", "sql", "models",
        "models build-tiny", "models build-smollm2", "export", "train", "eval", "self-improve",
        "serve", "deploy", "models build-qwen-coder-0.5b", "merge",
        "status", "report", "judge", "judge eval", "store", "store compact", "store push",
        "store pull",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "rlaif" for p, _ in COMMANDS]
)
def test_every_command_is_documented(path: tuple[str, ...], command: click.Command) -> None:
    assert command.help, f"rlaif {' '.join(path)} has no help text"
    assert "Example: rlaif" in command.help
    result = rlaif(*path, "--help")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.startswith(f"Usage: {' '.join(('rlaif', *path))} ")
    assert "Example: rlaif" in result.stdout


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "rlaif" for p, _ in COMMANDS]
)
def test_every_option_is_documented(path: tuple[str, ...], command: click.Command) -> None:
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"rlaif {' '.join(path)} {param.opts[0]} has no help text"


def test_store_options_are_the_shared_ones() -> None:
    """--store names a store to read (default ./rlaif-data) or overrides a config's `store`."""
    stores = {
        " ".join(path): param
        for path, command in COMMANDS
        for param in command.params
        if param.name == "store"
    }
    readers = {name for name, param in stores.items() if param.default == "rlaif-data"}
    assert readers == {
        "summary", "status", "report", "sql", "export", "store compact", "store push", "store pull"
    }  # fmt: skip
    for name, param in stores.items():
        assert isinstance(param, click.Option) and param.help is not None
        if name in readers:
            assert (param.help, param.show_default) == ("Store root.", True)
        else:
            assert param.default is None and param.help.startswith("Store root ("), name
