"""The disk tier: one file per KV block under DIR/<fingerprint>/, least recently used evicted past a byte bound.

A file is a fixed header (magic, version, the fingerprint of the model and KV layout, the block hash, the
payload length and its crc32) and the block's bytes. A file that is missing, truncated, corrupted or of
another model reads as a miss (and is deleted), never as a block. The index is rebuilt from the headers at
start (oldest modification first), so a restarted server keeps its prefixes.

Writes and deletions run on background writer threads, so the step loop never waits on the disk for a spill;
a block's writes, deletions and touches all go to the one thread its hash picks, so they stay in order. A block
still being written is served from memory. Files appear atomically (written then renamed). Reads for a restore
run on a pool of reader threads, straight into the CPU tier's slots, one preadv call per file (header and
payload together): a reader holds the GIL only between system calls, so a busy engine thread slows it little.
Each batch of reads is timed (read_rate.py): the manager restores from disk only when reading is predicted
faster than recomputing.

At start the folder is made if missing, a file is written in it to prove it can be (a read-only file system, or
no permission, is one error line naming the flag), and the bound is checked against the file system's free space
(disk_space.py: a tier that cannot fit is refused, a margin kept). A write that fails during the run (ENOSPC: the
disk filled up under another program; EIO, EROFS) loses nothing: the block is simply not kept on disk (dropped from
the index at the next `reap`, its loss told through on_evict, so a GPU copy is stored again), one warning is logged
and the failures are counted (num_errors). After ENOSPC the bound shrinks to what the tier holds, so it goes on
as an LRU of that size rather than failing every write.

Files are never read across models: each model and KV layout (the fingerprint, setup.py) has its own folder, and
every header carries the fingerprint. A graceful shutdown keeps the files for the next start; a killed process
leaves at most `.tmp` files (writes are renamed into place), deleted at the next start.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from meshserve.engine.kv_offload.disk_space import block_folders_bytes, check_disk_room
from meshserve.engine.kv_offload.read_rate import ReadRate
from meshserve.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

MAGIC = b"MSKVBLK1"
VERSION = 1
HEADER = struct.Struct("<8sI16s16sQI")  # magic, version, fingerprint, block hash, payload bytes, crc32
SUFFIX = ".kv"
WRITERS = 4  # writer threads (page-cache writes of MiB-sized blocks: one thread tops out near 1 GB/s)


class DiskTier:
    """Block files of one model and KV layout (the fingerprint), bounded to max_bytes."""

    def __init__(self, root: str, fingerprint: bytes, max_bytes: int, block_bytes: int,
                 read_rate: ReadRate | None = None, clock: Callable[[], float] = time.perf_counter):
        if len(fingerprint) != 16:
            raise ValueError("the fingerprint must be 16 bytes")
        self.fingerprint = fingerprint
        self.dir = os.path.join(root, fingerprint.hex())
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:  # a read-only or special file system: one line naming the flag, in any process
            raise InvalidArgumentError(f"--kv-offloading-disk-path {root}: cannot create {self.dir}: "
                                       f"{e.strerror or e}", param="kv_offloading_disk_path") from None
        _probe_write(root, self.dir)
        self.root = root
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        self.file_bytes = HEADER.size + block_bytes
        self.index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file bytes, least recently used first
        self.used_bytes = 0
        self.num_errors = 0  # files found truncated, corrupted or foreign (each read as a miss), or not written
        self.num_write_errors = 0  # writes that failed (the block not kept; num_errors counts them once reaped)
        self._failed: list[tuple[bytes, int | None]] = []  # (hash, errno) of failed writes, for `reap`
        self._warned_write = self._warned_full = False
        self.on_evict: Callable[[bytes], None] | None = None  # told the hash of each block the size bound drops
        self._pending: dict[bytes, bytes] = {}  # being written: served from here meanwhile
        self._lock = threading.Lock()
        # writers: one thread per shard of the hashes (a block's operations stay in order on its thread)
        self._io = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"meshserve-kv-disk{i}")
                    for i in range(WRITERS)]
        # restores read many files at once: zlib's crc32 and file reads release the GIL
        self.num_readers = min(8, os.cpu_count() or 1)
        self._readers = ThreadPoolExecutor(max_workers=self.num_readers,
                                           thread_name_prefix="meshserve-kv-read")
        # what a batch of reads achieves (read_batches measures it): the manager restores only when reading pays
        self.read_rate = read_rate or ReadRate()
        self.clock = clock
        self._rebuild()

    def path(self, block_hash: bytes) -> str:
        return os.path.join(self.dir, block_hash.hex() + SUFFIX)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.index

    def __len__(self) -> int:
        return len(self.index)

    # -- start -----------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Index the files a previous run left (headers only: the payload is checked when read)."""
        found = []
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if not name.endswith(SUFFIX):
                if name.endswith(".tmp"):  # a write cut short by a crash
                    _remove(path)
                continue
            try:
                block_hash = bytes.fromhex(name[: -len(SUFFIX)])
                with open(path, "rb") as f:
                    header = f.read(HEADER.size)
                st = os.stat(path)
            except (ValueError, OSError):
                continue
            if self._header_ok(header, block_hash) and st.st_size == self.file_bytes:
                found.append((st.st_mtime, block_hash))
            else:
                self.num_errors += 1
                _remove(path)
        for _, block_hash in sorted(found):
            self.index[block_hash] = self.file_bytes
            self.used_bytes += self.file_bytes
        # the room check, now that this tier's own files are known (they count as room: the bound covers them)
        check_disk_room(self.root, self.max_bytes / 2**30, self.used_bytes,
                        block_folders_bytes(self.root, skip=self.fingerprint.hex()))
        self._evict_to(self.max_bytes)
        if self.index:
            logger.info("KV disk tier: %d blocks (%.2f GiB) kept from a previous run in %s", len(self.index),
                        self.used_bytes / 2**30, self.dir)

    def _header_ok(self, header: bytes, block_hash: bytes) -> bool:
        if len(header) != HEADER.size:
            return False
        magic, version, fingerprint, h, length, _ = HEADER.unpack(header)
        return (magic == MAGIC and version == VERSION and fingerprint == self.fingerprint and h == block_hash
                and length == self.block_bytes)

    # -- blocks ----------------------------------------------------------------------------------
    def put(self, block_hash: bytes, payload) -> Future | None:
        """Keep a block (checksummed and written in the background): the future of its write, or None when it
        can never fit or is already here. payload (bytes, or a uint8 array the caller keeps unchanged until
        the future is done) is read by the writer thread."""
        if block_hash in self.index:
            self.index.move_to_end(block_hash)
            return None
        if self.file_bytes > self.max_bytes or len(payload) != self.block_bytes:
            return None
        self._evict_to(self.max_bytes - self.file_bytes)
        self.index[block_hash] = self.file_bytes
        self.used_bytes += self.file_bytes
        with self._lock:
            self._pending[block_hash] = payload
        return self._submit(block_hash, self._write, block_hash, payload)

    def read_into(self, block_hash: bytes, out: np.ndarray) -> int | None:
        """Read the block into out (uint8, block_bytes) and return its crc32, or None when its file is missing,
        truncated, corrupted or foreign (out then holds garbage). Touches no index: safe on reader threads
        (the caller reports the outcome with `record_read`)."""
        with self._lock:
            pending = self._pending.get(block_hash)
        if pending is not None:
            out[:] = np.frombuffer(pending, dtype=np.uint8)
            return zlib.crc32(out)
        header = bytearray(HEADER.size)
        try:
            fd = os.open(self.path(block_hash), os.O_RDONLY)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != self.file_bytes:  # truncated, or longer than its header says
                return None
            if os.preadv(fd, [header, out], 0) != self.file_bytes:
                return None
        except OSError:
            return None
        finally:
            os.close(fd)
        if not self._header_ok(bytes(header), block_hash):
            return None
        crc = HEADER.unpack(header)[5]
        return crc if zlib.crc32(out) == crc else None

    def read_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[int | None]:
        """read_into for several blocks at once, on the reader threads (file reads and crc32 run in parallel)."""
        if len(items) <= 1:
            return [self.read_into(h, out) for h, out in items]
        return list(self._readers.map(lambda item: self.read_into(*item), items))

    def read_batches(self, items: list[tuple[bytes, np.ndarray]]) -> list[tuple[range, Future]]:
        """read_into for many blocks on the reader threads, split into one task per thread (each reads its part
        in order): (the items' indices, a future of their crcs) per part. The engine loop waits on a few
        futures, not one per block. The batch's bytes over the wall time from its first read's start to its
        last one's end update read_rate."""
        n = len(items)
        parts = min(n, self.num_readers)
        bounds = [n * k // parts for k in range(parts + 1)]
        timing = _BatchTiming(parts, n * self.file_bytes, self.read_rate)
        out = []
        for a, b in zip(bounds, bounds[1:]):
            out.append((range(a, b), self._readers.submit(self._read_part, items[a:b], timing)))
        return out

    def measure(self, n: int) -> list[Future]:
        """Read up to n of the newest written blocks into scratch buffers on the reader threads, only so that
        read_rate is measured before the first restore asks it (blocks still being written are served from
        memory: they would measure nothing). The futures of the reads ([] when no block is written yet)."""
        with self._lock:
            pending = set(self._pending)
        hashes = [h for h in reversed(self.index) if h not in pending][:n]
        items = [(h, np.empty(self.block_bytes, dtype=np.uint8)) for h in hashes]
        return [future for _, future in self.read_batches(items)] if items else []

    def _read_part(self, part: list[tuple[bytes, np.ndarray]], timing: _BatchTiming) -> list[int | None]:
        start = self.clock()
        try:
            return [self.read_into(*it) for it in part]
        finally:
            timing.part_done(start, self.clock())

    def read_async(self, block_hash: bytes, out: np.ndarray) -> Future:
        """read_into on a reader thread: the engine loop never waits on the file (the future gives the crc)."""
        return self._readers.submit(self.read_into, block_hash, out)

    def record_read(self, block_hash: bytes, ok: bool) -> None:
        """A read's outcome: a good block becomes the most recent, a bad file is dropped (a miss from now on)."""
        if ok:
            if block_hash in self.index:
                self.index.move_to_end(block_hash)
                self._submit(block_hash, _touch, self.path(block_hash))  # its age orders the next start's LRU
            return
        self.reap()
        if block_hash not in self.index:  # its write failed (counted, and said once, then), or dropped meanwhile
            return
        self.num_errors += 1
        logger.warning("KV disk tier: %s is missing or damaged; recomputing its block", self.path(block_hash))
        self.drop(block_hash)

    def get(self, block_hash: bytes) -> tuple[bytes, int] | None:
        """The block's verified bytes and crc32, or None (not here, or its file is bad: then it is dropped)."""
        if block_hash not in self.index:
            return None
        out = np.empty(self.block_bytes, dtype=np.uint8)
        crc = self.read_into(block_hash, out)
        self.record_read(block_hash, crc is not None)
        return None if crc is None else (out.tobytes(), crc)

    def drop(self, block_hash: bytes) -> None:
        size = self.index.pop(block_hash, None)
        if size is not None:
            self.used_bytes -= size
            self._submit(block_hash, _remove, self.path(block_hash))

    def _evict_to(self, limit: int) -> None:
        while self.index and self.used_bytes > limit:
            block_hash = next(iter(self.index))
            self.drop(block_hash)
            if self.on_evict is not None:
                self.on_evict(block_hash)

    def reap(self) -> None:
        """On the engine thread (each step): forget the blocks whose write failed (on_evict is told, like an
        eviction). After ENOSPC the bound becomes what the tier holds now: it stays an LRU of that size."""
        if not self._failed:
            return
        with self._lock:
            failed, self._failed = self._failed, []
        full = False
        for block_hash, err in failed:
            self.num_errors += 1
            full |= err in (errno.ENOSPC, errno.EDQUOT)
            size = self.index.pop(block_hash, None)
            if size is None:
                continue
            self.used_bytes -= size
            if self.on_evict is not None:
                self.on_evict(block_hash)
        if full and self.used_bytes < self.max_bytes:
            (logger.debug if self._warned_full else logger.warning)(
                "KV disk tier: %s is full; the tier now keeps at most %.2f GiB there (was %.2f GiB)",
                self.dir, self.used_bytes / 2**30, self.max_bytes / 2**30)
            self._warned_full = True
            self.max_bytes = self.used_bytes

    def _submit(self, block_hash: bytes, fn, *args) -> Future:
        return self._io[block_hash[0] % len(self._io)].submit(fn, *args)

    def flush(self) -> None:
        """Wait for every write and deletion queued so far."""
        for f in [io.submit(lambda: None) for io in self._io]:
            f.result()

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        for io in self._io:
            io.shutdown(wait=True)

    # -- the background thread -------------------------------------------------------------------
    def _write(self, block_hash: bytes, payload: bytes) -> None:
        path = self.path(block_hash)
        tmp = f"{path}.{os.getpid()}.tmp"  # engines sharing the folder never write one temporary file
        try:
            _write_file(tmp, HEADER.pack(MAGIC, VERSION, self.fingerprint, block_hash, len(payload),
                                         zlib.crc32(payload)), payload)
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only disk: the block is simply not kept (`reap` drops it)
            _remove(tmp)
            with self._lock:
                self._failed.append((block_hash, e.errno))
                self.num_write_errors += 1
                warn, self._warned_write = not self._warned_write, True
            if warn:  # once: a full disk fails every write after it
                logger.warning("KV disk tier: cannot write %s (%s); blocks that cannot be written are not kept "
                               "on disk (further failures are counted in kv_offload_disk_errors, not logged)",
                               path, e)
        finally:
            with self._lock:
                self._pending.pop(block_hash, None)


class _BatchTiming:
    """The span of one read batch's parts (on several threads): reported to rate once the last part ends."""

    def __init__(self, parts: int, nbytes: int, rate: ReadRate):
        self.left = parts
        self.nbytes = nbytes
        self.rate = rate
        self.start = float("inf")
        self.end = float("-inf")
        self._lock = threading.Lock()

    def part_done(self, start: float, end: float) -> None:
        with self._lock:
            self.start, self.end = min(self.start, start), max(self.end, end)
            self.left -= 1
            if self.left:
                return
        self.rate.update(self.nbytes, self.end - self.start)


def _write_file(path: str, header: bytes, payload) -> None:
    with open(path, "wb") as f:
        f.write(header)
        f.write(payload)


def _write_probe(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"\0")


def _probe_write(root: str, folder: str) -> None:
    """Write (then delete) a file in folder: one error line naming the flag when that fails, at start, rather
    than every block's write failing during the run (os.access says yes to root on a read-only file system)."""
    path = os.path.join(folder, f".probe.{os.getpid()}.tmp")  # (.tmp: a crash's leftover is deleted at start)
    try:
        _write_probe(path)
    except OSError as e:
        raise InvalidArgumentError(f"--kv-offloading-disk-path {root}: cannot write in {folder}: "
                                   f"{e.strerror or e}", param="kv_offloading_disk_path") from None
    _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
