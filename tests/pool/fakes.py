"""A member engine whose requests the test answers by hand, and can break."""

from __future__ import annotations

from chatstream.engine.base import Delta, EngineError, EngineStats, FinishReason, GenerationRequest, RequestStream


class FakeEngine:
    """Implements the engine contract; ``say``/``end`` feed a request's stream, ``broken`` fails ``check_health``,
    ``refuse`` makes ``add_request`` raise."""

    def __init__(self) -> None:
        self.streams: dict[str, RequestStream] = {}
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.running = False
        self.broken: str | None = None
        self.refuse: EngineError | None = None

    @property
    def is_running(self) -> bool:
        return self.running

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        for request_id in list(self.streams):
            self.abort(request_id)
        self.running = False

    def check_health(self) -> None:
        if self.broken:
            raise EngineError(self.broken)

    def add_request(self, request: GenerationRequest) -> RequestStream:
        if self.refuse is not None:
            raise self.refuse
        stream = RequestStream(request.request_id)
        self.streams[request.request_id] = stream
        self.requests.append(request)
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.end(request_id, FinishReason.ABORT)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.streams), num_generated_tokens_total=len(self.requests))

    def say(self, request_id: str, text: str) -> None:
        self.streams[request_id].put_nowait(Delta(text=text, token_ids=(1,), num_generated_tokens=1))

    def end(self, request_id: str, reason: FinishReason = FinishReason.STOP, error: str | None = None) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            stream.put_nowait(Delta(text="", finish_reason=reason, error=error, num_cached_tokens=3))
