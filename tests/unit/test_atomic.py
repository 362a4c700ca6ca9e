"""alignment/atomic.py: the target is the old one or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment import atomic


def test_write_text_replaces_a_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "result.json"
    assert atomic.write_text(path, "one") == path
    atomic.write_text(path, "two →")
    assert path.read_text(encoding="utf-8") == "two →"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


@pytest.mark.parametrize("old_is_folder", [True, False])
def test_a_folder_replaces_a_folder_or_a_file(tmp_path: Path, old_is_folder: bool) -> None:
    target = tmp_path / "model"
    if old_is_folder:
        target.mkdir()
        (target / "old.bin").write_text("old")
    else:
        target.write_text("old")
    with atomic.replacing(target) as staging:
        staging.mkdir()
        (staging / "new.bin").write_text("new")
        assert not (target / "new.bin").exists()  # nothing shows before the block ends
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in target.iterdir()] == ["new.bin"]


@pytest.mark.parametrize("folder", [False, True])
def test_a_failed_block_leaves_the_target_and_no_temp(tmp_path: Path, folder: bool) -> None:
    target = tmp_path / "out"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        if folder:
            tmp.mkdir()
            (tmp / "half").write_text("half")
        else:
            tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
