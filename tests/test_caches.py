"""Files kept between processes: where they live, and written whole or not at all."""

from __future__ import annotations

import pytest

from fmnas_jax.caches import cache_home, replacing, write_atomically


def test_the_cache_home_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_home() == tmp_path / "fmnas_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_home() == tmp_path / "home" / ".cache" / "fmnas_jax"


def test_a_file_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a" / "b" / "kept.bin"
    write_atomically(path, b"first")  # its folders made
    assert path.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="half-way"), replacing(path) as tmp:
        tmp.write_bytes(b"sec")
        raise RuntimeError("stopped half-way")
    assert path.read_bytes() == b"first"  # the old file untouched
    write_atomically(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["kept.bin"]  # no temporary file left either way


def test_a_folder_that_cannot_be_written_is_an_oserror_with_nothing_left(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        write_atomically(blocker / "kept.bin", b"x")
    assert blocker.read_text() == "not a folder"
