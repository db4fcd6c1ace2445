"""Aphrodite: an OpenAI-compatible LLM inference server with extended sampling control."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "__version__"]

# Imported lazily: the engine-core and worker processes import this package too, and must
# not pay for (or start threads from) transformers and torch that they do not use.
_LAZY = {"LLM": "aphrodite.llm", "SamplingParams": "aphrodite.sampling_params",
         "StructuredOutputsParams": "aphrodite.structured_outputs",
         "RequestOutput": "aphrodite.outputs", "CompletionOutput": "aphrodite.outputs"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aphrodite' has no attribute {name!r}")
