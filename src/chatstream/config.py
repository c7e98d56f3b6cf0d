"""Typed configuration values that cross layer boundaries.

The seed's dict-style options are translated into these once, in ``chat_stream.py``; every other layer sees only
these frozen, validated dataclasses.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

T = TypeVar("T")

GREEDY_TEMPERATURE = 1e-4
"""A temperature below this value means greedy decoding (argmax)."""

WEIGHT_QUANTIZATIONS = ("int8", "int4", "w8a8")
"""The values of ``EngineConfig.weight_quantization`` besides None (engine/cpu/quantized.py implements them)."""


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
class SamplingOverrides:
    """A conversation's own sampling values over the defaults (what POST /set_generation_params keeps).

    Attributes:
        temperature: replaces the default temperature.
        top_k: replaces the default top-k.
        top_p: replaces the default top-p; 0 or less means greedy decoding (an empty nucleus keeps only the most
            likely token), values above 1 count as 1.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def from_seed_params(cls, params: Mapping[str, Any] | None) -> SamplingOverrides | None:
        """Translate the seed's session dict ``{"temperature", "top_k_value", "top_p_value"}`` (None: no overrides)."""
        if not params:
            return None
        return cls(
            temperature=_optional(float, params.get("temperature")),
            top_k=_optional(int, params.get("top_k_value")),
            top_p=_optional(float, params.get("top_p_value")),
        )

    def apply(self, defaults: SamplingParams) -> SamplingParams:
        """``defaults`` with these values over them."""
        changes: dict[str, Any] = {}
        if self.temperature is not None:
            changes["temperature"] = self.temperature
        if self.top_k is not None:
            changes["top_k"] = self.top_k
        if self.top_p is not None:
            if self.top_p <= 0.0:
                changes["temperature"] = 0.0
            else:
                changes["top_p"] = min(self.top_p, 1.0)
        return defaults.with_updates(**changes) if changes else defaults


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
        max_decode_slowdown: while rows decode, a step with a prefill chunk may take at most this many times a step
            without one: the engine measures both and shrinks the chunk below ``max_prefill_tokens`` to fit (a
            long prompt joining a busy batch then costs the running streams at most this factor on their
            inter-token gap, and takes longer to prefill). When more users wait for their first token than stream,
            the factor grows by their ratio. None: ``max_prefill_tokens`` always.
        fused_decoder: on the CPU, run supported model families (Llama, Mistral, Qwen2, Qwen3, Gemma-3) through the
            hand-written fused decoder (checked against transformers when built); False keeps transformers' forward.
        weight_quantization: None (the model's own weights), ``"int8"``, ``"int4"`` or ``"w8a8"``: the fused
            decoder's linear layers (the LM head included) decode on weights quantized at load time (per output
            channel for int8 and w8a8, per group of ``quantization_group_size`` input channels for int4). int8 and
            int4 keep the activations in bfloat16 and serve the decoding rows only (prompts prefill on the model's
            weights); w8a8 also quantizes the activations, per row and block of 32 inputs, multiplies bytes with
            bytes (x86-64 with AVX512-VNNI, a kernel compiled on first use) and serves the prompts' prefill too;
            its layers' RMSNorms, rotary embedding and MLP gate also run in that kernel's extension.
            Smaller weights make decoding faster on CPUs where it reads the weights from memory; the outputs differ
            slightly from the unquantized model's (docs/performance.md).
        quantization_group_size: input channels sharing one int4 scale (32, 64, 128 or 256).
        cpu_kernels: run the fused decoder's RMSNorms, rotary embedding, MLP gate and (on CPUs with AVX512-BF16 but
            no AMX, for bfloat16 activations) attention in the kernel extension that ``"w8a8"`` compiles (x86-64 with
            AVX512-VNNI, a C++ compiler and ``ninja``; about 40 s the first time on a machine): one call each where
            PyTorch runs a few to a dozen operators, and an attention that reads each row's columns in place.
            None (the default): with ``"w8a8"`` and for bfloat16 models, where the extension can run; True: also
            for other dtypes, and an error where the extension cannot run; False: PyTorch's operators always. The
            results are PyTorch's but for the last bit of some norms (their float32 sums add up in another order)
            and the attention's probabilities (float32, not rounded to bfloat16).
    """

    context_len: int = 1024
    max_batch_size: int = 32
    add_special_tokens: bool | None = None
    prefix_cache_bytes: int = 512 * 1024 * 1024
    max_prefill_tokens: int = 256
    max_decode_slowdown: float | None = 2.5
    fused_decoder: bool = True
    weight_quantization: str | None = None
    quantization_group_size: int = 32
    cpu_kernels: bool | None = None

    def __post_init__(self) -> None:
        _check(self.context_len >= 2, "context_len", self.context_len, "must be >= 2")
        _check(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be >= 1")
        _check(self.prefix_cache_bytes >= 0, "prefix_cache_bytes", self.prefix_cache_bytes, "must be >= 0")
        _check(self.max_prefill_tokens >= 1, "max_prefill_tokens", self.max_prefill_tokens, "must be >= 1")
        _check(self.max_decode_slowdown is None or self.max_decode_slowdown > 1.0, "max_decode_slowdown",
               self.max_decode_slowdown, "must be None or > 1")  # fmt: skip
        _check(self.weight_quantization in (None, *WEIGHT_QUANTIZATIONS), "weight_quantization",
               self.weight_quantization, f"must be None, {' or '.join(map(repr, WEIGHT_QUANTIZATIONS))}")  # fmt: skip
        groups = (32, 64, 128, 256)
        _check(self.quantization_group_size in groups, "quantization_group_size", self.quantization_group_size,
               "must be 32, 64, 128 or 256")  # fmt: skip


@dataclass(frozen=True)
class AdmissionConfig:
    """Load control: how many generations run at once and how many may wait.

    Attributes:
        max_concurrency: the seed's ``num_of_concurrent_executions``.
        max_queue_size: requests that may wait beyond the running ones; the next is rejected at once.
        reject_as_http_error: the seed's ``too_many_request_as_http_error``: 429 + Retry-After instead of 200.
        fair: serve the waiting line fairly across users (see ``admission/fair_queue.py``): a freed slot goes to the
            waiting user with the fewest generations running. False: one first-come, first-served line for all.
        max_running_per_user: a hard cap on one user's running generations (slots may stay idle because of it).
            None (the default): no hard cap; each user's fair share, max_concurrency / users waiting or running,
            is kept by the order in which freed slots are handed out, and a lone user may use every slot.
    """

    max_concurrency: int = 2
    max_queue_size: int = 5
    reject_as_http_error: bool = False
    fair: bool = True
    max_running_per_user: int | None = None

    def __post_init__(self) -> None:
        _check(self.max_concurrency >= 1, "num_of_concurrent_executions", self.max_concurrency, "must be >= 1")
        _check(self.max_queue_size >= 0, "max_queue_size", self.max_queue_size, "must be >= 0")
        _check(
            self.max_running_per_user is None or self.max_running_per_user >= 1,
            "max_running_per_user",
            self.max_running_per_user,
            "must be >= 1 or None",
        )


class MockType(enum.Enum):
    """What the mock engine answers."""

    ROUND = "round"
    """A fixed set of sentences, chosen by the turn number."""
    LONG = "long"
    """One long text."""
    ECHO = "echo"
    """The user's own input."""
    SCRIPT = "script"
    """The texts of ``MockConfig.script``, one per request in arrival order, starting over after the last (tests
    that need a given output: a tool call, a JSON answer)."""


@dataclass(frozen=True)
class MockConfig:
    """The seed's ``mock_params``: canned answers streamed without a model.

    Attributes:
        type: what to answer (:class:`MockType`).
        initial_wait_sec: delay before the first token.
        time_per_token_sec: delay between tokens.
        script: the answers of the "script" type (at least one).
    """

    type: MockType = MockType.ROUND
    initial_wait_sec: float = 0.0
    time_per_token_sec: float = 0.02
    script: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.type, str):
            try:
                object.__setattr__(self, "type", MockType(self.type))
            except ValueError:
                names = ", ".join(repr(t.value) for t in MockType)
                raise ValueError(f"mock_params type {self.type!r} must be one of {names}") from None
        if isinstance(self.script, str) or not isinstance(self.script, tuple):
            object.__setattr__(self, "script", (self.script,) if isinstance(self.script, str) else tuple(self.script))
        _check(self.initial_wait_sec >= 0, "initial_wait_sec", self.initial_wait_sec, "must be >= 0")
        _check(self.time_per_token_sec >= 0, "time_per_token_sec", self.time_per_token_sec, "must be >= 0")
        _check(all(isinstance(s, str) for s in self.script), "script", self.script, "must be strings")
        if self.type is MockType.SCRIPT:
            _check(bool(self.script), "script", self.script, "must hold at least one answer for type 'script'")

    @classmethod
    def from_seed_params(cls, params: dict[Any, Any] | None) -> MockConfig:
        """Translate the seed's ``mock_params`` dict (whose own default used the builtin ``type`` as a key)."""
        params = dict(params or {})
        kind = params.get("type", params.get(type, "round"))
        return cls(
            type=kind,
            initial_wait_sec=float(params.get("initial_wait_sec", 0.0)),
            time_per_token_sec=float(params.get("time_per_token_sec", cls.time_per_token_sec)),
            script=params.get("script", ()),
        )


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of the chat service that every protocol shares.

    Attributes:
        name: shown in /get_load and the logs.
        model_name: the model id reported by /v1/models.
        locale: "en" or "ja" for the messages that reach people.
        admission: how many generations run at once and how many may wait.
        sampling: the default sampling of every request.
        add_special_tokens: passed to the tokenizer when prompts are encoded (None: decided per prompt class).
        num_gpus: GPUs the model was loaded on (for /get_resource_usage).
        device: the device the model runs on (a ``torch.device``; None when unknown).
        context_len: the model's context in tokens, when the service should fit prompts into it (native chats drop
            their oldest turns, OpenAI requests that do not fit are refused); None leaves prompts to the engine.
        model_type: the model's ``config.model_type`` (picks the tool-call format when the chat template names none).
        tool_call_format: the tool-call format of the model's output (``hermes``, ``llama3_json``, ``mistral``,
            ``functiongemma``, ``pythonic`` or a registered one); None detects it from the chat template.
        freeze_gc_heap: once the engine has started, move every object alive (the libraries, the model) out of the
            garbage collector's sight (``gc.freeze()``), once per process: its full collections then take
            milliseconds instead of the 0.25-0.6 s that stall every stream on a heap of torch, transformers or vLLM.
    """

    name: str = "node:0"
    model_name: str = "chatstream-model"
    locale: str = "en"
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    add_special_tokens: bool | None = None
    num_gpus: int | None = None
    device: Any = None
    context_len: int | None = None
    model_type: str | None = None
    tool_call_format: str | None = None
    freeze_gc_heap: bool = True

    def __post_init__(self) -> None:
        _check(self.locale in ("en", "ja"), "locale", self.locale, "must be 'en' or 'ja'")
        _check(self.num_gpus is None or self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        _check(self.context_len is None or self.context_len >= 2, "context_len", self.context_len, "must be >= 2")


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


def _optional(convert: Callable[[Any], T], value: Any) -> T | None:
    return None if value is None else convert(value)


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")
