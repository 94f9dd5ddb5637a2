"""``write_private_file``: atomic, owner-only, never writing through a link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_worker.core.files import write_private_file


def test_writes_bytes_or_text_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "secret.conf"
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        write_private_file(path, "token: abc\n")
    finally:
        os.umask(old)
    assert path.read_text() == "token: abc\n" and path.stat().st_mode & 0o777 == 0o600
    write_private_file(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"


def test_replaces_the_file_in_one_rename_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    path.write_text("old\n")
    path.chmod(0o644)
    reader = open(path)  # noqa: SIM115 - a reader that opened the old file keeps reading it whole
    try:
        write_private_file(path, "new\n")
        assert reader.read() == "old\n"
    finally:
        reader.close()
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["stack.json"]


def test_a_symlink_at_the_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    path = tmp_path / "nats.conf"
    path.symlink_to(victim)
    write_private_file(path, "token\n")
    assert victim.read_text() == "keep me\n"
    assert not path.is_symlink() and path.read_text() == "token\n"


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_private_file(tmp_path / "missing-dir" / "x", "data")
    path = tmp_path / "x"
    path.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        write_private_file(path, "data")
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and not any(path.iterdir())
