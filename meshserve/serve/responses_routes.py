"""The Responses API's routes on a kept response: GET and DELETE /v1/responses/{id}, GET .../input_items and POST
.../cancel (POST /v1/responses sits with the other generation routes in openai_api.py). Without the last three
the SDK's `responses.delete` met a 405, and `input_items.list` and `cancel` a bare 404, as if the API had no such
calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from meshserve.errors import MeshserveError
from meshserve.serve.errors import error_payload
from meshserve.serve.responses_protocol import InputItemList, ResponseDeleted, ResponseObject
from meshserve.serve.serving_responses import ResponsesService


def _answer(call: Callable[..., Any], *args: Any) -> Any:
    """call(*args), or its error as OpenAI's JSON here (the app's catch-all handler would also log a traceback)."""
    try:
        return call(*args)
    except MeshserveError as e:
        status, body, headers = error_payload(e)
        return JSONResponse(body, status_code=status, headers=headers)


def add_response_routes(app: FastAPI, responses: ResponsesService, errors: dict) -> None:
    """Register the routes; `errors`: the OpenAPI error responses they document."""

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=errors)
    async def retrieve_response(response_id: str):
        return _answer(responses.retrieve, response_id)

    @app.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=errors)
    async def delete_response(response_id: str):
        return _answer(responses.delete, response_id)

    @app.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, responses=errors)
    async def cancel_response(response_id: str):
        return _answer(responses.cancel, response_id)

    @app.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=errors)
    async def list_input_items(response_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                               order: Literal["asc", "desc"] = "desc"):
        return _answer(responses.input_items, response_id, after, limit, order)
