"""POST /tokenize and /detokenize (vLLM's): the server's own tokenizer and chat template, without generating."""

from __future__ import annotations

from meshserve.errors import InvalidArgumentError
from meshserve.serve.config import ServeConfig
from meshserve.serve.engine_client import EngineClient
from meshserve.serve.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from meshserve.serve.serving_common import check_model, request_chat_template, server_defaults
from meshserve.serve.serving_chat import conversation_of


class TokenizeService:
    def __init__(self, client: EngineClient, config: ServeConfig):
        self.client = client
        self.config = config

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        check_model(self.config, req.model)
        server_defaults(req, self.config)
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            ids = await self.client.render_chat(conversation_of(req.messages), req.add_generation_prompt,
                                                req.chat_template_kwargs, tools, req.continue_final_message,
                                                request_template=request_chat_template(req),
                                                add_special_tokens=bool(req.add_special_tokens))
        else:
            ids = await self.client.tokenize(req.prompt or "", req.add_special_tokens is not False)
        strs = await self.client.token_strs(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.client.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        check_model(self.config, req.model)
        vocab = self.client.allm.core_client.info.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise InvalidArgumentError(f"tokens must be token ids in [0, {vocab})", param="tokens")
        if not self.client.has_tokenizer:
            raise InvalidArgumentError("this model has no tokenizer, so detokenize is unavailable", param="tokens")
        return DetokenizeResponse(prompt=await self.client.decode(req.tokens))
