"""The metadata handshake beside the KV transport: ZeroMQ messages encoded with msgspec.

A consumer asks a producer for a transfer (Pull: transfer id, its own kv rank, the prompt length it expects);
the producer answers (PullReply: found or why not, the first token, how many blocks follow) and then sends the
blocks over the transport; the consumer acknowledges (Ack) once they are in its cache, and only then does the
producer free them. Each instance binds one ROUTER socket; consumers talk to it through DEALER sockets.
"""

from __future__ import annotations

import msgspec


class Pull(msgspec.Struct, tag=True):
    transfer_id: str
    consumer_rank: int
    num_tokens: int  # the prompt length the consumer holds (must match the producer's)


class PullReply(msgspec.Struct, tag=True):
    transfer_id: str
    ok: bool
    reason: str = ""
    first_token: int = -1
    num_tokens: int = 0
    num_blocks: int = 0


class Ack(msgspec.Struct, tag=True):
    transfer_id: str
    ok: bool  # False: the consumer gave up (the producer frees the blocks all the same)


Message = Pull | PullReply | Ack

encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)
