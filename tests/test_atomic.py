"""Writers never leave half-written outputs and never lose an existing result silently."""

from __future__ import annotations

import pytest

from morphomol.util.atomic import atomic_path


def test_file_is_renamed_only_on_success(tmp_path):
    target = tmp_path / "out" / "table.parquet"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"


def test_failure_leaves_previous_output_untouched(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_directory_store_replaced_whole(tmp_path):
    target = tmp_path / "tiles.zarr"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["zarr.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.zarr"]


def test_refuses_to_overwrite_when_asked(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("user data")
    with pytest.raises(FileExistsError):
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_text("other")
    assert target.read_text() == "user data"


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    """A SIGKILLed job leaves `.tiles.zarr.tmp-*`; the next write of that output removes it (and only it)."""
    target = tmp_path / "tiles.zarr"
    stale = tmp_path / ".tiles.zarr.tmp-0123abcd"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "c0").write_bytes(b"x" * 16384)
    old = tmp_path / ".tiles.zarr.old-89abcdef"
    old.mkdir()
    other = tmp_path / ".tokens.zarr.tmp-0123abcd"  # another output's temporary: not ours to remove
    other.mkdir()
    unrelated = tmp_path / ".tiles.zarr.tmp-notours"
    unrelated.mkdir()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert target.is_dir() and not stale.exists() and not old.exists()
    assert other.exists() and unrelated.exists()
