"""A model is known by its content: retrained in place it is another model, moved it is the same.

The name a model gets in lineage (``<label>@<12 hex>``) goes into every response,
critique, judgment, run and audit id, so a folder whose weights changed is sampled and
judged again instead of reusing what the old weights wrote.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

import flows.models
import flows.stages
from alignment.backends import SamplingConfig
from alignment.constitution import load_constitution
from alignment.ids import content_id
from alignment.judge import Candidate
from alignment.judge_config import JudgeConfig
from alignment.model_ref import ModelRef
from flows.config import ModelConfig
from flows.models import folder_identity, make_backend, model_identity, model_ref
from storage import Store
from tests.scripted_backend import ScriptedBackend

REPO = Path(__file__).resolve().parents[2]
HOUR_AGO_NS = 3600 * 10**9


@pytest.fixture(autouse=True)
def hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hash cache file of the test's own, and no hashes remembered from other tests."""
    path = tmp_path / "file-hashes.json"
    monkeypatch.setattr(flows.models, "hash_cache_path", lambda: path)
    monkeypatch.setattr(flows.models, "_MEMORY", {})
    return path


def save_model(folder: Path) -> Any:
    """A tiny Llama and a word-level tokenizer, saved as any checkpoint is."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    words = ["[UNK]", "(", "A", "B", "The", "answer", "is", "yes", "no"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return model


def retrain_in_place(model: Any, folder: Path) -> None:
    """One weight moves and the checkpoint is saved over the old one (same file sizes)."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[3, 0] += 1.0
    model.save_pretrained(folder)


def age(folder: Path, by_ns: int = HOUR_AGO_NS) -> None:
    """Date the files ``by_ns`` back from now: an hour old, their hashes are trusted."""
    now = time.time_ns()
    for path in folder.iterdir():
        os.utime(path, ns=(now - by_ns, now - by_ns))


def test_retraining_in_place_changes_the_identity_and_moving_keeps_it(tmp_path: Path) -> None:
    folder = tmp_path / "my-policy"
    model = save_model(folder)
    before = model_identity(ModelConfig(model=str(folder)))
    assert before is not None and len(before) == 12
    assert model_ref(ModelConfig(model=str(folder))) == ModelRef(f"my-policy@{before}", str(folder))

    retrain_in_place(model, folder)
    after = model_identity(ModelConfig(model=str(folder)))
    assert after != before
    assert model_ref(ModelConfig(model=str(folder))).name == f"my-policy@{after}"

    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    assert model_identity(ModelConfig(model=str(moved))) == after
    # The lineage label is the folder's own name unless the config names the model.
    assert model_ref(ModelConfig(model=str(moved))).name == f"renamed@{after}"
    assert model_ref(ModelConfig(model=str(moved), name="policy")).name == f"policy@{after}"


def test_the_tokenizer_and_chat_template_count_other_files_do_not(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_model(folder)
    first = folder_identity(folder)
    (folder / "README.md").write_text("# notes\n")
    (folder / "training_args.bin").write_bytes(b"trainer state")
    assert folder_identity(folder) == first
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    templated = folder_identity(folder)
    assert templated != first
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"yes"', '"yeah"'))
    assert folder_identity(folder) != templated


def test_a_weight_file_is_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    save_model(folder)
    hashed: list[str] = []
    real = flows.models.file_sha256

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(flows.models, "file_sha256", counting)
    files = [p.name for p in flows.models.identity_files(folder)]
    assert "model.safetensors" in files and "tokenizer.json" in files

    # A file hashed within a clock tick of its last write may be written again in that
    # tick, leaving size and mtime alike: its hash is not trusted later (here: an mtime
    # ahead of the clock stands for "written just now").
    identity = folder_identity(folder)
    age(folder, by_ns=-HOUR_AGO_NS)
    hashed.clear()
    assert folder_identity(folder) == identity and sorted(hashed) == sorted(files)
    assert folder_identity(folder) == identity and sorted(hashed) == sorted(files * 2)

    age(folder)
    hashed.clear()
    assert folder_identity(folder) == identity and sorted(hashed) == sorted(files)
    monkeypatch.setattr(flows.models, "_MEMORY", {})  # another process: the cache file only
    hashed.clear()
    assert folder_identity(folder) == identity and hashed == []

    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert folder_identity(folder) == identity and hashed == ["model.safetensors"]


def test_hub_ids_are_known_by_the_commit_the_cache_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # an uncached id may then be downloaded
    model = ModelConfig(model="org/chat-model")
    assert model_ref(model) == ModelRef("org/chat-model@unresolved", "org/chat-model")

    repo = cache / "models--org--chat-model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        assert model_identity(model) == commit[:12]
        assert model_ref(model) == ModelRef(f"org/chat-model@{commit[:12]}", "org/chat-model")


def test_an_embedded_model_keeps_its_recipe_named_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tiny-0123456789ab"  # as built: named by the hash of its recipe
    monkeypatch.setattr(flows.models, "embedded_model_path", lambda name: folder)
    assert model_ref(ModelConfig()) == ModelRef("tiny-0123456789ab", str(folder))
    assert model_identity(ModelConfig()) == "0123456789ab"
    assert model_ref(ModelConfig(name="judge")).name == "judge@0123456789ab"


def test_an_embedded_model_passed_by_its_folder_keeps_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop samples with the starting model by its folder and name: the lineage name
    must be the one `tiny` gets, or the incumbent's samples would not be found as its own."""
    monkeypatch.setenv("RLAIF_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "tiny-0123456789ab"
    save_model(folder)
    hashed: list[Path] = []
    real = flows.models.file_sha256
    monkeypatch.setattr(flows.models, "file_sha256", hashed.append)
    by_folder = ModelConfig(model=str(folder), name=folder.name)
    assert model_ref(by_folder) == ModelRef("tiny-0123456789ab", str(folder)) and hashed == []
    # The same folder name outside the model cache is an ordinary folder, known by content.
    elsewhere = tmp_path / "copies" / "tiny-0123456789ab"
    save_model(elsewhere)
    monkeypatch.setattr(flows.models, "file_sha256", real)
    assert "@" in model_ref(ModelConfig(model=str(elsewhere), name=elsewhere.name)).name


def test_a_registered_model_is_known_by_its_model_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop names a trained candidate by its model_id (a hash of its base, data and
    settings); the store wrote its folder once, named after that id. It is not hashed."""
    model_id = content_id("model", "dpo", "tiny-0123456789ab", ["pair"], None, {})
    folder = tmp_path / "store" / "models" / f"dpo-{model_id[:12]}"
    save_model(folder)
    hashed: list[Path] = []
    real = flows.models.file_sha256
    monkeypatch.setattr(flows.models, "file_sha256", hashed.append)
    candidate = ModelConfig(model=str(folder), name=model_id)
    assert model_ref(candidate) == ModelRef(model_id, str(folder), content_id=model_id)
    assert model_identity(candidate) == model_id[:12] and hashed == []
    # Another name, or a folder not named after it, is known by its content as usual.
    other = content_id("model", "another")
    monkeypatch.setattr(flows.models, "file_sha256", real)
    assert model_ref(candidate.model_copy(update={"name": other})).name.startswith(f"{other}@")


def test_an_openai_model_is_its_name() -> None:
    config = ModelConfig(model="gpt", backend="openai", base_url="http://127.0.0.1:9/v1")
    assert (model_ref(config), model_identity(config)) == (ModelRef("gpt", "gpt"), None)
    named = config.model_copy(update={"name": "served-gpt"})
    # The backend writes the name the flows' ids expect.
    assert make_backend(named, seed=0).model_name == "served-gpt"


# --- In the store ---------------------------------------------------------------------


def test_a_retrained_folder_is_sampled_and_judged_again_a_moved_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[ScriptedBackend] = []

    def scripted(config: ModelConfig, seed: int) -> ScriptedBackend:
        made.append(ScriptedBackend(model_name=model_ref(config).name))  # as make_backend
        return made[-1]

    monkeypatch.setattr(flows.stages, "make_backend", scripted)
    monkeypatch.setattr(flows.stages, "get_run_logger", lambda: logging.getLogger("test"))
    store = Store(tmp_path / "store")
    constitution = load_constitution(REPO / "constitutions" / "demo.yaml")
    prompts = {content_id("prompt", text): text for text in ("Hi?", "Why is the sky blue?")}
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=0)

    def collect(folder: Path) -> tuple[tuple[int, int, int, int], set[str]]:
        """(samples reused, computed, judgments reused, computed), the judge's names."""
        model = ModelConfig(model=str(folder))
        wanted, sampled = flows.stages.sample_stage(store, "run", model, prompts, sampling)
        rows = store.query(
            "SELECT response_id, prompt_id, text FROM responses "
            "WHERE response_id IN (SELECT unnest(?))",
            [[rid for ids in wanted.values() for rid in ids]],
        )
        candidates = {pid: [] for pid in prompts}
        for row in sorted(rows, key=lambda r: r["response_id"]):
            pid = row["prompt_id"]
            candidates[pid].append(Candidate(row["response_id"], pid, prompts[pid], row["text"]))
        judgments, judged = flows.stages.judge_stage(
            store, "run", model, 0, constitution, candidates, JudgeConfig(mode="logprob")
        )
        counts = (sampled.reused, sampled.computed, judged.reused, judged.computed)
        return counts, {j.judge_model for j in judgments}

    folder = tmp_path / "policy"
    model = save_model(folder)
    first, judges = collect(folder)
    assert first[0] == 0 and first[1] == 4 and first[3] > 0
    assert judges == {f"policy@{model_identity(ModelConfig(model=str(folder)))}"}
    assert collect(folder)[0] == (4, 0, first[3], 0)  # a rerun asks the model nothing

    retrain_in_place(model, folder)
    made.clear()
    again, judges = collect(folder)
    assert again == first and made  # every sample and judgment made anew
    assert judges == {f"policy@{model_identity(ModelConfig(model=str(folder)))}"}
    assert store.count("responses") == 8

    moved = tmp_path / "archive" / "policy"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    made.clear()
    assert collect(moved)[0] == (4, 0, first[3], 0) and not made
