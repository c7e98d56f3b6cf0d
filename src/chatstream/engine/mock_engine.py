"""The seed's mock responses: canned text streamed without a model, through the same Engine contract.

English text streams word by word, Japanese (and other wide-character) text character by character. The mock has no
compute, so each request is a small asyncio task that sleeps ``time_per_token_sec`` between tokens.

Usage: with a tokenizer the mock counts the prompt's tokens with it; without one it counts them as it counts its
own output, by pieces (words, or wide characters one by one). Logprobs, when asked for, are those of a certain
model: every piece has log-probability 0 and is its own only alternative. The mock cannot constrain its output to a
grammar (it is no :class:`~chatstream.engine.base.GrammarEngine`).
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from dataclasses import dataclass
from typing import Any

from chatstream.config import MockConfig, MockType
from chatstream.engine.base import (
    Delta,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestStream,
    TokenLogprob,
    TopLogprob,
    cancel_task,
)

logger = logging.getLogger(__name__)

ROUND_ANSWERS = (
    "Hello! I am a mock assistant. I stream canned answers so that you can try ChatStream without a model.",
    "This is the second turn of our conversation. The history is kept in your session on the server.",
    "Streaming works token by token. Each chunk carries the whole answer so far.",
    "こんにちは。これはモックの応答です。日本語は一文字ずつ送られます。",
    "That is all I can say for now. Ask again and the answers start over from the beginning.",
)

LONG_ANSWER = " ".join(
    [
        "Once upon a time, in a village by a wide river, there lived an old clockmaker who repaired every clock",
        "in the valley. People brought him clocks that ran fast, clocks that ran slow and clocks that had stopped",
        "altogether, and he listened to each of them as if it were telling him a story.",
        "One winter evening a child arrived with a pocket watch that had no hands at all. The clockmaker turned it",
        "over, opened its back and found, instead of gears, a small folded map. The map showed the river, the",
        "village and a path up the mountain that nobody in the valley had ever walked.",
        "The next morning the two of them set out together. They crossed the frozen fields, climbed past the old",
        "mill and reached a cave where the wind made a sound like ticking. Inside stood the largest clock either of",
        "them had ever seen, silent and covered with frost.",
        "It took the clockmaker seven days to mend it. When the great clock finally struck, the snow on the mountain",
        "began to melt, the river began to flow and spring came early to the valley that year.",
        "The child kept the watch without hands, and whenever anyone asked what time it was, answered that it was",
        "always the right time to begin something new.",
    ]
)


@dataclass(frozen=True)
class MockRequest(GenerationRequest):
    """A generation request with what only the mock engine reads.

    Attributes:
        user_input: the user's latest message ("echo" answers with it).
        turn: the conversation's turn number ("round" picks its answer by it).
    """

    user_input: str | None = None
    turn: int = 0


def split_mock_tokens(text: str) -> list[str]:
    """Split text into the pieces the mock streams: words (with their leading space) or single wide characters."""
    wide = sum(1 for ch in text if unicodedata.east_asian_width(ch) in ("W", "F"))
    if wide >= 3 and text.count(" ") < wide:
        return list(text)
    words = text.split(" ")
    return [words[0]] + [" " + word for word in words[1:]]


class MockEngine:
    """Streams canned answers chosen by ``MockConfig.type``; implements the Engine protocol.

    Args:
        config: what to answer and how fast.
        tokenizer: counts the prompt tokens when given (see the module's note on usage).
    """

    wants_chat_context = True
    """It answers from the user's message and the turn number: the service hands it a :class:`MockRequest`."""

    def __init__(self, config: MockConfig | None = None, tokenizer: Any = None) -> None:
        self.config = config or MockConfig()
        self.tokenizer = tokenizer
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._streams: dict[str, RequestStream] = {}
        self._running = False
        self._generated_total = 0
        self._prompt_total = 0
        self._num_scripted = 0

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        for request_id in list(self._tasks):
            self.abort(request_id)
        self._running = False

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self._tasks),
            num_generated_tokens_total=self._generated_total,
            num_prompt_tokens_total=self._prompt_total,
        )

    def describe(self) -> dict[str, Any]:
        """What /get_load and /v1/models show of this engine."""
        return {"engine": "mock", "mock_type": self.config.type.value}

    def answer_for(self, request: GenerationRequest) -> str:
        """The canned text for this request (the "script" type moves on to its next answer)."""
        user_input = request.user_input if isinstance(request, MockRequest) else None
        turn = request.turn if isinstance(request, MockRequest) else 0
        if self.config.type is MockType.ECHO:
            return user_input or ""
        if self.config.type is MockType.LONG:
            return LONG_ANSWER
        if self.config.type is MockType.SCRIPT:
            self._num_scripted += 1
            return self.config.script[(self._num_scripted - 1) % len(self.config.script)]
        return ROUND_ANSWERS[max(turn - 1, 0) % len(ROUND_ANSWERS)]

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt's length in tokens: the tokenizer's count, else the number of mock pieces."""
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        if self.tokenizer is None:
            return len([piece for piece in split_mock_tokens(request.prompt) if piece.strip()])
        special = {} if request.add_special_tokens is None else {"add_special_tokens": request.add_special_tokens}
        return len(self.tokenizer.encode(request.prompt, **special))

    def add_request(self, request: GenerationRequest) -> RequestStream:
        if not self._running:
            raise EngineError("the mock engine is not running")
        stream = RequestStream(request.request_id)
        self._streams[request.request_id] = stream
        task = asyncio.get_running_loop().create_task(self._produce(request, stream))
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda done: self._forget(request.request_id, done, stream))
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel the request's task (from any thread: ``stop`` runs in a worker thread at shutdown)."""
        cancel_task(self._tasks.get(request_id))

    def _forget(self, request_id: str, task: asyncio.Task[None], stream: RequestStream) -> None:
        self._tasks.pop(request_id, None)
        self._streams.pop(request_id, None)
        if task.cancelled():  # cancelled before it ran: its own handler never put the last delta
            stream.put_nowait(Delta(text="", finish_reason=FinishReason.ABORT))

    async def _produce(self, request: GenerationRequest, stream: RequestStream) -> None:
        all_pieces = split_mock_tokens(self.answer_for(request))
        pieces = all_pieces[: request.sampling.max_new_tokens]
        truncated = len(all_pieces) > len(pieces)
        num_prompt = self.count_prompt_tokens(request)
        self._prompt_total += num_prompt
        count = 0
        try:
            if self.config.initial_wait_sec > 0:
                await asyncio.sleep(self.config.initial_wait_sec)
            for count, piece in enumerate(pieces, start=1):
                if self.config.time_per_token_sec > 0:
                    await asyncio.sleep(self.config.time_per_token_sec)
                self._generated_total += 1
                reason = None
                if count == len(pieces):
                    reason = FinishReason.LENGTH if truncated else FinishReason.STOP
                logprobs = () if request.logprobs is None else (_certain(count, piece, request.logprobs),)
                stream.put_nowait(
                    Delta(piece, (count,), reason, num_prompt, count, logprobs=logprobs)  # one piece per "token"
                )
            if not pieces:
                stream.put_nowait(Delta(text="", finish_reason=FinishReason.STOP, num_prompt_tokens=num_prompt))
        except asyncio.CancelledError:
            stream.put_nowait(Delta("", (), FinishReason.ABORT, num_prompt, num_generated_tokens=count))


def _certain(token_id: int, piece: str, num_top: int) -> TokenLogprob:
    """The logprobs of a piece the mock was sure of."""
    raw = piece.encode()
    return TokenLogprob(token_id, piece, 0.0, (TopLogprob(token_id, piece, 0.0, raw),)[:num_top], raw)
