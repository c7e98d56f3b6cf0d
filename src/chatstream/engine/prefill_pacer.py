"""How many prompt tokens a step may prefill beside the running streams' decode: a budget in time, not only tokens.

A prefill chunk runs in the same forward as the decode of every running row, so each running stream waits for it.
:class:`PrefillPacer` learns from the steps it is shown (their wall time, how many rows decoded, how many prompt
tokens were prefilled) what a step without a chunk costs and what one prompt token adds, and sizes the next chunk so
that the step takes at most ``max_slowdown`` times a plain decode step: a long prompt joining a busy batch is then
prefilled in small chunks (the streams keep their pace), and at full ``max_tokens`` when nothing decodes. When more
users wait for their first token than stream (eight users arrive with the same long system prompt, and the first one
already streams), the allowed slowdown grows by their ratio: the chunk then delays each stream for more users' first
tokens than there are streams.

On a fast prefill (a GPU, a CPU with AMX) the time budget allows the whole ``max_tokens``; on a slow one it is what
keeps the streams' inter-token gap bounded. The estimates are medians of the last :data:`WINDOW` steps, so they
follow the batch growing, the contexts lengthening and the machine's load, and one slow step (a burst of page
faults, a garbage collection, rows joining) does not move them.
"""

from __future__ import annotations

import statistics
from collections import deque

MIN_CHUNK_TOKENS = 16
"""The smallest chunk the pacer gives, so that a joining prompt always advances at a useful rate."""

WINDOW = 8
"""Steps each estimate is the median of."""


class PrefillPacer:
    """The per-step prefill budget: ``max_tokens``, reduced while rows decode to what keeps a step within
    ``max_slowdown`` times a decode-only step (None: ``max_tokens`` always).

    Args:
        max_tokens: the most padded prompt tokens of one step (``EngineConfig.max_prefill_tokens``).
        max_slowdown: how much longer than a decode-only step a step with a chunk may take (> 1), or None.
    """

    def __init__(self, max_tokens: int, max_slowdown: float | None) -> None:
        self.max_tokens = max_tokens
        self.max_slowdown = max_slowdown
        self._decode_steps: deque[float] = deque(maxlen=WINDOW)
        self._token_costs: deque[float] = deque(maxlen=WINDOW)

    @property
    def decode_s(self) -> float | None:
        """A decode-only step's wall time: the median of the last ones (None before the first)."""
        return statistics.median(self._decode_steps) if self._decode_steps else None

    @property
    def token_s(self) -> float | None:
        """What one prefilled token adds to a step: the median of the last chunks' (None before the first)."""
        return statistics.median(self._token_costs) if self._token_costs else None

    def budget(self, decoding: int, waiting: int = 0) -> int:
        """Padded prompt tokens the next step may prefill beside ``decoding`` running rows, while ``waiting`` users
        wait for their first token (the prefill group's and the queue's). When they outnumber the running rows the
        step may slow the streams by ``waiting / decoding`` times as much: the delay a chunk adds to each stream
        buys a first token for more users than it delays."""
        decode_s, token_s = self.decode_s, self.token_s
        if not decoding or self.max_slowdown is None or decode_s is None or not token_s:
            return self.max_tokens
        share = max(1.0, waiting / decoding)
        tokens = int((self.max_slowdown - 1.0) * share * decode_s / token_s)
        return max(min(MIN_CHUNK_TOKENS, self.max_tokens), min(self.max_tokens, tokens))

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from a step that decoded ``num_decodes`` rows and prefilled ``num_prefill_tokens`` padded tokens
        in ``seconds``."""
        if num_prefill_tokens <= 0:
            if num_decodes > 0:
                self._decode_steps.append(seconds)
            return
        base = (self.decode_s or 0.0) if num_decodes > 0 else 0.0
        if seconds <= base:  # a decode and a chunk took less than a decode alone: that estimate is stale
            self._decode_steps.clear()
            self._decode_steps.append(seconds)  # an upper bound, until decode-only steps come again
            return
        self._token_costs.append((seconds - base) / num_prefill_tokens)
