"""The metadata handshake beside the KV transport: ZeroMQ messages encoded with msgspec.

A consumer asks a producer for a transfer (Pull: transfer id, its own kv rank, the prompt length it expects);
the producer answers (PullReply: found or why not, the first token, how many blocks follow) and then sends the
blocks over the transport (a one-sided transport, NIXL: the reply names the producer's blocks and the consumer
reads them itself); the consumer acknowledges (Ack) once they are in its cache, and only then does the
producer free them. Each instance binds one ROUTER socket; consumers talk to it through DEALER sockets.
Layer-wise (layerwise.py): a Pull with layerwise set subscribes instead; the producer's sender thread then
pushes LayerSent headers (each before its tensor on the transport) and a final StreamDone to the consumer's
PULL socket, as the prefill's layers finish. Over a one-sided transport (NIXL) no tensor follows: each
LayerSent names the producer's blocks of that layer, which the consumer reads itself, and its final Ack says
when its reads ran (the producer's overlap metric).
"""

from __future__ import annotations

import msgspec


class Pull(msgspec.Struct, tag=True):
    transfer_id: str
    consumer_rank: int
    num_tokens: int  # the prompt length the consumer holds (must match the producer's)
    # layer-wise (layerwise.py): no PullReply; the producer streams LayerSent/StreamDone as layers are done
    layerwise: bool = False


class PullReply(msgspec.Struct, tag=True):
    transfer_id: str
    ok: bool
    reason: str = ""
    first_token: int = -1
    num_tokens: int = 0
    num_blocks: int = 0
    # a one-sided transport (NIXL): the producer's block ids, which the consumer reads from directly
    block_ids: list[int] = []


class Ack(msgspec.Struct, tag=True):
    transfer_id: str
    ok: bool  # False: the consumer gave up (the producer frees the blocks all the same)
    # one-sided layer-wise: when the consumer's reads began and ended, in seconds after it took the stream's
    # first LayerSent (durations: the producer maps them onto its own clock from when it sent that header)
    read_span: list[float] = []


class LayerSent(msgspec.Struct, tag=True):
    """Producer -> consumer stream socket: the transport's next tensor holds blocks [start, start + count) of
    the request's block table, of one layer (gather_layer's layout)."""

    transfer_id: str
    layer: int
    start: int
    count: int
    src: int  # the producer's kv rank (whose transport the tensor comes on)
    # one-sided (NIXL): no tensor follows; the producer's ids of those blocks, for the consumer to read
    block_ids: list[int] = []


class StreamDone(msgspec.Struct, tag=True):
    """Producer -> consumer: every layer of transfer_id was sent (ok) or never will be (not ok, reason)."""

    transfer_id: str
    ok: bool
    first_token: int = -1
    num_blocks: int = 0
    reason: str = ""
    src: int = -1


Message = Pull | PullReply | Ack | LayerSent | StreamDone

encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)
