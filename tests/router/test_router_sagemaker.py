"""SageMaker's routes through the router: /ping answers as the router's /health, /invocations is proxied as a
generation route (streams relayed, prefix affinity, counted by the admission gate)."""

from __future__ import annotations

import json

import httpx
from fastapi import Request
from fastapi.responses import StreamingResponse

from meshserve.router.config import RouterConfig
from tests.router.conftest import Script

QUIET = {"health_interval_s": 60.0}


def _with_invocations(script: Script, srv) -> None:
    """The fake replica's /invocations: records the body, answers whole or streamed."""

    async def invocations(request: Request):
        body = await request.json()
        script.requests.append({"path": "/invocations", "body": body})
        if not body.get("stream"):
            return {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": script.name}}]}

        async def events():
            for i in range(3):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': str(i)}}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    srv.app.add_api_route("/invocations", invocations, methods=["POST"])


def test_ping_and_invocations_through_the_router(fake_replicas, router):
    ups = []
    for i in range(3):
        script, srv = fake_replicas(f"r{i}")
        _with_invocations(script, srv)
        ups.append((script, srv))
    r = router(RouterConfig(backends=[srv.base_url for _, srv in ups], policy="prefix-affinity", **QUIET))
    assert httpx.get(r.base_url + "/ping").status_code == 200 and httpx.post(r.base_url + "/ping").status_code == 200

    messages = [{"role": "user", "content": "hello"}]
    resp = httpx.post(r.base_url + "/invocations", json={"model": "tiny", "messages": messages},
                      headers={"Authorization": "Bearer k"})
    assert resp.status_code == 200 and resp.json()["object"] == "chat.completion"
    with httpx.stream("POST", r.base_url + "/invocations", timeout=10,
                      json={"model": "tiny", "messages": messages, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) == 4
    assert sum(len(script.requests) for script, _ in ups) == 2

    served: dict[int, set[str]] = {}  # prefix affinity keys an /invocations body as its /v1 route would
    for doc in range(6):
        for q in range(3):
            prompt = f"Document {doc}: " + "lorem ipsum " * 30 + f"question {q}"
            resp = httpx.post(r.base_url + "/invocations", json={"prompt": prompt})
            served.setdefault(doc, set()).add(resp.headers["x-meshserve-replica"])
    assert all(len(s) == 1 for s in served.values()) and len(set().union(*served.values())) >= 2
    assert "/invocations" in httpx.get(r.base_url + "/openapi.json").json()["paths"]
