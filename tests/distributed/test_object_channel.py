"""ObjectChannel: objects of any size cross between gloo ranks (broadcast and point to point), small ones in a
single operation each."""

from __future__ import annotations

import os
import pickle

import torch.distributed as dist

from meshserve.distributed import process_start
from meshserve.distributed.launch import free_port
from meshserve.distributed.object_channel import ObjectChannel
from tests.ranks import run_ranks

# inline part, a little under and over it, and several times it (the size travels in the fixed buffer)
SIZES = (0, 10, 120, 128, 129, 1000)


def _objects():
    return [("execute", ({"seq": list(range(n)), "blob": b"x" * (7 * n)},)) for n in SIZES] + [None]


def _run(rank: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        calls, tokens = (
            ObjectChannel(dist.group.WORLD, inline_bytes=1024),
            ObjectChannel(dist.new_group(), inline_bytes=1024),
        )
        ops = []
        original = dist.broadcast

        def counting(*args, **kwargs):
            ops.append(1)
            return original(*args, **kwargs)

        dist.broadcast = counting
        for obj in _objects():
            got = calls.broadcast(obj if rank == 0 else None)
            assert got == obj, (rank, got)
            if rank == 1:  # then back, point to point
                tokens.send(got, dst=0)
            else:
                assert tokens.recv(src=1) == obj
        dist.broadcast = original
        # one operation for each object within the inline bytes, two for each larger one
        pickled = [len(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)) for o in _objects()]
        assert len(ops) == sum(1 if n <= 1024 else 2 for n in pickled), (ops, pickled)
        assert any(n > 1024 for n in pickled) and any(n <= 1024 for n in pickled)
    except BaseException as e:
        errors.put(f"rank {rank}: {e!r}")
        raise
    finally:
        dist.destroy_process_group()


def test_objects_cross_whole_in_one_operation_when_small():
    # the ranks' own start method (a forkserver with torch imported once), not two spawned interpreters that
    # each imported torch: this was ~8 s of start-up for well under a second of exchange
    errors = process_start.context().Queue()
    port = free_port()
    codes = run_ranks(_run, lambda rank: (rank, port, errors))
    assert errors.empty(), errors.get()
    assert codes == [0, 0]
