"""The fast chunk encoder writes the same bytes as the pydantic models, for any text."""

import json

import pytest

from meshserve.serve.chunk_encoding import ChunkEncoder
from meshserve.serve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
)
from meshserve.serve.serving_chat import _chunk_event
from meshserve.serve.streaming import sse_event

TEXTS = ["", "hello", ' "quoted" \\ back', "tab\tnew\nline\r\x00\x1f\x7f", "日本語 ✓ 🙂", "split\u2028here\u2029and\x85",
         "</script>", "\ud7ff\ue000"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("finish", "stop"), [(None, None), ("stop", 7), ("stop", "END\n"), ("length", None)])
def test_completion_chunk_bytes_match_pydantic(text, finish, stop):
    fast = ChunkEncoder("cmpl-1", "m\u2028odel", "text_completion", created=123)
    slow = sse_event(CompletionChunk(id="cmpl-1", model="m\u2028odel", created=123, choices=[
        CompletionChoice(index=3, text=text, finish_reason=finish, stop_reason=stop)]))
    assert fast.completion(3, text, finish, stop) == slow.encode()


@pytest.mark.parametrize("text", [*TEXTS, None])
@pytest.mark.parametrize(("finish", "stop"), [(None, None), ("stop", 2), ("length", None)])
@pytest.mark.parametrize("token_ids", [None, [], [5, 1017]])  # return_token_ids: the delta's ids
def test_chat_chunk_bytes_match_pydantic(text, finish, stop, token_ids):
    fast = ChunkEncoder("chatcmpl-1", "tiny", "chat.completion.chunk", created=5)
    slow = _chunk_event(ChatCompletionChunk(id="chatcmpl-1", model="tiny", created=5, choices=[
        ChatChunkChoice(index=0, delta=ChatDelta(content=text), finish_reason=finish, stop_reason=stop,
                        token_ids=token_ids)]))
    got = fast.chat(0, text, finish, stop, token_ids)
    assert got == slow.encode()
    assert got.endswith(b"\n\n") and got.count(b"\n") == 2  # one event: no raw line break inside
    json.loads(got[len(b"data: "):])
