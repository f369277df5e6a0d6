"""Prefill/decode disaggregation through the router: the prefill leg of a request, and the decode leg's body.

As vLLM's disaggregated proxy does: the request goes first to a prefill instance (a kv_producer) with
max_tokens 1, not streamed, and kv_transfer_params {"do_remote_decode": true, "transfer_id": T}; that instance
runs the prompt and its first token and holds the KV blocks. Then the original request goes to a decode
instance (a kv_consumer) with {"do_remote_prefill": true, "transfer_id": T}, plus the producer's kv rank and
held block ids when the prefill's answer names them (its kv_transfer_params: a one-sided read then starts
beside the grant's round trip): it pulls the blocks, sends the first token and decodes, streamed or not, as an
ordinary OpenAI response. A prefill pool that cannot take the request (every instance down or refusing) means
colocated serving on the decode pool; a refused decode attempt is retried there colocated (the held blocks
expire on the producer).
"""

from __future__ import annotations

import json
import logging
import uuid

import httpx
from starlette.responses import Response

from meshserve.router.pool import ReplicaPool
from meshserve.router.upstream import Aborted, FastUpstream, HttpxUpstream

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/invocations")  # SageMaker's: chat or completions
_CLIENT_ERRORS = range(400, 500)


def wants_disaggregation(path: str, body: dict | None) -> bool:
    """Whether a request gains from a separate prefill: one prompt, one choice, more than one token."""
    if path not in GENERATION_PATHS or not isinstance(body, dict) or "kv_transfer_params" in body:
        return False
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    if body.get("max_tokens") == 1 or body.get("max_completion_tokens") == 1:
        return False  # the prefill is the whole request
    # a batch of prompts is several engine requests: one transfer handle would not do
    prompt = body.get("prompt")
    one_prompt = isinstance(prompt, str) or (
        isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
    )
    if path == "/invocations" and "messages" not in body:  # served as a completion (the replica tries chat first)
        path = "/v1/completions"
    return path != "/v1/completions" or one_prompt


def prefill_body(body: dict, transfer_id: str) -> bytes:
    """The prefill leg: one token, not streamed, the KV held for transfer_id."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    out.update(
        max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True, "transfer_id": transfer_id}
    )
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return json.dumps(out).encode()


def new_transfer_id() -> str:
    return f"xfer-{uuid.uuid4().hex}"


def decode_params(transfer_id: str, prefill_answer: bytes = b"") -> dict:
    """The decode leg's kv_transfer_params: the transfer id, and where the prefill's answer names them (its
    kv_transfer_params for the same transfer) the producer's kv rank and held block ids."""
    params: dict = {"do_remote_prefill": True, "transfer_id": transfer_id}
    try:
        handle = json.loads(prefill_answer).get("kv_transfer_params") if prefill_answer else None
    except (ValueError, AttributeError):  # (not JSON, or not an object: the pull asks the producers)
        handle = None
    if (isinstance(handle, dict) and handle.get("transfer_id") == transfer_id
            and isinstance(handle.get("remote_rank"), int) and isinstance(handle.get("remote_block_ids"), list)):
        params.update(remote_rank=handle["remote_rank"], remote_block_ids=handle["remote_block_ids"])
    return params


def decode_body(body: dict, params: dict) -> bytes:
    """The decode leg: the client's request, with the handle of the KV to pull (decode_params)."""
    return json.dumps({**body, "kv_transfer_params": params}).encode()


async def run_prefill(
    upstream: FastUpstream | HttpxUpstream,
    pool: ReplicaPool,
    path: str,
    body: dict,
    key: int | None,
    headers: list[tuple[str, str]],
    timeout: httpx.Timeout,
    max_attempts: int,
    transfer_id: str | None = None,
) -> dict | Response | None:
    """Run the prefill leg on the prefill pool: the decode leg's kv_transfer_params once an instance holds the KV
    (decode_params); the instance's
    own 4xx answer (the client's mistake: no other instance would do better); None when no prefill instance
    could (every one down, refusing or failing): the caller serves the request colocated; raises Aborted when
    the upstream's abort_all ends it (the router's drain timeout). transfer_id: the
    handle to use on every attempt (the concurrent decode leg already waits for it), else a new one each."""
    tried: set[str] = set()
    while len(tried) < max_attempts:
        replica = pool.route_prefill(key, tried)
        if replica is None:
            return None
        tried.add(replica.url)
        handle = transfer_id or new_transfer_id()
        replica.outstanding += 1
        replica.num_requests += 1
        try:
            resp = await upstream.send("POST", replica.url + path, prefill_body(body, handle), headers, timeout)
            try:
                content = await resp.aread()
            finally:
                await resp.aclose()
        except Aborted:
            raise  # the router's drain ran out of time: not the instance's fault, and no other instance
        except httpx.TransportError as e:
            replica.num_failed += 1
            replica.eject(f"prefill failed ({type(e).__name__})")
            logger.warning("prefill on %s failed: %s", replica.name, type(e).__name__)
            continue
        finally:
            replica.outstanding -= 1
        if resp.status_code == 200:
            replica.num_succeeded += 1
            return decode_params(handle, content)
        if resp.status_code in _CLIENT_ERRORS and resp.status_code != 429:
            return Response(content, resp.status_code, media_type="application/json")
        replica.num_failed += 1
        if resp.status_code >= 500:
            replica.eject(f"prefill answered {resp.status_code}")
        logger.warning("prefill on %s answered %d", replica.name, resp.status_code)
    return None


def is_transfer_failure(content: bytes) -> bool:
    """A decode instance's refusal because the KV did not arrive (not the instance's own ill health)."""
    return b"kv_transfer_failed" in content or b"KV transfer" in content
