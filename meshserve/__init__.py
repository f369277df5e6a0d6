"""meshserve: a distributed LLM inference engine with an OpenAI-compatible server."""

__version__ = "0.1.0"

from typing import NotRequired, TypedDict  # noqa: E402

from meshserve.sampling import RequestOutputKind, SamplingParams  # noqa: E402
from meshserve.outputs import CompletionOutput, RequestOutput  # noqa: E402


class TextPrompt(TypedDict):
    """vLLM's text prompt for LLM.generate: {"prompt": "..."} (tokenized by the model's tokenizer)."""

    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's token prompt for LLM.generate: {"prompt_token_ids": [...]}, with the text it came from optional
    (returned as the output's prompt)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt | list[int]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it lazily so `import meshserve` stays cheap.
    if name == "LLM":
        from meshserve.entrypoints.llm import LLM

        return LLM
    if name == "EngineArgs":
        from meshserve.config import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'meshserve' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestOutputKind", "TextPrompt",
           "TokensPrompt", "PromptType", "EngineArgs", "__version__"]
