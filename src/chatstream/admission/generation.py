"""Running one admitted generation: engine stream, abort on cancel, metrics. Shared by every protocol."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from chatstream.admission.metrics import ChatStreamMetrics
from chatstream.engine.base import Delta, Engine, EngineError, FinishReason, GenerationRequest, TokenLogprob


@dataclass
class GenerationOutcome:
    """What a finished (or interrupted) generation produced, filled in while it streams."""

    text: str = ""
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class GenerationStream:
    """One started generation as a protocol streams it: iterate :meth:`deltas` once; :meth:`aclose` aborts it.

    ``first`` is the delta already received when the caller waited for it before committing to a streaming
    response (see ``ChatService.open_generation``); :meth:`deltas` yields it before the rest.
    """

    def __init__(
        self,
        request: GenerationRequest,
        outcome: GenerationOutcome,
        rest: AsyncGenerator[Delta, None],
        first: Delta | None = None,
    ) -> None:
        self.request = request
        self.outcome = outcome
        self._rest = rest
        self._first = first

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        """The deltas, the first one included; closing this generator aborts the request."""
        async with aclosing(self._rest) as rest:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            async for delta in rest:
                yield delta

    async def aclose(self) -> None:
        """Abort the request unless it has finished (for a response that was never sent); idempotent."""
        await self._rest.aclose()


async def run_generation(
    engine: Engine,
    request: GenerationRequest,
    metrics: ChatStreamMetrics | None,
    outcome: GenerationOutcome,
    arrived: float | None = None,
) -> AsyncGenerator[Delta, None]:
    """Yield the engine's deltas for ``request`` while recording them in ``outcome`` and ``metrics``.

    If the consumer stops early (client disconnect: the generator is closed or cancelled), the request is aborted
    in the engine so that its batch row is dropped at the next step. An EngineError raised by the stream (an engine
    that found out it cannot serve the request) is recorded as an ERROR outcome and propagates.
    """
    started = time.monotonic()
    last = started
    stream = engine.add_request(request)
    try:
        async for delta in stream:
            now = time.monotonic()
            # New tokens, whether the engine reports their ids or only their count (an upstream sends text only)
            if metrics is not None and delta.num_generated_tokens > outcome.num_generated_tokens:
                if outcome.num_generated_tokens == 0:
                    metrics.time_to_first_token.observe(now - started)
                else:
                    metrics.inter_token_latency.observe(now - last)
                last = now
            _record(outcome, delta)
            yield delta
    except EngineError as exc:
        outcome.finish_reason, outcome.error = FinishReason.ERROR, str(exc)
        raise
    finally:
        if outcome.finish_reason is None:
            engine.abort(request.request_id)
            outcome.finish_reason = FinishReason.ABORT
        if metrics is not None:
            _observe_end(metrics, outcome, arrived if arrived is not None else started)


def _record(outcome: GenerationOutcome, delta: Delta) -> None:
    outcome.text += delta.text
    outcome.num_prompt_tokens = delta.num_prompt_tokens
    outcome.num_generated_tokens = delta.num_generated_tokens
    outcome.num_cached_tokens = delta.num_cached_tokens
    outcome.logprobs.extend(delta.logprobs)
    if delta.finish_reason is not None:
        outcome.finish_reason = delta.finish_reason
        outcome.error = delta.error


def _observe_end(metrics: ChatStreamMetrics, outcome: GenerationOutcome, arrived: float) -> None:
    reason = outcome.finish_reason.value if outcome.finish_reason else "abort"
    metrics.finished.labels(reason=reason).inc()
    metrics.e2e_latency.observe(time.monotonic() - arrived)
    metrics.prompt_tokens.inc(outcome.num_prompt_tokens)
    metrics.cached_prompt_tokens.inc(outcome.num_cached_tokens)
    metrics.generation_tokens.inc(outcome.num_generated_tokens)
