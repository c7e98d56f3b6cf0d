"""Settings of the vLLM engine and our sampling as vLLM's: what :class:`~chatstream.engine.vllm_engine.VLLMEngine`
passes to vLLM. Importing this module does not need vLLM (``vllm_sampling`` imports it when called)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from chatstream.config import RepetitionPenaltyMethod, SamplingParams

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""ChatStream's short dtype names (``--dtype bf16``) as vLLM spells them."""

_OWN_ARGS = frozenset({"model", "disable_log_stats", "enable_log_requests"})
"""AsyncEngineArgs fields the engine sets itself; ``engine_args`` may not override them."""


@dataclass(frozen=True)
class VLLMConfig:
    """Settings of the vLLM engine (each maps to the ``vllm serve`` option of the same name).

    Attributes:
        dtype: weights and activations dtype: "auto", "float32", "bfloat16", "float16" (or "fp32", "bf16", "fp16").
        max_model_len: tokens per sequence (prompt + generated); None takes the model's. Longer prompts are cut
            from the left, keeping room for ``max_new_tokens``, as in our own engine.
        max_num_seqs: the most sequences in one batch.
        tensor_parallel_size: GPUs the model is split over (ChatStream's ``num_gpus``).
        gpu_memory_utilization: the share of GPU memory vLLM may take (weights + KV cache).
        kv_cache_memory_bytes: the KV cache size; overrides ``gpu_memory_utilization`` (set it on the CPU build).
        block_size: tokens per KV cache block (None: vLLM's default); prefix caching reuses whole blocks.
        max_num_batched_tokens: tokens processed in one step (None: vLLM's default).
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes (a conversation's earlier turns).
        enforce_eager: skip CUDA graphs / torch.compile (faster start, slower steps).
        tokenizer: a tokenizer folder or id; None uses the model's.
        add_special_tokens: passed to the tokenizer for requests that leave it None (None: the tokenizer's default).
        trust_remote_code: allow model code from the checkpoint.
        quantization: vLLM's quantization method name, e.g. "awq", "gptq", "fp8"; None for none.
        seed: vLLM's global seed (a request's own seed still fixes its sample).
        engine_args: further ``vllm.AsyncEngineArgs`` fields as (name, value) pairs, for what has no field here;
            names are checked against vLLM's when the engine starts.
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    block_size: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tokenizer: str | None = None
    add_special_tokens: bool | None = None
    trust_remote_code: bool = False
    quantization: str | None = None
    seed: int = 0
    engine_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _DTYPES.get(self.dtype, self.dtype))
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", self.dtype)
        if not isinstance(self.engine_args, tuple):
            object.__setattr__(self, "engine_args", tuple(dict(self.engine_args).items()))
        _check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", self.max_model_len)
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs)
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size)
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", self.gpu_memory_utilization)
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes", 0)
        _check(self.block_size is None or self.block_size >= 1, "block_size", self.block_size)
        for name, _ in self.engine_args:
            _check(name not in _OWN_ARGS, "engine_args", name, "is set by the engine itself")

    def engine_kwargs(self, model: str) -> dict[str, Any]:
        """The ``AsyncEngineArgs`` fields for ``model``."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("engine_args", "add_special_tokens"):
            kwargs.pop(name)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.update(self.engine_args, model=model, disable_log_stats=True)
        return kwargs


def check_sampling(sampling: SamplingParams) -> None:
    """ValueError naming the field when vLLM cannot sample as asked."""
    if sampling.repetition_penalty_method is RepetitionPenaltyMethod.SUBTRACTIVE and sampling.repetition_penalty:
        raise ValueError(
            "repetition_penalty_method='subtractive' is not supported by the vLLM engine (vLLM's repetition_penalty "
            "is multiplicative); use 'multiplicative' or presence_penalty"
        )


def vllm_sampling(sampling: SamplingParams, max_new_tokens: int) -> Any:
    """Our SamplingParams as vLLM's: token output only (our detokenizer applies stop strings), deltas streamed."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    check_sampling(sampling)
    return VLLMSamplingParams(
        max_tokens=max_new_tokens,
        temperature=0.0 if sampling.greedy else sampling.temperature,
        top_k=sampling.top_k or 0,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty or 1.0,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        seed=sampling.seed,
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


def _check(ok: bool, name: str, value: object, rule: str = "is out of range") -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")
