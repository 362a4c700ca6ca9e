"""The pipeline config: shipped configs load, and every bad one is refused as file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.yaml_spec import SpecError
from flows.config import PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[2]
# configs/train-*.yaml configure training stages; the others are pipeline presets
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("train-"))
TRAIN_CONFIGS = sorted((REPO / "configs").glob("train-*.yaml"))
TOP_KEYS = (
    "store, constitution, iteration, seed, batch_size, prompts, policy, judge_model, "
    "generation, critique, judge, eval, loop"
)
MODEL_KEYS = (
    "model, backend, base_url, max_model_len, kv_cache_gib, dtype, max_concurrency, name, ray, "
    "tensor_parallel_size, pipeline_parallel_size, data_parallel_size"
)


@pytest.fixture(autouse=True)
def repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs name the constitution relative to the repo root; the hub is reachable unless a
    test says otherwise (the CLI sets HF_HUB_OFFLINE=1, and it may leak from other tests)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def refusal(tmp_path: Path, text: str) -> tuple[str, str]:
    """(the config's path, str(SpecError)) for a config that must be refused."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_config(path)
    return str(path), str(caught.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    assert Path(config.constitution).is_file()


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_train_configs_load(path: Path) -> None:
    from flows.training import TrainConfig, load_train_config

    assert isinstance(load_train_config(path), TrainConfig)


def test_train_config_errors_have_lines(tmp_path: Path) -> None:
    from flows.training import load_train_config

    path = tmp_path / "train.yaml"
    path.write_text("store: x\ndata:\n  min_p_chosen: 0.2\nsft:\n  lr: 1\n")
    with pytest.raises(SpecError) as caught:
        load_train_config(path)
    assert str(caught.value) == (
        f"{path}:3: data.min_p_chosen: Input should be greater than or equal to 0.5 (got 0.2)\n"
        f"{path}:5: unknown key 'lr' in sft (allowed: use_lora, use_qlora, lora_r, lora_alpha, "
        "seed, learning_rate, num_train_epochs, per_device_train_batch_size, max_length, "
        "completion_only_loss)"
    )


def test_demo_config_values() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.constitution == "constitutions/demo.yaml"
    assert config.batch_size == 32
    assert config.prompts.limit == 30
    assert config.policy.model == "smollm2"
    assert config.judge_model is None
    assert config.generation.max_tokens == 64
    assert config.judge.mode == "contrast"
    assert config.loop.gates.min_judge_accuracy == 0.6


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    """Not a run on defaults into ./rlaif-data: an empty file is a mistake, not a choice."""
    path, error = refusal(tmp_path, "# nothing set\n")
    assert error == f"{path}:1: the file is empty (or only comments); a config needs its settings"


def test_overrides_apply(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "demo.yaml", {"store": str(tmp_path / "s")})
    assert config.store == str(tmp_path / "s")
    assert config.batch_size == 32  # the rest still comes from the file


def test_override_is_validated(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        load_config(REPO / "configs" / "demo.yaml", {"batch_size": 0})
    assert str(caught.value) == (
        f"{REPO / 'configs' / 'demo.yaml'}:9: batch_size: Input should be greater than 0 (got 0)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "store: s\nbogus: 1\n",
            [f"2: unknown key 'bogus' at top level (allowed: {TOP_KEYS})"],
            id="unknown_top_level_key",
        ),
        pytest.param(
            "seed: 1\nbatch_sise: 4\n",
            [
                f"2: unknown key 'batch_sise' at top level (allowed: {TOP_KEYS}); "
                "did you mean 'batch_size'?"
            ],
            id="unknown_top_level_key_suggests",
        ),
        pytest.param(
            "seed: 1\ngeneration:\n  n: 2\n  temprature: 1\n",
            [
                "4: unknown key 'temprature' in generation "
                "(allowed: n, temperature, top_p, max_tokens); did you mean 'temperature'?"
            ],
            id="unknown_nested_key_lists_the_sections_keys",
        ),
        pytest.param(
            # judge_model is `ModelConfig | None`: the allowed keys are still ModelConfig's.
            "judge_model:\n  modle: tiny\n",
            [
                f"2: unknown key 'modle' in judge_model (allowed: {MODEL_KEYS}); "
                "did you mean 'model'?"
            ],
            id="unknown_key_in_optional_section",
        ),
        pytest.param(
            "seed: 1\nbatch_size: many\n",
            [
                "2: batch_size: Input should be a valid integer, "
                "unable to parse string as an integer (got 'many')"
            ],
            id="wrong_type",
        ),
        pytest.param(
            "generation: 3\npolicy: [tiny]\n",
            [
                "1: generation: must be a mapping of settings, got 3",
                "2: policy: must be a mapping of settings, got a list",
            ],
            id="section_must_be_a_mapping",
        ),
        pytest.param(
            "judge:\n  mode: vibes\n",
            [
                "2: judge.mode: Input should be 'logprob', 'cot', 'contrast', 'likelihood' "
                "or 'ensemble' (got 'vibes')"
            ],
            id="choice",
        ),
    ],
)
def test_refusal_says_where_and_why(tmp_path: Path, text: str, expected: list[str]) -> None:
    """Each line of the error is the config's path, the line number and the problem."""
    path, error = refusal(tmp_path, text)
    assert error == "\n".join(f"{path}:{line}" for line in expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "generation:\n  n: 0\n",
            "2: generation.n: Input should be greater than or equal to 2 (got 0)",
        ),
        ("batch_size: -1\n", "1: batch_size: Input should be greater than 0 (got -1)"),
        ("batch_size: 0\n", "1: batch_size: Input should be greater than 0 (got 0)"),
        ("prompts:\n  limit: 0\n", "2: prompts.limit: Input should be greater than 0 (got 0)"),
    ],
    ids=["generation.n=0", "batch_size=-1", "batch_size=0", "prompts.limit=0"],
)
def test_sizes_must_be_positive(tmp_path: Path, text: str, expected: str) -> None:
    path, error = refusal(tmp_path, text)
    assert error == f"{path}:{expected}"


def test_missing_model_path(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "seed: 1\npolicy: {model: ./nope}\n")
    assert error == f"{path}:2: policy.model: model path './nope' does not exist"


def test_hub_model_id_is_not_checked_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("policy:\n  model: Qwen/Qwen2.5-0.5B-Instruct\n")
    assert load_config(path).policy.model == "Qwen/Qwen2.5-0.5B-Instruct"


def test_offline_a_hub_id_must_be_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path, error = refusal(tmp_path, "seed: 1\njudge_model:\n  model: nobody/no-such-model\n")
    assert error == (
        f"{path}:3: judge_model.model: model 'nobody/no-such-model' is not in the local Hugging "
        "Face cache and HF_HUB_OFFLINE is set, so it cannot be downloaded (set HF_HUB_OFFLINE=0 "
        "to let vLLM download it)"
    )


@pytest.mark.parametrize(("model", "hint"), [("smollm", "; did you mean 'smollm2'?"), ("gpt5", "")])
def test_a_model_name_that_is_nothing_is_refused(tmp_path: Path, model: str, hint: str) -> None:
    path, error = refusal(tmp_path, f"policy:\n  dtype: auto\n  model: {model}\n")
    assert error == (
        f"{path}:3: policy.model: model '{model}' is not an embedded model (tiny, smollm2, "
        f"qwen-coder-0.5b), an existing folder (write ./{model} for one here), or a hub id "
        f"(org/name){hint}"
    )


def test_an_openai_server_names_its_own_models(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "judge_model:\n  model: gpt5\n  backend: openai\n  base_url: http://127.0.0.1:8/v1\n"
    )
    assert load_config(path).judge_model.model == "gpt5"  # type: ignore[union-attr]


def test_missing_constitution_file(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "constitution: constitutions/nope.yaml\n")
    assert error == (
        f"{path}:1: constitution: constitution file 'constitutions/nope.yaml' does not exist"
    )


def test_openai_backend_needs_base_url(tmp_path: Path) -> None:
    # A check of the whole section points at the section's key, not its first setting.
    path, error = refusal(tmp_path, "seed: 1\npolicy:\n  model: tiny\n  backend: openai\n")
    assert error == (
        f"{path}:2: policy: backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)"
    )


def test_openai_backend_with_base_url(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("judge_model:\n  backend: openai\n  base_url: http://127.0.0.1:8000/v1\n")
    config = load_config(path)
    assert config.judge_model is not None
    assert config.judge_model.base_url == "http://127.0.0.1:8000/v1"


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "store: [a\nseed: 1\n")
    assert error == (
        f"{path}:2: YAML syntax error: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence, line 1)"
    )


@pytest.mark.parametrize("text", ["- store: s\n- seed: 1\n", "just text\n"], ids=["list", "scalar"])
def test_document_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path, error = refusal(tmp_path, text)
    assert error == f"{path}:1: a config must be a mapping of settings"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(SpecError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:1: file not found"


def test_several_problems_reported_together_sorted_by_line(tmp_path: Path) -> None:
    path, error = refusal(
        tmp_path,
        "bogus: 2\nseed: 1\ngeneration:\n  n: 0\nbatch_size: many\npolicy:\n  model: ./nope\n",
    )
    assert error.splitlines() == [
        f"{path}:1: unknown key 'bogus' at top level (allowed: {TOP_KEYS})",
        f"{path}:4: generation.n: Input should be greater than or equal to 2 (got 0)",
        f"{path}:5: batch_size: Input should be a valid integer, "
        "unable to parse string as an integer (got 'many')",
        f"{path}:7: policy.model: model path './nope' does not exist",
    ]


# --- What a model folder must hold, before any work ---------------------------------------


def model_dir(tmp_path: Path, name: str = "m", weights: tuple[str, ...] = ("model.safetensors",),
              **config: object) -> Path:  # fmt: skip
    """A folder with config.json (``config``) and weight files; nothing loads them here."""
    import json

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    for weight in weights:
        (folder / weight).write_bytes(b"")
    return folder


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    path, error = refusal(tmp_path, f"seed: 1\npolicy:\n  model: {folder}\n")
    assert error == (
        f"{path}:3: policy.model: model folder '{folder}' holds no model: it has no config.json "
        "(a model folder has config.json and weights: *.safetensors, *.bin, *.pt or a sharded "
        "*.index.json)"
    )
    (folder / "adapter_config.json").write_text("{}")
    path, error = refusal(tmp_path, f"seed: 1\npolicy:\n  model: {folder}\n")
    assert error == (
        f"{path}:3: policy.model: model folder '{folder}' holds a LoRA adapter "
        "(adapter_config.json), not a model: merge it into its base model and name that folder"
    )


def test_a_folder_whose_only_bin_is_trainer_state_has_no_weights(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, weights=("training_args.bin", "optimizer.pt"))
    path, error = refusal(tmp_path, f"judge_model:\n  model: {folder}\n")
    assert error.startswith(
        f"{path}:2: judge_model.model: model folder '{folder}' holds no model: it has "
        "config.json but no weight files"
    )


def test_a_sharded_index_needs_its_shards(tmp_path: Path) -> None:
    import json

    folder = model_dir(tmp_path, weights=("model-00001-of-00002.safetensors",))
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    path, error = refusal(tmp_path, f"policy:\n  model: {folder}\n")
    assert error == (
        f"{path}:2: policy.model: model folder '{folder}': model.safetensors.index.json names "
        "1 shard(s) that are not there (first: model-00002-of-00002.safetensors); the download "
        "or copy is unfinished"
    )
    (folder / shards["b"]).write_bytes(b"")
    assert load_config_text(tmp_path, f"policy:\n  model: {folder}\n").policy.model == str(folder)


def load_config_text(tmp_path: Path, text: str) -> PipelineConfig:
    path = tmp_path / "ok.yaml"
    path.write_text(text)
    return load_config(path)


def test_max_model_len_above_the_context_is_refused_at_its_line(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, max_position_embeddings=2048)
    text = f"policy:\n  model: {folder}\n  max_model_len: 4096\n"
    path, error = refusal(tmp_path, text)
    assert error == (
        f"{path}:3: policy.max_model_len: max_model_len 4096 is above the model's context of "
        f"2048 tokens (max_position_embeddings in {folder}/config.json); set max_model_len to "
        "at most 2048"
    )
    assert load_config_text(tmp_path, text.replace("4096", "2048")).policy.max_model_len == 2048


def test_the_tiny_models_context_is_known_without_building_it(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "policy:\n  model: tiny\n  max_model_len: 1025\n")
    assert error == (
        f"{path}:3: policy.max_model_len: max_model_len 1025 is above the model's context of "
        "1024 tokens (the tiny model's max_position_embeddings); set max_model_len to at most 1024"
    )


@pytest.mark.parametrize(
    ("config", "context"),
    [
        ({"max_position_embeddings": 4096}, 4096),
        ({"n_positions": 1024}, 1024),  # GPT-2
        ({"max_position_embeddings": 8192, "seq_length": 4096}, 4096),  # the smallest
        ({"text_config": {"max_position_embeddings": 2048}, "max_position_embeddings": 99}, 2048),
        ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}},
         8192),
        ({"max_position_embeddings": 32768, "rope_scaling": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}}, 32768),
        ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3",
                                                               "factor": 8.0}}, 131072),
        ({"hidden_size": 8}, None),  # not written: not checked
    ],
)  # fmt: skip
def test_context_length_is_read_as_vllm_reads_it(config: dict, context: int | None) -> None:
    from flows.model_checks import context_length

    found = context_length(config)
    assert (found[0] if found else None) == context


def test_vllms_long_context_switch_lets_max_model_len_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = model_dir(tmp_path, max_position_embeddings=512)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert load_config_text(tmp_path, f"policy:\n  model: {folder}\n").policy.max_model_len == 1024


def test_a_cached_hub_models_context_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / "models--org--small" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"max_position_embeddings": 512}')
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path, error = refusal(tmp_path, "policy:\n  model: org/small\n")
    assert error.startswith(
        f"{path}:2: policy.model: max_model_len 1024 (the default) is above the model's "
        f"context of 512 tokens (max_position_embeddings in {snapshot}/config.json)"
    )


# --- A judge that must read the labels A and B ----------------------------------------------


def word_level_judge(tmp_path: Path, words: list[str]) -> Path:
    """A model folder whose tokenizer knows only ``words`` (split at spaces)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = model_dir(tmp_path, "judge")
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("mode", ["logprob", "cot", "ensemble"])
def test_a_judge_whose_tokenizer_merges_the_label_is_refused(tmp_path: Path, mode: str) -> None:
    folder = word_level_judge(tmp_path, ["The", "answer", "is", "(", "Therefore,", "the"])
    path, error = refusal(tmp_path, f"judge:\n  mode: {mode}\npolicy:\n  model: {folder}\n")
    assert error.startswith(
        f"{path}:4: policy.model: judge mode '{mode}' reads the option labels A and B as one "
        f"token each, and '{folder}' cannot give them: the judge's tokenizer merges option "
        "label 'A' with the text before it"
    )
    assert error.endswith("(judge modes contrast and likelihood read no labels)")
    assert "\n" not in error


@pytest.mark.parametrize("mode", ["contrast", "likelihood"])
def test_a_mode_without_labels_does_not_read_the_judges_tokenizer(
    tmp_path: Path, mode: str
) -> None:
    folder = model_dir(tmp_path, "judge")  # no tokenizer at all
    text = f"judge:\n  mode: {mode}\njudge_model:\n  model: {folder}\n"
    assert load_config_text(tmp_path, text).judge.mode == mode


def test_a_judge_whose_tokenizer_does_not_load_is_refused(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "judge")
    (folder / "tokenizer.json").write_text("not json")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    path, error = refusal(tmp_path, f"judge:\n  mode: logprob\njudge_model:\n  model: {folder}\n")
    assert error.startswith(f"{path}:4: judge_model.model: judge mode 'logprob' reads the option ")
    assert "its tokenizer does not load (" in error and "\n" not in error


def test_placement_settings_are_checked_and_left_out_of_run_ids(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "policy:\n  model: tiny\n  data_parallel_size: 2\n")
    assert error.startswith(f"{path}:3: policy.data_parallel_size: data_parallel_size > 1")
    path, error = refusal(
        tmp_path,
        "policy:\n  backend: openai\n  base_url: http://127.0.0.1:1/v1\n  ray: {actors: 2}\n",
    )
    assert "ray runs vLLM engines" in error
    plain = load_config_text(tmp_path, "policy:\n  model: tiny\n")
    placed = load_config_text(
        tmp_path, "policy:\n  model: tiny\n  ray: {actors: 4}\n  tensor_parallel_size: 2\n"
    )
    assert placed.policy.ray is not None and placed.policy.ray.actors == 4
    assert placed.identity() == plain.identity()
    one = "policy:\n  backend: openai\n  model: m\n  base_url: http://127.0.0.1:1/v1\n"
    pool = "policy:\n  backend: openai\n  model: m\n  base_url: [http://a:1/v1, http://b:1/v1]\n"
    other_pool = "policy:\n  backend: openai\n  model: m\n  base_url: [http://c:1/v1]\n"
    pooled = load_config_text(tmp_path, pool)
    assert pooled.identity() == load_config_text(tmp_path, other_pool).identity()
    assert pooled.identity() != load_config_text(tmp_path, one).identity()
