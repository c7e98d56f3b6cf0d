"""ChatStream itself: constructor defaults and validation, sampling translation, the console chat."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from chatstream import ChatPromptTogetherRedPajamaINCITEChat, ChatStream, SimpleSessionRequestHandler
from chatstream.config import RepetitionPenaltyMethod
from chatstream.engine.mock_engine import ROUND_ANSWERS


def test_seed_defaults() -> None:
    cs = ChatStream(use_mock_response=True)
    assert cs.name == "node:0"
    assert (cs.admission_config.max_concurrency, cs.admission_config.max_queue_size) == (2, 5)
    assert cs.too_many_request_as_http_error is False
    s = cs.default_sampling
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (256, 1.0, 50, 1.0, None)
    assert s.repetition_penalty_method is RepetitionPenaltyMethod.MULTIPLICATIVE
    assert cs.engine_config.context_len == 1024
    assert isinstance(cs.logger, logging.Logger) and cs.logger.name == "chatstream"
    assert isinstance(cs.request_handler, SimpleSessionRequestHandler)
    assert cs.request_handler is not ChatStream(use_mock_response=True).request_handler  # one per instance
    assert cs.num_gpus == 0


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", torch.device("cpu")])
def test_device_accepts_strings_and_torch_devices(device: Any) -> None:
    cs = ChatStream(use_mock_response=True, device=device)
    assert isinstance(cs.device, torch.device)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"device": "gpu7"}, "device"),
        ({"num_of_concurrent_executions": 0}, "num_of_concurrent_executions"),
        ({"max_queue_size": -1}, "max_queue_size"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty_method": "divide"}, "repetition_penalty_method"),
        ({"context_len": 1}, "context_len"),
        ({"max_decode_slowdown": 1.0}, "max_decode_slowdown"),
        ({"max_prefill_tokens": 0}, "max_prefill_tokens"),
        ({"mock_params": {"type": "poem"}}, "mock_params"),
        (
            {
                "client_roles": {
                    "admin": {"apis": {"allow": ["no_such_api"], "auth_method": "nothing", "use_session": True}}
                }
            },
            "no_such_api",
        ),
    ],
)
def test_bad_options_raise_value_errors_naming_them(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ChatStream(use_mock_response=True, **kwargs)


def test_a_real_engine_needs_model_and_tokenizer() -> None:
    with pytest.raises(ValueError, match="model and tokenizer"):
        ChatStream()


async def test_console_chat_keeps_history_and_reports_positions() -> None:
    cs = ChatStream(
        use_mock_response=True,
        mock_params={"type": "round", "time_per_token_sec": 0},
        chat_prompt_clazz=ChatPromptTogetherRedPajamaINCITEChat,
    )
    for turn in range(2):
        items = [item async for item in cs.handle_console_input(f"message {turn}")]
        positions = [pos for _, _, pos in items]
        assert positions[0] == "begin" and positions[-1] == "end"
        assert set(positions[1:-1]) <= {"mid"}
        assert items[-1][0] == ROUND_ANSWERS[turn]
        assert "".join(new for _, new, _ in items) == ROUND_ANSWERS[turn]
    assert cs._console_prompt is not None and cs._console_prompt.get_turn() == 2


async def test_console_chat_with_the_tiny_model(tiny_model: Any, tiny_tokenizer: Any) -> None:
    cs = ChatStream(
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        device="cpu",
        max_new_tokens=8,
        temperature=0.0,
        chat_prompt_clazz=ChatPromptTogetherRedPajamaINCITEChat,
    )
    try:
        items = [item async for item in cs.handle_console_input("hello")]
        assert items[-1][2] == "end"
        assert items[-1][0] == "".join(new for _, new, _ in items)
    finally:
        await cs.shutdown()


def test_the_original_public_names_are_exported() -> None:
    import chatstream
    from tests.prompts.test_prompt_presets import SEED_EXPORTED_NAMES

    seed_names = [
        "ChatStream",
        "AbstractChatPrompt",
        "AbstractRequestHandler",
        "SimpleSessionRequestHandler",
        "LoadTime",
        *SEED_EXPORTED_NAMES,
    ]
    missing = [name for name in seed_names if not hasattr(chatstream, name)]
    assert missing == []
    assert set(seed_names) <= set(chatstream.__all__)


def test_ignore_eos_option_reaches_the_default_sampling() -> None:
    assert ChatStream(use_mock_response=True, ignore_eos=True).default_sampling.ignore_eos
    assert not ChatStream(use_mock_response=True).default_sampling.ignore_eos


def test_fused_decoder_option_reaches_the_engine_config() -> None:
    assert ChatStream(use_mock_response=True).engine_config.fused_decoder is True
    assert ChatStream(use_mock_response=True, fused_decoder=False).engine_config.fused_decoder is False


def test_verify_role_for_api_answers_the_role_layer() -> None:
    from starlette.requests import Request

    class Session:
        def get_session(self) -> dict[str, Any]:
            return {}

    cs = ChatStream(use_mock_response=True)  # default roles: browsers chat, agents read the load
    browser = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "state": {"session": Session()}})
    assert cs.verify_role_for_api(browser, "chat_stream") is None
    denied = cs.verify_role_for_api(browser, "get_load")
    assert denied is not None and denied.status_code == 403


async def test_a_given_engine_instance_generates_without_a_model(tiny_model: Any, tiny_tokenizer: Any) -> None:
    from chatstream.config import EngineConfig
    from chatstream.engine.async_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, tiny_tokenizer, EngineConfig(max_batch_size=2))
    cs = ChatStream(
        tokenizer=tiny_tokenizer,
        engine=engine,
        model_name="given",
        max_new_tokens=6,
        temperature=0.0,
        chat_prompt_clazz=ChatPromptTogetherRedPajamaINCITEChat,
    )
    assert cs.engine is engine and cs.model_name == "given"
    try:
        items = [item async for item in cs.handle_console_input("hello")]
        assert items[-1][2] == "end" and items[-1][0]
        assert engine.stats().num_generated_tokens_total > 0
    finally:
        await cs.shutdown()


def test_engines_chosen_by_name(tiny_model_dir: Any) -> None:
    from chatstream.engine.mock_engine import MockEngine
    from chatstream.engine.upstream_engine import OpenAIUpstreamEngine, UpstreamConfig
    from chatstream.engine.vllm_config import VLLMConfig
    from chatstream.engine.vllm_engine import VLLMEngine

    mock = ChatStream(engine="mock", mock_params={"type": "echo"})
    assert isinstance(mock.engine, MockEngine) and mock.model_name == "chatstream-mock"
    upstream = ChatStream(engine="upstream", engine_options=UpstreamConfig("http://h/v1", model="big"))
    assert isinstance(upstream.engine, OpenAIUpstreamEngine) and upstream.model_name == "big"
    assert upstream.service.config.num_gpus == 0
    vllm = ChatStream(engine="vllm", model=str(tiny_model_dir), engine_options=VLLMConfig(tensor_parallel_size=2))
    assert isinstance(vllm.engine, VLLMEngine) and vllm.engine.model == str(tiny_model_dir)
    assert vllm.tokenizer is not None and vllm.model_name == tiny_model_dir.name  # the model's own tokenizer
    assert vllm.service.config.num_gpus == 2
    with pytest.raises(ValueError, match="engine_options=VLLMConfig do not fit engine 'upstream'"):
        ChatStream(engine="upstream", engine_options=VLLMConfig())
