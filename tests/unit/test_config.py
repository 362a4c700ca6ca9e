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
MODEL_KEYS = "model, backend, base_url, max_model_len, kv_cache_gib, dtype, max_concurrency, name"


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
        f"{path}:5: unknown key 'lr' in sft (allowed: learning_rate, num_train_epochs, "
        "per_device_train_batch_size, max_length, completion_only_loss, use_lora, lora_r, "
        "lora_alpha, seed)"
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


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "store: s\nbogus: 1\n")
    assert error == f"{path}:2: unknown key 'bogus' at top level (allowed: {TOP_KEYS})"


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "seed: 1\nbatch_sise: 4\n")
    assert error == (
        f"{path}:2: unknown key 'batch_sise' at top level (allowed: {TOP_KEYS}); "
        "did you mean 'batch_size'?"
    )


def test_unknown_nested_key_lists_the_sections_keys(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "seed: 1\ngeneration:\n  n: 2\n  temprature: 1\n")
    assert error == (
        f"{path}:4: unknown key 'temprature' in generation "
        "(allowed: n, temperature, top_p, max_tokens); did you mean 'temperature'?"
    )


def test_unknown_key_in_optional_section(tmp_path: Path) -> None:
    # judge_model is `ModelConfig | None`: the allowed keys are still ModelConfig's.
    path, error = refusal(tmp_path, "judge_model:\n  modle: tiny\n")
    assert error == (
        f"{path}:2: unknown key 'modle' in judge_model (allowed: {MODEL_KEYS}); "
        "did you mean 'model'?"
    )


def test_wrong_type(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "seed: 1\nbatch_size: many\n")
    assert error == (
        f"{path}:2: batch_size: Input should be a valid integer, "
        "unable to parse string as an integer (got 'many')"
    )


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "generation: 3\npolicy: [tiny]\n")
    assert error == (
        f"{path}:1: generation: must be a mapping of settings, got 3\n"
        f"{path}:2: policy: must be a mapping of settings, got a list"
    )


def test_choice(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "judge:\n  mode: vibes\n")
    assert error == (
        f"{path}:2: judge.mode: Input should be 'logprob', 'cot', 'contrast', 'likelihood' "
        "or 'ensemble' (got 'vibes')"
    )


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
        f"{path}:3: policy.model: model '{model}' is not an embedded model (tiny, smollm2), an "
        f"existing folder (write ./{model} for one here), or a hub id (org/name){hint}"
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
