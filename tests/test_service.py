"""ChatService without HTTP: requests built from histories, the one admission wait, generation, console, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatstream import ChatPromptTogetherRedPajamaINCITEChat, ChatStream
from chatstream.admission.admission import Draining, QueueFull
from chatstream.config import (
    AdmissionConfig,
    EngineConfig,
    MockConfig,
    SamplingOverrides,
    SamplingParams,
    ServiceConfig,
)
from chatstream.engine.base import FinishReason
from chatstream.engine.mock_engine import LONG_ANSWER, ROUND_ANSWERS, MockEngine, MockRequest
from chatstream.service import ChatService, PromptFactory, create_engine


def mock_service(
    max_concurrency: int = 1, max_queue_size: int = 1, time_per_token: float = 0.0, **kw: Any
) -> ChatService:
    config = ServiceConfig(admission=AdmissionConfig(max_concurrency, max_queue_size), **kw)
    engine = MockEngine(MockConfig(type="long", time_per_token_sec=time_per_token))
    return ChatService(config, engine, PromptFactory(ChatPromptTogetherRedPajamaINCITEChat))


@pytest.fixture
async def service() -> AsyncIterator[ChatService]:
    svc = mock_service()
    await svc.startup()
    yield svc
    await svc.shutdown(0.0)


async def connected() -> bool:
    return False


async def disconnected() -> bool:
    return True


def metric(service: ChatService, name: str) -> float:
    value = service.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


# ----- building the request -----


def test_session_sampling_overrides_the_defaults() -> None:
    svc = mock_service(sampling=SamplingParams(temperature=0.7, top_k=40, top_p=0.9))
    overrides = SamplingOverrides.from_seed_params({"temperature": 0.2, "top_k_value": 5})
    s = svc.requests.sampling_for(overrides)
    assert (s.temperature, s.top_k, s.top_p) == (0.2, 5, 0.9)
    assert SamplingOverrides.from_seed_params({}) is None and svc.requests.sampling_for(None) == svc.default_sampling
    assert svc.requests.sampling_for(SamplingOverrides.from_seed_params({"top_p_value": 0.0})).greedy
    assert svc.requests.sampling_for(SamplingOverrides(top_p=1.5)).top_p == 1.0


def test_build_request_carries_stops_replacements_and_what_the_mock_reads() -> None:
    svc = mock_service()
    prompt = svc.new_chat_prompt()
    prompt.add_requester_msg("hello")
    prompt.add_responder_msg(None)
    request = svc.requests.build_request(prompt, SamplingOverrides(temperature=0.0), conversation_id="c1")
    assert isinstance(request, MockRequest) and (request.user_input, request.turn) == ("hello", 1)
    assert request.prompt == prompt.create_prompt() and request.conversation_id == "c1"
    assert request.sampling.greedy and set(request.sampling.stop) >= set(prompt._get_final_stop_strs())
    text = svc.requests.build_text_request("cmpl-1", "raw text", SamplingParams(max_new_tokens=3))
    assert isinstance(text, MockRequest) and text.user_input == "raw text" and text.sampling.max_new_tokens == 3


def test_chat_template_prompts_are_encoded_without_extra_special_tokens(tiny_model: Any, tiny_tokenizer: Any) -> None:
    from chatstream import ChatTemplatePrompt

    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer)
    assert cs.chat_prompt_clazz is ChatTemplatePrompt  # the tiny tokenizer has a chat template
    prompt = cs.service.new_chat_prompt()
    prompt.add_requester_msg("hi")
    prompt.add_responder_msg(None)
    assert cs.service.requests.build_request(prompt).add_special_tokens is False
    plain = ChatPromptTogetherRedPajamaINCITEChat()
    plain.add_requester_msg("hi")
    plain.add_responder_msg(None)
    assert cs.service.requests.build_request(plain).add_special_tokens is None
    forced = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer, add_special_tokens=True)
    assert forced.service.requests.build_request(prompt).add_special_tokens is True


def test_create_engine_needs_a_model_unless_mocked() -> None:
    assert isinstance(create_engine(None, None, EngineConfig(), MockConfig()), MockEngine)
    with pytest.raises(ValueError, match="model and tokenizer"):
        create_engine(None, None, EngineConfig())


def test_service_config_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="locale"):
        ServiceConfig(locale="fr")
    with pytest.raises(ValueError, match="num_gpus"):
        ServiceConfig(num_gpus=-1)


# ----- the admission wait -----


async def test_acquire_slot_records_admission_and_rejection(service: ChatService) -> None:
    slot = await service.acquire_slot(connected)
    assert slot is not None and service.admission.num_running == 1
    waiting = asyncio.create_task(service.acquire_slot(connected))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await service.acquire_slot(connected)
    slot.release()
    second = await waiting
    assert second is not None
    second.release()
    assert metric(service, "chatstream_requests_admitted_total") == 2
    assert metric(service, "chatstream_requests_rejected_total") == 1
    assert metric(service, "chatstream_queue_time_seconds_count") == 2


async def test_a_client_that_leaves_while_waiting_leaves_the_line(service: ChatService) -> None:
    slot = await service.acquire_slot(connected)
    assert slot is not None
    assert await service.acquire_slot(disconnected) is None
    assert (service.admission.num_running, service.admission.num_waiting) == (1, 0)
    slot.release()
    assert service.admission.num_running == 0


async def test_a_cancelled_waiter_leaves_the_line(service: ChatService) -> None:
    slot = await service.acquire_slot(connected)
    waiting = asyncio.create_task(service.acquire_slot(connected))
    await asyncio.sleep(0.01)
    assert service.admission.num_waiting == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert service.admission.num_waiting == 0
    assert slot is not None
    slot.release()
    assert service.admission.num_running == 0


async def test_draining_rejects_new_slots(service: ChatService) -> None:
    await service.admission.drain(0.0)
    with pytest.raises(Draining):
        await service.acquire_slot(connected)


# ----- generation -----


async def test_collect_runs_to_the_end_or_aborts_on_disconnect() -> None:
    svc = mock_service(time_per_token=0.002)
    await svc.startup()
    try:
        request = svc.requests.build_text_request("cmpl-a", "x", SamplingParams())
        outcome = await svc.collect(request, connected)
        assert outcome is not None and outcome.text == LONG_ANSWER and outcome.finish_reason is FinishReason.STOP
        assert await svc.collect(svc.requests.build_text_request("cmpl-b", "x", SamplingParams()), disconnected) is None
        for _ in range(100):  # the mock drops an aborted request when its task has wound down
            if svc.engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert svc.engine.stats().num_running == 0
        assert svc.metrics.registry.get_sample_value("chatstream_requests_finished_total", {"reason": "abort"}) == 1
    finally:
        await svc.shutdown(0.0)


async def test_console_turns_keep_the_history() -> None:
    config = ServiceConfig(admission=AdmissionConfig(1, 0))
    engine = MockEngine(MockConfig(type="round", time_per_token_sec=0.0))
    svc = ChatService(config, engine, PromptFactory(ChatPromptTogetherRedPajamaINCITEChat))
    await svc.startup()
    history = svc.new_chat_prompt()
    try:
        for turn in range(2):
            items = [item async for item in svc.console_turn(history, f"message {turn}")]
            assert items[0][2] == "begin" and items[-1] == (ROUND_ANSWERS[turn], "", "end")
        assert history.get_turn() == 2 and history.get_responder_last_msg() == ROUND_ANSWERS[1]
    finally:
        await svc.shutdown(0.0)


async def test_shutdown_waits_for_running_generations_then_stops_the_engine() -> None:
    svc = mock_service(time_per_token=0.001)
    await svc.startup()
    slot = await svc.acquire_slot(connected)
    assert slot is not None
    request = svc.requests.build_text_request("cmpl-c", "x", SamplingParams())
    collecting = asyncio.create_task(svc.collect(request, connected))

    async def release_when_done() -> None:
        await collecting
        slot.release()

    releasing = asyncio.create_task(release_when_done())
    await svc.shutdown(30.0)
    await releasing
    outcome = collecting.result()
    assert outcome is not None and outcome.text == LONG_ANSWER
    assert not svc.engine.is_running and svc.admission.draining


async def test_n_copies_run_together_and_a_disconnect_aborts_them_all() -> None:
    # 2 ms a token: the long answer (221 tokens) takes at least 0.44 s, so the copies still run when the disconnect is
    # first checked (every 0.25 s); at 1 ms a token they could finish just before it, and nothing was aborted.
    svc = mock_service(time_per_token=0.002)
    await svc.startup()
    try:
        requests = [svc.requests.build_text_request(f"cmpl-{i}", "x", SamplingParams()) for i in range(3)]
        outcomes = await svc.collect_all(requests, connected)
        assert outcomes is not None and [o.text for o in outcomes] == [LONG_ANSWER] * 3
        assert await svc.collect_all(requests, disconnected) is None
        for _ in range(100):
            if svc.engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert svc.engine.stats().num_running == 0
    finally:
        await svc.shutdown(0.0)


async def test_startup_builds_the_grammar_table_before_serving(tiny_model: Any, tiny_tokenizer: Any) -> None:
    from chatstream.engine.grammar import GrammarSpec

    cs = ChatStream(model=tiny_model, tokenizer=tiny_tokenizer)
    assert not cs.engine.llm.grammars.is_built  # type: ignore[attr-defined]
    await cs.startup()
    try:
        assert cs.engine.llm.grammars.is_built  # type: ignore[attr-defined]
        await cs.service.validate_grammar(GrammarSpec.json_object())
        with pytest.raises(ValueError, match="cannot constrain"):
            await mock_service().validate_grammar(GrammarSpec.json_object())
    finally:
        await cs.shutdown(0.0)
