"""router/disagg.py's decode leg: the prefill's answer names the producer's held blocks, and the decode leg's
kv_transfer_params carry them (a one-sided connector then reads beside the grant's round trip)."""

from __future__ import annotations

import json

from meshserve.router.disagg import decode_body, decode_params

PLAIN = {"do_remote_prefill": True, "transfer_id": "t"}


def _answer(params) -> bytes:
    return json.dumps({"id": "cmpl-1", "choices": [], "kv_transfer_params": params}).encode()


def test_the_prefills_handle_goes_to_the_decode_leg():
    got = decode_params("t", _answer({"transfer_id": "t", "remote_rank": 0, "remote_block_ids": [5, 2]}))
    assert got == {**PLAIN, "remote_rank": 0, "remote_block_ids": [5, 2]}
    assert json.loads(decode_body({"prompt": "x"}, got)) == {"prompt": "x", "kv_transfer_params": got}


def test_answers_without_a_handle_for_this_transfer_leave_the_pull_to_ask():
    for answer in (b"", b"not json", b"[1, 2]", json.dumps({"id": "x"}).encode(), _answer(None),
                   _answer({"transfer_id": "other", "remote_rank": 0, "remote_block_ids": [1]}),
                   _answer({"transfer_id": "t", "remote_rank": 0}),
                   _answer({"transfer_id": "t", "remote_block_ids": [1]}),  # (no rank: the decode leg would refuse)
                   _answer({"transfer_id": "t", "remote_rank": "0", "remote_block_ids": [1]})):
        assert decode_params("t", answer) == PLAIN, answer


def test_a_prefill_answer_carries_the_handle_and_others_a_null():
    from meshserve.serve.protocol import ChatCompletionResponse, CompletionResponse

    handle = {"transfer_id": "t", "remote_rank": 0, "remote_block_ids": [5, 2]}
    for model in (CompletionResponse, ChatCompletionResponse):
        with_handle = json.loads(model(id="x", model="m", choices=[], kv_transfer_params=handle).model_dump_json())
        assert with_handle["kv_transfer_params"] == handle
        assert json.loads(model(id="x", model="m", choices=[]).model_dump_json())["kv_transfer_params"] is None
