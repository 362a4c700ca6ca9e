"""Two-turn prompts through the whole collect-preferences flow on the tiny model: the
store keeps each conversation, SQL reads any turn, every stage sees the history, and the
training rows and exports keep it."""

from __future__ import annotations

import json

import pytest

from alignment.conversation import from_stored, turns
from alignment.prompts import load_prompts
from flows.config import PromptsConfig
from flows.pipeline import collect_preferences
from flows.training_rows import DataFilter, export_rows, preference_rows, sft_rows
from storage import Store
from tests.integration.conftest import small_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_turn_run(tmp_path_factory, prefect_harness, vllm_backend, policy_config):
    root = tmp_path_factory.mktemp("two-turn")
    config = small_config(root, policy_config).model_copy(
        update={"prompts": PromptsConfig(source="builtin-two-turn", limit=4)}
    )
    run_id = collect_preferences(config=config).run_id
    return config, Store(root), run_id


def test_the_store_keeps_each_conversation(two_turn_run) -> None:
    _, store, _ = two_turn_run
    shipped = {p.prompt_id: p for p in load_prompts("builtin-two-turn")}
    rows = store.query("SELECT prompt_id, text, messages FROM prompts ORDER BY prompt_id")
    assert len(rows) == 4
    for row in rows:
        assert from_stored(row["text"], row["messages"]) == shipped[row["prompt_id"]].messages
    # SQL reads any turn: the first user turn and the assistant's first answer.
    first = store.query(
        "SELECT json_extract_string(messages, '$[0].role') AS role, "
        "json_extract_string(messages, '$[1].content') AS answer FROM prompts"
    )
    assert {r["role"] for r in first} == {"user"} and all(r["answer"] for r in first)


def test_every_stage_ran_on_the_conversations(two_turn_run) -> None:
    _, store, run_id = two_turn_run
    train = store.query("SELECT count(*) AS n FROM prompts WHERE split = 'train'")[0]["n"]
    assert store.count("responses") == train * 3
    assert store.count("critiques") == store.count("responses")
    assert store.count("judgments") == train * 3
    assert store.query("SELECT status FROM runs")[0]["status"] == "completed"
    # Every pair carries its prompt's conversation.
    pairs = store.query(
        "SELECT p.messages AS pair_messages, pr.messages FROM preference_pairs p "
        "JOIN prompts pr USING (prompt_id)"
    )
    assert pairs and all(p["pair_messages"] == p["messages"] for p in pairs)


def test_training_rows_and_exports_keep_the_history(two_turn_run, tmp_path) -> None:
    _, store, _ = two_turn_run
    rows = preference_rows(store, DataFilter(split=None))
    assert rows and all(turns(tuple(r["prompt"])) == 2 for r in rows)
    assert all(r["prompt"][-1]["role"] == "user" and "messages" not in r for r in rows)
    out = export_rows(rows, "jsonl", tmp_path / "pairs.jsonl")
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["prompt"] for e in exported] == [r["prompt"] for r in rows]
    revisions = sft_rows(store, DataFilter(split="train"))
    assert all(len(r["prompt"]) == 3 for r in revisions)


def test_a_rerun_adds_nothing(two_turn_run) -> None:
    config, store, _ = two_turn_run
    before = {t: store.count(t) for t in ("prompts", "responses", "judgments", "preference_pairs")}
    collect_preferences(config=config)
    assert {t: store.count(t) for t in before} == before
