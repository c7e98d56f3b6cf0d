"""Session fixtures shared by the whole suite: a tiny random Llama model and its tokenizer, built offline."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from chatstream.config import EngineConfig
from tests.tiny_model import build_tiny

torch.set_num_threads(1)
# The engine thread sets its own thread count (one per physical core unless told otherwise); the tiny test model is
# faster on one thread, and the suite's engines then don't fight each other for the cores.
os.environ.setdefault("CHATSTREAM_NUM_THREADS", "1")
# Each engine would touch its KV reserve (the prefix cache's 512 MiB and a full batch) at startup; the suite starts
# hundreds of them.
os.environ.setdefault("CHATSTREAM_RESERVE_MEMORY_MB", "0")


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``chatstream serve`` keeps its data under $XDG_DATA_HOME: the servers the tests start use a temp dir."""
    path = tmp_path_factory.mktemp("data_home")
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(path)
    yield path
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


@pytest.fixture(scope="session")
def _tiny_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]:
    path = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = build_tiny(path)
    return path, model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_built: tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]) -> Path:
    """A directory holding the tiny model and tokenizer (``from_pretrained`` loads it)."""
    return _tiny_built[0]


@pytest.fixture(scope="session")
def tiny_model(_tiny_built: tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]) -> Iterator[LlamaForCausalLM]:
    """The tiny model (eval mode, float32, CPU). Shared: tests must not modify it."""
    yield _tiny_built[1]


@pytest.fixture(scope="session")
def tiny_tokenizer(_tiny_built: tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer (English + Japanese merges, ``</s>`` as EOS, a chat template)."""
    return _tiny_built[2]


@pytest.fixture
def make_tiny_engine(
    tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> Iterator[Callable[..., Any]]:
    """A factory of started TransformersEngines on the tiny model (``make_tiny_engine(max_batch_size=4)``);
    every engine it made is stopped after the test."""
    from chatstream.engine.async_engine import TransformersEngine

    engines: list[TransformersEngine] = []

    def make(model: Any = None, **config: Any) -> TransformersEngine:
        engine = TransformersEngine(model or tiny_model, tiny_tokenizer, EngineConfig(**config))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
