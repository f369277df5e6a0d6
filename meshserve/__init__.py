"""meshserve: a distributed LLM inference engine with an OpenAI-compatible server."""

__version__ = "0.1.0"

from meshserve.sampling import SamplingParams  # noqa: E402
from meshserve.outputs import CompletionOutput, RequestOutput  # noqa: E402


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it lazily so `import meshserve` stays cheap.
    if name == "LLM":
        from meshserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
