"""Atomic directory writes: complete or absent."""

import os

import pytest

from hsd.checkpoint import TEMP_PREFIX, atomic_directory, is_temporary, remove_stale_temporaries


def test_publishes_a_complete_directory(tmp_path):
    target = tmp_path / "out" / "checkpoint-1"
    with atomic_directory(target) as tmp:
        assert is_temporary(tmp) and tmp.parent == target.parent
        (tmp / "a.txt").write_text("x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\0" * 10)
        assert not target.exists()  # nothing visible while writing
    assert (target / "a.txt").read_text() == "x" and (target / "sub" / "b.bin").stat().st_size == 10
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint-1"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_write_leaves_nothing(tmp_path, exc):
    target = tmp_path / "checkpoint-2"
    with pytest.raises(exc):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_bytes(b"1")
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_directory(target) as tmp:
            pass
    with pytest.raises(ValueError):  # a failed overwrite keeps the old directory
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "v").write_text("broken")
            raise ValueError
    assert (target / "v").read_text() == "1"
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / f"{TEMP_PREFIX}checkpoint-3-abcd").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [f"{TEMP_PREFIX}checkpoint-3-abcd"]
    assert os.listdir(tmp_path) == ["checkpoint-2"]
