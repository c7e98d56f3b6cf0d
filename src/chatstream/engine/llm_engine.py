"""The engine without its thread: requests go in, and each :meth:`LLMEngine.step` gives the deltas it produced.

:class:`LLMEngine` turns a request into a :class:`~chatstream.engine.sequence.Sequence` (tokenized, truncated to the
context, with its stop ids, detokenizer and random generator). A step asks the scheduler for a plan, lets the model
runner carry it out, and hands the sampled tokens back to the scheduler, which appends them and decides the stops.
Nothing here is thread-safe or asynchronous: :mod:`chatstream.engine.async_engine` runs it in a thread of its own,
and tests drive it directly.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from chatstream.config import EngineConfig
from chatstream.engine import sampler
from chatstream.engine.base import Delta, EngineStats, FinishReason, GenerationRequest
from chatstream.engine.detokenizer import IncrementalDetokenizer
from chatstream.engine.grammar import GrammarSpec
from chatstream.engine.model_runner import ModelRunner
from chatstream.engine.scheduler import Scheduler
from chatstream.engine.sequence import Sequence, eos_token_ids, stop_token_ids, truncate_prompt
from chatstream.engine.structured import LazyGrammarCompiler

logger = logging.getLogger(__name__)


class RequestOutput(NamedTuple):
    """One delta of one request."""

    request_id: str
    delta: Delta


class LLMEngine:
    """Continuous batching on a transformers causal LM, stepped by its caller.

    Args:
        model: a causal LM (eval mode; on the device it should run on).
        tokenizer: its tokenizer (``encode``/``decode``, ``eos_token_id``).
        config: batch size, context length, prefill budget, prefix-cache budget, fused decoder.
        pack_weights: on the CPU, run the linear layers on oneDNN-prepacked weights where this CPU supports their
            dtype (see :class:`~chatstream.engine.model_runner.ModelRunner`).
    """

    def __init__(
        self, model: Any, tokenizer: Any, config: EngineConfig | None = None, *, pack_weights: bool = True
    ) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.model_runner = ModelRunner(
            model,
            pack_weights=pack_weights,
            fused_decoder=self.config.fused_decoder,
            quantization=self.config.weight_quantization,
            quantization_group_size=self.config.quantization_group_size,
            cpu_kernels=self.config.cpu_kernels,
        )
        kv_bytes_per_token = self.model_runner.kv_bytes_per_token()
        self.scheduler = Scheduler(self.config, kv_bytes_per_token if self.config.prefix_cache_bytes > 0 else 0)
        full_batch = self.config.max_batch_size * self.config.context_len * kv_bytes_per_token
        self.kv_reserve_bytes = self.config.prefix_cache_bytes + full_batch
        """The memory the engine's KV grows into (``cpu.runtime.reserve_memory``): the prefix cache's budget and a
        full batch at full context."""
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.grammars = LazyGrammarCompiler(tokenizer, self.model_runner.vocab_size, sorted(self.eos_token_ids))

    def add_request(self, request: GenerationRequest) -> list[RequestOutput]:
        """Queue ``request``. Returns its last (ERROR) delta at once when it cannot be served, else nothing."""
        try:
            seq = self._sequence(request)
        except Exception as exc:
            logger.warning("request %s rejected: %s", request.request_id, exc)
            delta = Delta(text="", finish_reason=FinishReason.ERROR, error=str(exc))
            return [RequestOutput(request.request_id, delta)]
        self.scheduler.add(seq)
        return []

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """End the request with ABORT (its last delta); unknown or finished ids give nothing."""
        seq = self.scheduler.abort(request_id)
        return [] if seq is None else [_output(seq)]

    def has_work(self) -> bool:
        """True while a step has something to do."""
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, and append the sampled tokens; returns one delta per scheduled request."""
        plan = self.scheduler.schedule()
        started = time.perf_counter()
        output = self.model_runner.run(plan)
        self.scheduler.observe(plan, time.perf_counter() - started)
        return [_output(seq) for seq in self.scheduler.update_from_output(plan, output)]

    def abort_all(self) -> list[RequestOutput]:
        """End every request with ABORT and drop every kept KV (the engine is stopping)."""
        seqs = self.scheduler.finish_all(FinishReason.ABORT)
        self.model_runner.reset()
        return [_output(seq) for seq in seqs]

    def fail_running(self, error: str) -> list[RequestOutput]:
        """End every running request with ERROR and drop the batch and the kept KV (after a step raised, their
        state is unknown); waiting requests stay queued."""
        seqs = self.scheduler.finish_all(FinishReason.ERROR, error, waiting=False)
        self.model_runner.reset()
        return [_output(seq) for seq in seqs]

    def stats(self) -> EngineStats:
        """The load and the totals (approximate when read from another thread during a step)."""
        scheduler, cache = self.scheduler, self.scheduler.prefix_cache
        return EngineStats(
            num_running=len(scheduler.running) + len(scheduler.prefilling),
            num_waiting=len(scheduler.waiting),
            num_generated_tokens_total=scheduler.num_generated_tokens_total,
            num_prompt_tokens_total=scheduler.num_prompt_tokens_total,
            num_cached_tokens_total=scheduler.num_cached_tokens_total,
            prefix_cache_bytes=cache.num_bytes,
            prefix_cache_entries=len(cache),
            prefix_cache_max_bytes=cache.max_bytes,
            prefix_cache_tokens=cache.num_tokens,
            prefix_cache_queries_total=scheduler.num_prefix_queries_total,
            prefix_cache_hits_total=scheduler.num_prefix_hits_total,
            prefix_cache_evictions_total=cache.num_evicted_nodes,
            num_prefill_chunks_total=scheduler.num_prefill_chunks_total,
        )

    def _sequence(self, request: GenerationRequest) -> Sequence:
        """Tokenize, truncate and validate the prompt; set up the stop ids, detokenizer and generator."""
        params = request.sampling
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        else:
            ids = self._encode(request.prompt, request.add_special_tokens)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.model_runner.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab_size})")
        prompt_ids, max_new_tokens = truncate_prompt(ids, params.max_new_tokens, self.config.context_len)
        return Sequence(
            request=request,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids(params.stop_token_ids, self.eos_token_ids, params.ignore_eos),
            detokenizer=IncrementalDetokenizer(
                self.tokenizer,
                prompt_ids,
                stop=params.stop,
                replacements=request.output_replacements,
                skip_special_tokens=request.skip_special_tokens,
            ),
            generator=sampler.make_generator(params.seed),
            matcher=None if request.grammar is None else self.grammars.matcher(request.grammar),
            token_piece=None if request.logprobs is None else self.token_piece,
        )

    def validate_grammar(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` (building the token table first if need be) or raise ValueError naming its field."""
        self.grammars.validate(spec)

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """One token as the logprobs show it: its text (a piece of a multi-byte character decodes to U+FFFD) and
        its bytes (exact where the grammar compiler's token table is built, else the text's UTF-8)."""
        text = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
        return text, self.grammars.token_bytes(token_id) or text.encode()

    def _encode(self, prompt: str, add_special_tokens: bool | None) -> list[int]:
        special = self.config.add_special_tokens if add_special_tokens is None else add_special_tokens
        kwargs = {} if special is None else {"add_special_tokens": special}
        ids = list(self.tokenizer.encode(prompt, **kwargs))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return ids or ([bos] if bos is not None else [])


def _output(seq: Sequence) -> RequestOutput:
    return RequestOutput(seq.request_id, seq.take_delta())
