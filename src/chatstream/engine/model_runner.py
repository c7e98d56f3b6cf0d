"""The engine's tensor code: the running batch, the model calls, sampling, and the KV kept for the prefix cache.

:meth:`ModelRunner.run` carries out one plan of the scheduler: it drops the rows that left (keeping the KV of those
the prefix cache wants), then prefills the joining sequences into new rows or decodes one token for every row, and
samples. It returns a token per scheduled sequence, or why the model failed on it: a failed prefill is retried row by
row so that only the culprit fails; a failed decode fails every row and drops the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as SequenceABC
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from chatstream.engine import sampler, structured
from chatstream.engine.cpu.fast_path import CpuFastPath, packing_supported
from chatstream.engine.cpu.fused_decoder import FusedDecoder
from chatstream.engine.kv_cache import BatchKVCache, DecodeBatch, RowKV
from chatstream.engine.scheduler import ModelOutput, Release, ScheduledPrefill, SchedulerOutput
from chatstream.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs a transformers causal LM on the engine's left-padded batch, with an explicit 2-D mask and position ids.

    Every forward returns the logits of each row's last position only, so the LM head never runs over a whole
    prompt. On the CPU the linear layers run on oneDNN-prepacked weights and transformers' RMSNorms in one kernel
    (:mod:`chatstream.engine.cpu.fast_path`) unless ``pack_weights`` is False, and supported families run through the
    hand-written :class:`~chatstream.engine.cpu.fused_decoder.FusedDecoder` (checked against transformers' forward
    when it is built) unless ``fused_decoder`` is False. If the fused decoder raises, the runner logs it once and
    uses transformers' forward from then on, redoing that forward.

    Attributes:
        batch: the running rows (None when no sequence runs); only the runner changes it.
        kept: the KV of finished sequences that the scheduler's prefix cache holds, by the sequence's id.
    """

    def __init__(self, model: Any, *, pack_weights: bool = True, fused_decoder: bool = True) -> None:
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
        self.batch: DecodeBatch | None = None
        self.kept: dict[int, RowKV] = {}

    # ---- plans -----------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, plan: SchedulerOutput) -> ModelOutput:
        """Release, then prefill or decode as planned; returns the sampled token (or the error) per sequence."""
        self._release(plan.releases, plan.freed_prefixes)
        if plan.prefills:
            return self._run_prefills(plan.prefills)
        if plan.decodes:
            return self._run_decode(plan.decodes)
        return ModelOutput()

    def reset(self) -> None:
        """Drop the batch and every kept KV."""
        self.batch = None
        self.kept.clear()

    def kv_bytes_per_token(self) -> int:
        """The size of one token's keys and values over all layers, measured on a one-token prefill."""
        with torch.inference_mode():
            batch, _ = self.prefill([[self.pad_token_id]], [0])
        return batch.extract_row(0).num_bytes

    def _release(self, releases: SequenceABC[Release], freed: SequenceABC[int]) -> None:
        """Take the released rows out of the batch (keeping their KV where asked), then free dropped prefixes."""
        if releases:
            if self.batch is None:
                raise RuntimeError("rows released from an empty batch")
            batch = self.batch
            rows = {seq_id: row for row, seq_id in enumerate(batch.seq_ids)}
            leaving = {release.seq_id for release in releases}
            if not leaving <= rows.keys():
                raise RuntimeError(f"released sequences {sorted(leaving - rows.keys())} have no row in the batch")
            for release in releases:
                if release.keep:
                    self.kept[release.seq_id] = batch.extract_row(rows[release.seq_id])
            staying = [row for row, seq_id in enumerate(batch.seq_ids) if seq_id not in leaving]
            if staying:
                batch.filter(staying)
            else:
                self.batch = None
        for owner in freed:
            self.kept.pop(owner, None)

    def _run_prefills(self, prefills: SequenceABC[ScheduledPrefill]) -> ModelOutput:
        """Prefill the hits (on their kept KV) and the plain prefills as two batches; both join the running batch."""
        started = time.perf_counter()
        hits = [p for p in prefills if p.prefix_owner is not None]
        plain = [p for p in prefills if p.prefix_owner is None]
        owners = [p.prefix_owner for p in hits if p.prefix_owner is not None]
        output = ModelOutput()
        try:
            joined = [batch for group in (hits, plain) if group for batch in self._prefill_group(group, output)]
        finally:
            for owner in owners:  # used or failed: the prefix cache no longer has them
                self.kept.pop(owner, None)
        if joined:
            self.batch = DecodeBatch.concatenate([self.batch, *joined] if self.batch is not None else joined)
        logger.debug(
            "prefill of %d rows (%d prompt tokens, %d from the prefix cache): %.0f ms",
            len(prefills),
            sum(len(p.seq.prompt_ids) for p in prefills),
            sum(p.num_cached_tokens for p in prefills),
            (time.perf_counter() - started) * 1e3,
        )
        return output

    def _prefill_group(self, group: list[ScheduledPrefill], output: ModelOutput) -> list[DecodeBatch]:
        """Prefill ``group`` as one batch; if that fails, each sequence alone, so that only the culprit fails."""
        try:
            batch, logits = self._prefill_batch(group)
            batch.next_tokens = self._sample([p.seq for p in group], logits)
        except Exception as exc:
            if len(group) == 1:
                logger.exception("prefill failed for request %s", group[0].seq.request_id)
                output.errors[group[0].seq.seq_id] = f"prefill failed: {exc}"
                return []
            logger.warning("batched prefill failed (%s); retrying the %d sequences one by one", exc, len(group))
            return [batch for prefill in group for batch in self._prefill_group([prefill], output)]
        output.sampled.update(zip(batch.seq_ids, batch.next_tokens.tolist(), strict=True))
        return [batch]

    def _prefill_batch(self, group: list[ScheduledPrefill]) -> tuple[DecodeBatch, torch.Tensor]:
        """One batch of plain prefills, or one of prefills on kept KV (the scheduler never mixes them)."""
        seq_ids = [p.seq.seq_id for p in group]
        owners = [p.prefix_owner for p in group]
        if None in owners:
            return self.prefill([p.seq.prompt_ids for p in group], seq_ids)
        rows = [
            (self.kept[owner], p.num_cached_tokens, p.seq.prompt_ids)
            for owner, p in zip(owners, group, strict=True)
            if owner is not None
        ]
        return self.prefill_on_prefixes(rows, seq_ids)

    def _run_decode(self, decodes: SequenceABC[Sequence]) -> ModelOutput:
        batch = self.batch
        by_id = {seq.seq_id: seq for seq in decodes}
        if batch is None or set(batch.seq_ids) != by_id.keys():
            raise RuntimeError("the planned decodes are not the rows of the batch")
        seqs = [by_id[seq_id] for seq_id in batch.seq_ids]
        try:
            logits = self.decode(batch)
            tokens = self._sample(seqs, logits)
        except Exception as exc:
            logger.exception("decode step failed; failing the %d running requests", len(seqs))
            self.batch = None
            return ModelOutput(errors={seq.seq_id: f"decode failed: {exc}" for seq in seqs})
        batch.next_tokens = tokens
        return ModelOutput(sampled=dict(zip(batch.seq_ids, tokens.tolist(), strict=True)))

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

    # ---- batches ---------------------------------------------------------------------------------------------------

    def prefill(
        self, prompts: SequenceABC[SequenceABC[int]], seq_ids: SequenceABC[int] | None = None
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """Prefill ``prompts`` together (left-padded to the longest); returns their batch (rows named by
        ``seq_ids``, default ``0..n-1``) and the logits ``[n, V]``."""
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, length - len(prompt) :] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = BatchKVCache(self.num_layers)
        logits = self._forward(input_ids, position_ids, mask, cache)
        positions = position_ids[:, -1] + 1
        ids = list(range(len(prompts))) if seq_ids is None else list(seq_ids)
        return DecodeBatch(cache, mask, positions, torch.zeros_like(positions), ids), logits

    def prefill_on_prefixes(
        self, rows: SequenceABC[tuple[RowKV, int, SequenceABC[int]]], seq_ids: SequenceABC[int] | None = None
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """Prefill several sequences together on top of their cached KV.

        Each row is ``(prefix, num_cached, prompt)``: the first ``num_cached`` prompt tokens have KV in ``prefix``.
        All rows run the same number of new tokens, the longest uncached part; a row whose uncached part is shorter
        uses only ``len(prompt) - width`` cached tokens (the scheduler plans it so), which keeps every row
        contiguous (the sliding-window masks rely on it). Returns the batch and the logits ``[n, V]``.
        """
        width = max(len(prompt) - cached for _, cached, prompt in rows)
        used = [max(len(prompt) - width, 0) for _, _, prompt in rows]
        cached = max(used)
        cache = BatchKVCache.from_rows([(prefix, n) for (prefix, _, _), n in zip(rows, used, strict=True)])
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), cached + width), dtype=torch.bool)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ((_, _, prompt), n) in enumerate(zip(rows, used, strict=True)):
            fed = len(prompt) - n
            input_ids[row, width - fed :] = torch.tensor(list(prompt[n:]), dtype=torch.long)
            mask[row, cached - n :] = True
            mask[row, cached : cached + width - fed] = False
            position_ids[row, width - fed :] = torch.arange(n, len(prompt))
        input_ids, mask, position_ids = input_ids.to(self.device), mask.to(self.device), position_ids.to(self.device)
        logits = self._forward(input_ids, position_ids, mask, cache)
        positions = torch.tensor([len(prompt) for _, _, prompt in rows], dtype=torch.long, device=self.device)
        ids = list(range(len(rows))) if seq_ids is None else list(seq_ids)
        return DecodeBatch(cache, mask, positions, torch.zeros_like(positions), ids), logits

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One step for every row: feed ``batch.next_tokens``; returns logits ``[B, V]`` and advances the batch."""
        ones = torch.ones((batch.size, 1), dtype=torch.bool, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        logits = self._forward(
            batch.next_tokens.unsqueeze(1), batch.positions.unsqueeze(1), batch.attention_mask, batch.cache
        )
        batch.positions = batch.positions + 1
        return logits

    # ---- forward ---------------------------------------------------------------------------------------------------

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchKVCache
    ) -> torch.Tensor:
        if self.fused is not None:
            lengths = cache.lengths()
            try:
                return self.fused(input_ids, positions, mask, cache)
            except Exception:
                logger.warning("the fused decoder failed; using transformers' forward from now on", exc_info=True)
                self.fused = None
                cache.restore(lengths)  # some layers may hold the failed forward's keys and values
        return self.transformers_forward(input_ids, positions, mask, cache)

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


def _num_cache_layers(model: Any) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)
