"""The Responses API's routes on a kept response: DELETE /v1/responses/{id}, GET .../input_items and POST
.../cancel (POST /v1/responses and GET /v1/responses/{id} sit with the other routes in openai_api.py). Without
these the SDK's `responses.delete` met a 405, and `input_items.list` and `cancel` a bare 404, as if the API had
no such calls."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from meshserve.errors import MeshserveError
from meshserve.serve.errors import error_payload
from meshserve.serve.responses_protocol import InputItemList, ResponseDeleted, ResponseObject
from meshserve.serve.serving_responses import ResponsesService


def _error(exc: MeshserveError) -> JSONResponse:
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def add_response_routes(app: FastAPI, responses: ResponsesService, errors: dict) -> None:
    """Register the routes; `errors`: the OpenAPI error responses they document."""

    @app.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=errors)
    async def delete_response(response_id: str):
        try:
            return responses.delete(response_id)
        except MeshserveError as e:
            return _error(e)

    @app.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, responses=errors)
    async def cancel_response(response_id: str):
        try:
            return responses.cancel(response_id)
        except MeshserveError as e:
            return _error(e)

    @app.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=errors)
    async def list_input_items(response_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                               order: Literal["asc", "desc"] = "desc"):
        try:
            return responses.input_items(response_id, after, limit, order)
        except MeshserveError as e:
            return _error(e)
