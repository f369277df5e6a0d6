"""Python objects between ranks in one gloo operation each, where torch's *_object_list functions take two.

torch.distributed.broadcast_object_list (and send/recv_object_list) first send the pickled size, then the
bytes: two operations, each a round trip in which the sender waits for every receiver to have posted its
receive. Rank 0 sends every step to the other ranks this way, and the last pipeline stage sends every step's
tokens back, so each step paid two of these on both ends (on 2 x H200 under PP = 2, rank 0 spent ~0.95 ms
per step in the two broadcasts, of ~4.4 ms per step on its host).

Here the size travels in a fixed buffer together with the first INLINE_BYTES of the pickle, which holds a
whole step of the engine's usual size (a decode step of 256 sequences is ~20 KB once the workers hold the
sequences' params and block tables, engine/step_delta.py); a larger object sends the rest in a second
operation that both ends know to expect from the size. Both ends of a channel must use this class.
"""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

# bytes of an object sent in the first operation (the fixed buffer holds 8 more: the pickle's size)
INLINE_BYTES = 64 * 1024 - 8


class ObjectChannel:
    """Broadcasts from src to the group, or point-to-point messages, of picklable objects (see the module
    docstring). One per (group, direction): each holds its own fixed buffer, reused once an operation ends."""

    def __init__(self, group, inline_bytes: int = INLINE_BYTES):
        self.group = group
        self.inline_bytes = inline_bytes
        self._head = torch.zeros(8 + inline_bytes, dtype=torch.uint8)
        self._head_np = self._head.numpy()

    # -- framing ---------------------------------------------------------------------------------
    def _pack(self, obj) -> torch.Tensor | None:
        """obj's pickle into the fixed buffer; returns the part that does not fit (None when it all does)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(data)
        k = min(n, self.inline_bytes)
        self._head_np[:8] = np.frombuffer(n.to_bytes(8, "little"), dtype=np.uint8)
        self._head_np[8 : 8 + k] = np.frombuffer(data, dtype=np.uint8, count=k)
        if n == k:
            return None
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=k).copy())

    def _size(self) -> int:
        return int.from_bytes(self._head_np[:8].tobytes(), "little")

    def _unpack(self, n: int, rest: torch.Tensor | None):
        k = min(n, self.inline_bytes)
        head = self._head_np[8 : 8 + k]
        data = head.tobytes() if rest is None else head.tobytes() + rest.numpy().tobytes()
        return pickle.loads(data)

    def _transmit(self, obj, move) -> None:
        """The fixed buffer, then any rest of obj's pickle, each through move (dist.broadcast or dist.send)."""
        rest = self._pack(obj)
        move(self._head)
        if rest is not None:
            move(rest)

    def _receive(self, move):
        """The fixed buffer, then the rest its size calls for, each through move (dist.broadcast or dist.recv)."""
        move(self._head)
        n = self._size()
        rest = None
        if n > self.inline_bytes:
            rest = torch.empty(n - self.inline_bytes, dtype=torch.uint8)
            move(rest)
        return self._unpack(n, rest)

    # -- broadcast -------------------------------------------------------------------------------
    def broadcast(self, obj=None, src: int = 0):
        """On src: send obj to every rank of the group (returns it). Elsewhere: return what src sent."""
        move = partial(dist.broadcast, src=src, group=self.group)
        if dist.get_rank() == src:
            self._transmit(obj, move)
            return obj
        return self._receive(move)

    # -- point to point --------------------------------------------------------------------------
    def send(self, obj, dst: int) -> None:
        self._transmit(obj, partial(dist.send, dst=dst, group=self.group))

    def recv(self, src: int):
        return self._receive(partial(dist.recv, src=src, group=self.group))
