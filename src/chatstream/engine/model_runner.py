"""The engine's tensor code: the running batch, the prefill group, the model calls, sampling, and the prefix cache's KV.

:meth:`ModelRunner.run` carries out one plan of the scheduler: it copies KV into the prefix cache and frees what the
cache dropped, takes the rows that left out of the batch, starts a new prefill group on its cached prefixes, then runs
one forward: a decode of every running row together with the next chunk of the prefill group (their tokens share the
matrix products; each attends to its own cache). After the group's last chunk its rows get their first token and join
the running rows. It returns a token per scheduled sequence, or why the model failed on it: a forward that fails is
redone part by part, and a failed group of several rows row by row, so that only the culprit fails; a failed decode
fails the running rows of its decode group and drops that group.

The running rows live in a few decode groups (:class:`~chatstream.engine.kv_cache.DecodeBatch`), each left-padded to
its own width, that decode in the same forward. A prefilled group joins as a decode group of its own, without a
copy; groups are merged (one copy of both) only when there are more than :data:`MAX_DECODE_GROUPS`, the pair whose
merge adds the least padding first. So a long prompt joining short chats neither widens their rows to its length nor
copies their KV (on a CPU, allocating and touching that memory took longer than a prefill chunk; see
docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from chatstream.engine import sampler, structured
from chatstream.engine.cpu import w8a8
from chatstream.engine.cpu.fast_path import CpuFastPath, packing_supported
from chatstream.engine.cpu.fused_decoder import FusedDecoder
from chatstream.engine.kv_cache import BatchKVCache, DecodeBatch, ForwardGroup, RowKV
from chatstream.engine.prefill_group import PrefillGroup
from chatstream.engine.scheduler import CacheOp, KeepKV, ModelOutput, PrefillChunk, ScheduledPrefill, SchedulerOutput
from chatstream.engine.sequence import Sequence

logger = logging.getLogger(__name__)

MAX_DECODE_GROUPS = 4
"""The most decode groups the running rows are kept in (with the fused decoder; transformers' forward runs a model
call per group, so without the fused decoder the rows are kept in one). Each group costs an attention call per layer
and a mask per step; a merge costs a copy of both groups' KV."""


class ModelRunner:
    """Runs a transformers causal LM on the engine's left-padded batches, with explicit 2-D masks and position ids.

    Every forward returns the logits of each row's last position only, so the LM head never runs over a whole
    prompt. On the CPU the linear layers run on oneDNN-prepacked weights and transformers' RMSNorms in one kernel
    (:mod:`chatstream.engine.cpu.fast_path`) unless ``pack_weights`` is False, and supported families run through the
    hand-written :class:`~chatstream.engine.cpu.fused_decoder.FusedDecoder` (checked against transformers' forward
    when it is built) unless ``fused_decoder`` is False; ``quantization`` (``"int8"``/``"int4"``/``"w8a8"``) gives
    the fused decoder quantized linear layers (:mod:`chatstream.engine.cpu.quantized`). If the fused decoder raises,
    the runner logs it once and uses transformers' forward from then on, redoing that forward.

    Attributes:
        batches: the running rows, in decode groups (empty when no sequence runs); only the runner changes them.
        group: the rows being prefilled (None between groups).
        kept: the prefix cache's KV segments, by node id.
    """

    def __init__(
        self,
        model: Any,
        *,
        pack_weights: bool = True,
        fused_decoder: bool = True,
        quantization: str | None = None,
        quantization_group_size: int = 32,
        cpu_kernels: bool | None = None,
    ) -> None:
        self.model = model
        self.fast_path = CpuFastPath.for_model(model) if pack_weights and packing_supported(model) else None
        self.device = model.device
        self.num_layers = _num_cache_layers(model)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.pad_token_id = 0
        self.fused: FusedDecoder | None = None
        if fused_decoder:
            self.fused = FusedDecoder.for_model(
                model, self.transformers_forward, fast_path=self.fast_path, pack=pack_weights
            )
        if self.fused is not None:
            ops = w8a8.chosen_layer_ops(cpu_kernels, self.fused.dtype, quantization)
            if ops is not None:
                self.fused.use_ops(model, ops)
            if quantization is not None:
                self.fused.quantize(model, quantization, quantization_group_size)
        elif quantization is not None:
            logger.warning("weight quantization needs the fused decoder; the model runs unquantized")
        self.batches: list[DecodeBatch] = []
        self.group: PrefillGroup | None = None
        self.kept: dict[int, RowKV] = {}

    # ---- plans -----------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, plan: SchedulerOutput) -> ModelOutput:
        """Cache operations, releases, a new group, then one forward of the decodes and the chunk."""
        self._apply_cache_ops(plan.cache_ops)
        self._release(plan.releases)
        if plan.cancel_group:
            self.group = None
        output = ModelOutput()
        if plan.group:
            self._start_group(plan.group, output)
        self._step(plan, output)
        return output

    def reset(self) -> None:
        """Drop the batch, the prefill group and every kept KV."""
        self.batches = []
        self.group = None
        self.kept.clear()

    @property
    def seq_ids(self) -> list[int]:
        """The sequence id of every running row, group after group (the order of a decode's tokens)."""
        return [seq_id for batch in self.batches for seq_id in batch.seq_ids]

    def _row_of(self, seq_id: int) -> tuple[DecodeBatch, int] | None:
        for batch in self.batches:
            if seq_id in batch.seq_ids:
                return batch, batch.seq_ids.index(seq_id)
        return None

    def kv_bytes_per_token(self) -> int:
        """The size of one token's keys and values over all layers, measured on a one-token prefill."""
        with torch.inference_mode():
            batch, _ = self.prefill([[self.pad_token_id]], [0])
        return batch.extract_row(0).num_bytes

    def _apply_cache_ops(self, ops: SequenceABC[CacheOp]) -> None:
        for op in ops:
            if isinstance(op, KeepKV):
                found = self._row_of(op.seq_id)
                if found is None:
                    raise RuntimeError(f"KV of sequence {op.seq_id} to cache, but it has no row in the batch")
                batch, row = found
                self.kept[op.node_id] = batch.extract_row(row, op.start, op.end)
            else:
                self.kept.pop(op.node_id, None)

    def _release(self, releases: SequenceABC[int]) -> None:
        """Take the released rows out of their decode groups (a group left empty goes, without a copy)."""
        if not releases:
            return
        leaving = set(releases)
        unknown = leaving - set(self.seq_ids)
        if unknown:
            raise RuntimeError(f"released sequences {sorted(unknown)} have no row in the batch")
        kept = []
        for batch in self.batches:
            staying = [row for row, seq_id in enumerate(batch.seq_ids) if seq_id not in leaving]
            if len(staying) < batch.size and staying:
                batch.filter(staying)
            if staying:
                kept.append(batch)
        self.batches = kept

    def _start_group(self, prefills: SequenceABC[ScheduledPrefill], output: ModelOutput) -> None:
        try:
            self.group = PrefillGroup.build(prefills, self.kept, self.num_layers, self.pad_token_id, self.device)
        except Exception as exc:  # a prefix the cache no longer has is a bug; fail the group, keep serving
            logger.exception("could not set up the prefill of %d sequences", len(prefills))
            output.errors.update({p.seq.seq_id: f"prefill failed: {exc}" for p in prefills})

    # ---- one forward -----------------------------------------------------------------------------------------------

    def _step(self, plan: SchedulerOutput, output: ModelOutput) -> None:
        """The decode of the running rows (a part per decode group) and the group's chunk, as one forward."""
        seqs = self._decode_rows(plan.decodes)
        batches = list(self.batches) if seqs else []
        group, chunk = self.group, plan.chunk
        parts = [self._decode_part(batch) for batch in batches]
        if group is not None and chunk is not None:
            parts.append(group.chunk(chunk.start, chunk.end))
        results = self._forward_parts(parts)
        if batches:
            self._finish_decode(batches, seqs, results[: len(batches)], output)
        if group is not None and chunk is not None:
            self._finish_chunk(group, chunk, results[len(batches)], output)

    def _decode_rows(self, decodes: SequenceABC[Sequence]) -> list[Sequence]:
        """The planned decodes in row order (group after group)."""
        if not decodes:
            return []
        ids, by_id = self.seq_ids, {seq.seq_id: seq for seq in decodes}
        if len(ids) != len(by_id) or set(ids) != by_id.keys():
            raise RuntimeError("the planned decodes are not the rows of the batch")
        return [by_id[seq_id] for seq_id in ids]

    def _decode_part(self, batch: DecodeBatch) -> ForwardGroup:
        ones = torch.ones((batch.size, 1), dtype=torch.bool, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        tokens, positions = batch.next_tokens.unsqueeze(1), batch.positions.unsqueeze(1)
        return ForwardGroup(tokens, positions, batch.attention_mask, batch.cache, decode=True)

    def _finish_decode(
        self,
        batches: list[DecodeBatch],
        seqs: list[Sequence],
        results: SequenceABC[torch.Tensor | Exception | None],
        output: ModelOutput,
    ) -> None:
        """Sample every decode group whose forward ran, together; a group whose forward failed (or all of them, if
        sampling fails) fails its rows and leaves."""
        good: list[tuple[DecodeBatch, list[Sequence], torch.Tensor]] = []
        failed: list[tuple[DecodeBatch, list[Sequence], Exception]] = []
        start = 0
        for batch, result in zip(batches, results, strict=True):
            rows, start = seqs[start : start + batch.size], start + batch.size
            if isinstance(result, Exception):
                failed.append((batch, rows, result))
            else:
                assert result is not None
                good.append((batch, rows, result))
        if good:
            try:
                logits = good[0][2] if len(good) == 1 else torch.cat([logits for _, _, logits in good])
                tokens = self._sample([seq for _, rows, _ in good for seq in rows], logits)
            except Exception as sampling_error:
                failed += [(batch, rows, sampling_error) for batch, rows, _ in good]
            else:
                for (batch, _, _), batch_tokens in zip(good, tokens.split([b.size for b, _, _ in good]), strict=True):
                    batch.positions = batch.positions + 1
                    batch.next_tokens = batch_tokens
                    output.sampled.update(zip(batch.seq_ids, batch_tokens.tolist(), strict=True))
        for _, rows, error in failed:
            logger.error("decode step failed; failing the %d running requests of its group", len(rows), exc_info=error)
            output.errors.update({seq.seq_id: f"decode failed: {error}" for seq in rows})
        if failed:
            self.batches = [b for b in self.batches if not any(b is f for f, _, _ in failed)]

    def _finish_chunk(
        self, group: PrefillGroup, chunk: PrefillChunk, result: torch.Tensor | Exception | None, output: ModelOutput
    ) -> None:
        """After a chunk: nothing until the last; then sample and join the batch (a failure drops the group; a
        failed group of several rows is redone row by row)."""
        if not isinstance(result, Exception) and not chunk.final:
            return
        self.group = None
        try:
            if isinstance(result, Exception):
                raise result
            assert result is not None
            self._join(group, self._sample([p.seq for p in group.prefills], result), output)
        except Exception as exc:
            if len(group.prefills) == 1 or not (chunk.start == 0 and chunk.final):
                logger.exception("prefill failed for %d sequences", len(group.prefills))
                output.errors.update({seq_id: f"prefill failed: {exc}" for seq_id in group.seq_ids})
                return
            logger.warning("batched prefill failed (%s); retrying the %d sequences one by one", exc, len(group.seq_ids))
            for prefill in group.prefills:
                self._prefill_alone(prefill, output)

    def _prefill_alone(self, prefill: ScheduledPrefill, output: ModelOutput) -> None:
        group = PrefillGroup.build([prefill], self.kept, self.num_layers, self.pad_token_id, self.device)
        (result,) = self._forward_parts([group.chunk(0, group.width)])
        self._finish_chunk(group, PrefillChunk(0, group.width, group.width), result, output)

    def _join(self, group: PrefillGroup, tokens: torch.Tensor, output: ModelOutput) -> None:
        joined = group.to_batch(tokens)
        self.batches.append(joined)
        limit = MAX_DECODE_GROUPS if self.fused is not None else 1
        while len(self.batches) > limit:
            self._merge_closest()
        output.sampled.update(zip(joined.seq_ids, tokens.tolist(), strict=True))

    def _merge_closest(self) -> None:
        """Merge the two decode groups whose merge adds the least padding (the smaller copy on a tie)."""
        pairs = [(i, j) for i in range(len(self.batches)) for j in range(i + 1, len(self.batches))]
        i, j = min(pairs, key=lambda p: _merge_cost(self.batches[p[0]], self.batches[p[1]]))
        merged = DecodeBatch.concatenate([self.batches[i], self.batches[j]])
        self.batches[i] = merged
        del self.batches[j]

    def _sample(self, seqs: SequenceABC[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row: grammar masks first (constrained rows), then the sampler; the logprobs a
        sequence asked for are left on it for :meth:`Sequence.append_token`."""
        matchers = [s.matcher for s in seqs]
        if any(m is not None for m in matchers):
            structured.apply_masks(logits, matchers)  # in place: these logits are this step's own
        tokens, logprobs = sampler.sample_with_logprobs(
            logits,
            [s.sampling for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
            [s.generator for s in seqs],
            [s.num_logprobs for s in seqs],
        )
        for seq, row in zip(seqs, logprobs, strict=True):
            seq.sampled_logprobs = row
        return tokens

    def _forward_parts(self, parts: list[ForwardGroup]) -> list[torch.Tensor | Exception | None]:
        """Each part's logits (None where not wanted), or the exception its forward raised: the parts run as one
        forward, and if that fails, one by one on their caches as they were."""
        if not parts:
            return []
        lengths = [part.cache.lengths() for part in parts]
        try:
            return list(self._forward(parts))
        except Exception as exc:
            if len(parts) == 1:
                return [exc]
            for part, before in zip(parts, lengths, strict=True):
                part.cache.restore(before)
            return [self._forward_parts([part])[0] for part in parts]

    # ---- standalone batches (kv_bytes_per_token, benchmarks, tests) ------------------------------------------------

    def prefill(
        self, prompts: SequenceABC[SequenceABC[int]], seq_ids: SequenceABC[int] | None = None
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """Prefill ``prompts`` together in one forward (left-padded to the longest); returns their batch (rows named
        by ``seq_ids``, default ``0..n-1``) and the logits ``[n, V]``."""
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, length - len(prompt) :] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = BatchKVCache(self.num_layers)
        (logits,) = self._forward([ForwardGroup(input_ids, position_ids, mask, cache)])
        assert logits is not None
        positions = position_ids[:, -1] + 1
        ids = list(range(len(prompts))) if seq_ids is None else list(seq_ids)
        return DecodeBatch(cache, mask, positions, torch.zeros_like(positions), ids), logits

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One step for every row: feed ``batch.next_tokens``; returns logits ``[B, V]`` and advances the batch."""
        ones = torch.ones((batch.size, 1), dtype=torch.bool, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        tokens, positions = batch.next_tokens.unsqueeze(1), batch.positions.unsqueeze(1)
        (logits,) = self._forward([ForwardGroup(tokens, positions, batch.attention_mask, batch.cache, decode=True)])
        assert logits is not None
        batch.positions = batch.positions + 1
        return logits

    # ---- forward ---------------------------------------------------------------------------------------------------

    def _forward(self, parts: SequenceABC[ForwardGroup]) -> list[torch.Tensor | None]:
        """One forward of every part (the fused decoder runs them together; transformers one after the other)."""
        if self.fused is not None:
            lengths = [part.cache.lengths() for part in parts]
            try:
                return self.fused.forward(parts)
            except Exception:
                logger.warning("the fused decoder failed; using transformers' forward from now on", exc_info=True)
                self.fused = None
                for part, before in zip(parts, lengths, strict=True):
                    part.cache.restore(before)  # some layers may hold the failed forward's keys and values
        results: list[torch.Tensor | None] = []
        for part in parts:
            logits = self.transformers_forward(part.input_ids, part.positions, part.mask, part.cache)
            results.append(logits if part.logits else None)
        return results

    def transformers_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchKVCache
    ) -> torch.Tensor:
        """The model's own forward (through the fast path where installed): logits ``[B, V]`` of the last tokens."""
        with self._packed_context():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _packed_context(self) -> AbstractContextManager[None]:
        return self.fast_path.active() if self.fast_path is not None else nullcontext()


def _merge_cost(a: DecodeBatch, b: DecodeBatch) -> tuple[int, int]:
    """(the padding columns a merge of ``a`` and ``b`` adds, the columns it copies)."""
    width_a, width_b = a.attention_mask.shape[1], b.attention_mask.shape[1]
    width = max(width_a, width_b)
    return (a.size + b.size) * width - a.size * width_a - b.size * width_b, (a.size + b.size) * width


def _num_cache_layers(model: Any) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)
