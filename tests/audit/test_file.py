from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from slurmproxy.audit.file import AuditFile, rotated_files


def line(writer: int, n: int, pad: int = 60) -> bytes:
    return json.dumps({"w": writer, "n": n, "pad": "x" * pad}).encode() + b"\n"


def all_lines(path: Path) -> list[dict[str, int]]:
    files = [*rotated_files(path), path]
    return [json.loads(text) for f in files for text in f.read_text().splitlines()]


def test_rotates_by_size_and_keeps_every_line_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = AuditFile(path, max_bytes=1000)
    sink.open()
    for n in range(100):
        sink.write(line(0, n))
    sink.close()
    rotated = rotated_files(path)
    assert len(rotated) >= 8
    assert [r["n"] for r in all_lines(path)] == list(range(100))
    assert all(f.stat().st_size <= 1000 for f in [*rotated, path])
    assert all(f.name.startswith("audit.log.") and f.name.endswith("Z") for f in rotated)


def test_a_line_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = AuditFile(path, max_bytes=100)
    sink.open()
    sink.write(line(0, 0, pad=10))
    sink.write(line(0, 1, pad=500))
    sink.write(line(0, 2, pad=10))
    sink.close()
    assert [r["n"] for r in all_lines(path)] == [0, 1, 2]
    assert len(rotated_files(path)) == 2


def test_keep_deletes_the_oldest_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = AuditFile(path, max_bytes=500, keep=2)
    sink.open()
    for n in range(60):
        sink.write(line(0, n))
    sink.close()
    assert len(rotated_files(path)) == 2
    numbers = [r["n"] for r in all_lines(path)]
    assert numbers == list(range(numbers[0], 60)) and numbers[0] > 0


def test_follows_a_file_renamed_by_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = AuditFile(path)
    sink.open()
    sink.write(line(0, 0))
    path.rename(tmp_path / "audit.log.1")
    sink.write(line(0, 1))
    sink.close()
    assert [json.loads(t)["n"] for t in (tmp_path / "audit.log.1").read_text().splitlines()] == [0]
    assert [json.loads(t)["n"] for t in path.read_text().splitlines()] == [1]


def test_rotated_files_lists_ours_and_logrotates_but_not_the_lock(tmp_path: Path) -> None:
    names = [
        "audit.log",
        "audit.log.lock",
        "audit.log.20261122T021724.484913Z",
        "audit.log.20261122T021724.484913Z-1",
        "audit.log.3.gz",
        "audit.log.2",
        "audit.log.bak",
        "other.log.1",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    assert [p.name for p in rotated_files(tmp_path / "audit.log")] == [
        "audit.log.2",
        "audit.log.20261122T021724.484913Z",
        "audit.log.20261122T021724.484913Z-1",
        "audit.log.3.gz",
    ]
    assert rotated_files(tmp_path / "missing" / "audit.log") == []


def test_write_before_open_fails(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not open"):
        AuditFile(tmp_path / "audit.log").write(b"x\n")


def _writer(path: str, writer: int, count: int, max_bytes: int) -> None:
    sink = AuditFile(Path(path), max_bytes=max_bytes)
    sink.open()
    for n in range(count):
        sink.write(line(writer, n, pad=(n * 37) % 200))
    sink.close()


@pytest.mark.parametrize("max_bytes", [pytest.param(4096, id="rotating"), pytest.param(0, id="not-rotating")])
def test_several_processes_write_every_line_exactly_once(tmp_path: Path, max_bytes: int) -> None:
    path = tmp_path / "audit.log"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(path), w, 400, max_bytes)) for w in range(4)]
    for proc in writers:
        proc.start()
    for proc in writers:
        proc.join(120)
        assert proc.exitcode == 0
    records = all_lines(path)  # every line parses: none was interleaved or torn
    assert sorted((r["w"], r["n"]) for r in records) == [(w, n) for w in range(4) for n in range(400)]
    for w in range(4):  # each writer's lines stay in order across the rotated files
        assert [r["n"] for r in records if r["w"] == w] == list(range(400))
    if max_bytes:
        assert len(rotated_files(path)) > 10
        assert all(os.path.getsize(f) <= max_bytes for f in [*rotated_files(path), path])


def test_a_pipe_is_written_but_never_rotated_or_locked(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        sink = AuditFile(fifo, max_bytes=10)
        sink.open()
        sink.write(line(0, 0))
        sink.write(line(0, 1))
        sink.close()
        received = os.read(reader, 65536)
    finally:
        os.close(reader)
    assert [json.loads(t)["n"] for t in received.splitlines()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.fifo"]


def test_has_room_reads_the_filesystem_of_the_open_file(tmp_path: Path) -> None:
    sink = AuditFile(tmp_path / "audit.log")
    assert not sink.has_room(1)  # not open
    sink.open()
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert sink.has_room(4096)
    assert not sink.has_room(free + (1 << 30))
    sink.close()
    assert not sink.has_room(1)
