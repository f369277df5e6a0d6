"""DiskTier: round trip, damaged files read as misses, the byte bound, and the index rebuilt at a restart."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from meshserve.engine.kv_offload.disk_tier import HEADER, DiskTier
from meshserve.errors import InvalidArgumentError

BLOCK = 64
FP = bytes(range(16))


def payload(i: int) -> bytes:
    return bytes((i * 7 + j) % 256 for j in range(BLOCK))


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def put(disk: DiskTier, i: int) -> None:
    assert disk.put(h(i), payload(i))


def test_round_trip_from_memory_then_from_file(tmp_path):
    disk = DiskTier(str(tmp_path), FP, 10 * (HEADER.size + BLOCK), BLOCK)
    put(disk, 1)
    assert disk.get(h(1)) == (payload(1), zlib.crc32(payload(1)))  # maybe still pending: served from memory
    disk.flush()
    assert os.path.getsize(disk.path(h(1))) == HEADER.size + BLOCK
    assert disk.get(h(1))[0] == payload(1)  # now from the file
    assert disk.get(h(2)) is None
    disk.close()


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted", "foreign"])
def test_damaged_file_is_a_miss_and_is_dropped(tmp_path, damage):
    disk = DiskTier(str(tmp_path), FP, 10 * (HEADER.size + BLOCK), BLOCK)
    put(disk, 1)
    disk.flush()
    path = disk.path(h(1))
    data = Path(path).read_bytes()
    if damage == "missing":
        os.remove(path)
    elif damage == "truncated":
        Path(path).write_bytes(data[:-5])
    elif damage == "corrupted":
        Path(path).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:  # another model's file under this name: its header carries another fingerprint
        Path(path).write_bytes(data[:12] + bytes(16) + data[28:])
    assert disk.get(h(1)) is None
    assert h(1) not in disk and disk.used_bytes == 0
    assert disk.num_errors == 1
    disk.flush()
    assert not os.path.exists(path)
    disk.close()


def test_byte_bound_evicts_least_recently_used(tmp_path):
    file_bytes = HEADER.size + BLOCK
    disk = DiskTier(str(tmp_path), FP, 3 * file_bytes, BLOCK)
    for i in range(3):
        put(disk, i)
    disk.flush()
    assert disk.get(h(0)) is not None  # 0 is now the most recent; 1 goes first
    put(disk, 3)
    disk.flush()
    assert set(disk.index) == {h(0), h(2), h(3)}
    assert disk.used_bytes == 3 * file_bytes
    assert sorted(os.listdir(disk.dir)) == sorted(os.path.basename(disk.path(h(i))) for i in (0, 2, 3))
    disk.close()


def test_restart_rebuilds_the_index_and_skips_bad_or_foreign_files(tmp_path):
    disk = DiskTier(str(tmp_path), FP, 10 * (HEADER.size + BLOCK), BLOCK)
    for i in range(4):
        put(disk, i)
    disk.close()
    with open(disk.path(h(2)), "r+b") as f:  # truncated by a crash
        f.truncate(HEADER.size + 3)
    Path(os.path.join(disk.dir, "junk.kv.tmp")).write_bytes(b"x")
    again = DiskTier(str(tmp_path), FP, 10 * (HEADER.size + BLOCK), BLOCK)
    assert set(again.index) == {h(0), h(1), h(3)}
    assert again.get(h(3))[0] == payload(3)
    assert again.num_errors == 1
    assert not any(name.endswith(".tmp") for name in os.listdir(again.dir))
    # another model (fingerprint) sees none of them, and a smaller bound keeps only the newest
    other = DiskTier(str(tmp_path), bytes(16), 10 * (HEADER.size + BLOCK), BLOCK)
    assert len(other) == 0 and other.get(h(0)) is None
    again.close()
    small = DiskTier(str(tmp_path), FP, 2 * (HEADER.size + BLOCK), BLOCK)
    assert len(small) == 2 and small.used_bytes <= 2 * (HEADER.size + BLOCK)
    small.close()
    other.close()


def test_read_many_reads_in_parallel_into_given_buffers(tmp_path):
    import numpy as np

    disk = DiskTier(str(tmp_path), FP, 10 * (HEADER.size + BLOCK), BLOCK)
    for i in range(4):
        put(disk, i)
    disk.flush()
    with open(disk.path(h(2)), "r+b") as f:  # one corrupted payload byte
        f.seek(HEADER.size + 1)
        f.write(bytes([payload(2)[1] ^ 0x80]))
    outs = [np.zeros(BLOCK, dtype=np.uint8) for _ in range(5)]
    crcs = disk.read_many([(h(i), outs[i]) for i in range(5)])
    assert crcs[:2] == [zlib.crc32(payload(0)), zlib.crc32(payload(1))] and crcs[3] == zlib.crc32(payload(3))
    assert crcs[2] is None and crcs[4] is None  # corrupted, and absent
    assert [outs[i].tobytes() for i in (0, 1, 3)] == [payload(i) for i in (0, 1, 3)]
    disk.close()


def test_a_folder_that_cannot_be_made_is_one_error_naming_the_flag(tmp_path):
    """It used to surface from the engine process as a bare '[Errno 20] Not a directory' line."""
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="--kv-offloading-disk-path .*a_file/sub: cannot create"):
        DiskTier(str(a_file / "sub"), FP, 10 * (HEADER.size + BLOCK), BLOCK)
