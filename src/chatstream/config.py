"""Typed configuration values that cross layer boundaries.

The seed's dict-style options are translated into these once, in ``chat_stream.py``; every other layer sees only
these frozen, validated dataclasses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

GREEDY_TEMPERATURE = 1e-4
"""A temperature below this value means greedy decoding (argmax)."""


class RepetitionPenaltyMethod(enum.Enum):
    """How ``repetition_penalty`` is applied to the logits of tokens already in the sequence."""

    MULTIPLICATIVE = "multiplicative"
    """CTRL-style: positive logits are divided by the penalty, negative ones multiplied (once per distinct token)."""
    SUBTRACTIVE = "subtractive"
    """The penalty is subtracted from the logit of every distinct token already seen."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    Attributes:
        max_new_tokens: upper bound on generated tokens (finish reason LENGTH when reached).
        temperature: softmax temperature; below ``GREEDY_TEMPERATURE`` decoding is greedy.
        top_k: keep the k most likely tokens; 0 or None disables the filter.
        top_p: nucleus sampling; keep the smallest set whose probability reaches p (1.0 disables).
        min_p: drop tokens whose probability is below ``min_p`` times the top token's probability (0 disables).
        repetition_penalty: penalty for tokens already in the sequence (prompt and output); None or 1.0 disables
            for the multiplicative method, None or 0.0 for the subtractive one.
        repetition_penalty_method: see :class:`RepetitionPenaltyMethod`.
        frequency_penalty: OpenAI-style, subtracted once per occurrence of a token in the output.
        presence_penalty: OpenAI-style, subtracted once for every token present in the output.
        seed: per-request seed; the same seed and prompt give the same sample.
        stop: stop strings; generation ends when one appears and it is never sent to the client.
        stop_token_ids: extra token ids that end generation (besides the tokenizer's EOS).
        ignore_eos: keep generating past EOS (benchmarks).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_penalty_method: RepetitionPenaltyMethod = RepetitionPenaltyMethod.MULTIPLICATIVE
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.repetition_penalty_method, str):
            object.__setattr__(self, "repetition_penalty_method", _parse_penalty_method(self.repetition_penalty_method))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _check(self.top_k is None or self.top_k >= 0, "top_k", self.top_k, "must be >= 0 or None")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        if self.repetition_penalty is not None:
            _check(self.repetition_penalty >= 0.0, "repetition_penalty", self.repetition_penalty, "must be >= 0")
            if self.repetition_penalty_method is RepetitionPenaltyMethod.MULTIPLICATIVE:
                _check(
                    self.repetition_penalty > 0.0,
                    "repetition_penalty",
                    self.repetition_penalty,
                    "must be > 0 for the multiplicative method",
                )
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature below ``GREEDY_TEMPERATURE``)."""
        return self.temperature < GREEDY_TEMPERATURE

    def with_updates(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the generation engine.

    Attributes:
        context_len: the most tokens a sequence may hold (prompt + generated). A longer prompt is truncated from
            the left, keeping room for ``max_new_tokens``.
        max_batch_size: the most sequences decoded together in one step.
        add_special_tokens: passed to the tokenizer when the prompt is encoded (None: the tokenizer's default).
        prefix_cache_bytes: memory budget of the prefix cache shared by all requests: the KV of prompts and answers
            kept so that a request starting with the same tokens (a system prompt, a conversation's earlier turns)
            prefills only the rest (0 disables reuse).
        max_prefill_tokens: prompt tokens (padding included) prefilled in one step, next to the decode of the
            running streams; a longer prompt is prefilled in chunks of this size over several steps, so a running
            stream never waits for more than one chunk.
        fused_decoder: on the CPU, run supported model families (Llama, Mistral, Qwen2, Qwen3, Gemma-3) through the
            hand-written fused decoder (checked against transformers when built); False keeps transformers' forward.
        weight_quantization: None (the model's own weights), ``"int8"`` or ``"int4"``: the fused decoder's linear
            layers (the LM head included) run on weights quantized at load time (per output channel for int8, per
            group of ``quantization_group_size`` input channels for int4), with activations in bfloat16. Smaller
            weights make a single stream faster on CPUs where decode reads the weights from memory; the outputs
            differ slightly from the unquantized model's (docs/performance.md).
        quantization_group_size: input channels sharing one int4 scale (32, 64, 128 or 256).
    """

    context_len: int = 1024
    max_batch_size: int = 32
    add_special_tokens: bool | None = None
    prefix_cache_bytes: int = 512 * 1024 * 1024
    max_prefill_tokens: int = 256
    fused_decoder: bool = True
    weight_quantization: str | None = None
    quantization_group_size: int = 32

    def __post_init__(self) -> None:
        _check(self.context_len >= 2, "context_len", self.context_len, "must be >= 2")
        _check(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be >= 1")
        _check(self.prefix_cache_bytes >= 0, "prefix_cache_bytes", self.prefix_cache_bytes, "must be >= 0")
        _check(self.max_prefill_tokens >= 1, "max_prefill_tokens", self.max_prefill_tokens, "must be >= 1")
        quantizations = (None, "int8", "int4")
        _check(self.weight_quantization in quantizations, "weight_quantization", self.weight_quantization,
               "must be None, 'int8' or 'int4'")  # fmt: skip
        groups = (32, 64, 128, 256)
        _check(self.quantization_group_size in groups, "quantization_group_size", self.quantization_group_size,
               "must be 32, 64, 128 or 256")  # fmt: skip


@dataclass(frozen=True)
class AdmissionConfig:
    """Load control: how many generations run at once and how many may wait.

    Attributes:
        max_concurrency: the seed's ``num_of_concurrent_executions``.
        max_queue_size: requests that may wait (FIFO) beyond the running ones; the next is rejected at once.
        reject_as_http_error: the seed's ``too_many_request_as_http_error``: 429 + Retry-After instead of 200.
    """

    max_concurrency: int = 2
    max_queue_size: int = 5
    reject_as_http_error: bool = False

    def __post_init__(self) -> None:
        _check(self.max_concurrency >= 1, "num_of_concurrent_executions", self.max_concurrency, "must be >= 1")
        _check(self.max_queue_size >= 0, "max_queue_size", self.max_queue_size, "must be >= 0")


class MockType(enum.Enum):
    """What the mock engine answers."""

    ROUND = "round"
    """A fixed set of sentences, chosen by the turn number."""
    LONG = "long"
    """One long text."""
    ECHO = "echo"
    """The user's own input."""


@dataclass(frozen=True)
class MockConfig:
    """The seed's ``mock_params``: canned answers streamed without a model."""

    type: MockType = MockType.ROUND
    initial_wait_sec: float = 0.0
    time_per_token_sec: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.type, str):
            try:
                object.__setattr__(self, "type", MockType(self.type))
            except ValueError:
                raise ValueError(f"mock_params type {self.type!r} must be one of 'round', 'long', 'echo'") from None
        _check(self.initial_wait_sec >= 0, "initial_wait_sec", self.initial_wait_sec, "must be >= 0")
        _check(self.time_per_token_sec >= 0, "time_per_token_sec", self.time_per_token_sec, "must be >= 0")

    @classmethod
    def from_seed_params(cls, params: dict[Any, Any] | None) -> MockConfig:
        """Translate the seed's ``mock_params`` dict (whose own default used the builtin ``type`` as a key)."""
        params = dict(params or {})
        kind = params.get("type", params.get(type, "round"))
        return cls(
            type=kind,
            initial_wait_sec=float(params.get("initial_wait_sec", 0.0)),
            time_per_token_sec=float(params.get("time_per_token_sec", cls.time_per_token_sec)),
        )


@dataclass(frozen=True)
class ServerConfig:
    """Settings of ``chatstream serve``."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=())
    drain_timeout_sec: float = 30.0

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", self.port, "must be in [0, 65535]")
        _check(self.drain_timeout_sec >= 0, "drain_timeout_sec", self.drain_timeout_sec, "must be >= 0")


def _parse_penalty_method(value: str) -> RepetitionPenaltyMethod:
    try:
        return RepetitionPenaltyMethod(value)
    except ValueError:
        raise ValueError(f"repetition_penalty_method {value!r} must be 'multiplicative' or 'subtractive'") from None


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")
