"""How many prompt tokens a step may prefill beside the running streams' decode: a budget in time, not only tokens.

A prefill chunk runs in the same forward as the decode of every running row, so each running stream waits for it.
:class:`PrefillPacer` learns from the steps it is shown (their wall time, how many rows decoded, how many prompt
tokens were prefilled) what a step without a chunk costs and what one prompt token adds, and sizes the next chunk so
that the step takes at most ``max_slowdown`` times a plain decode step: a long prompt joining a busy batch is then
prefilled in small chunks (the streams keep their pace), and at full ``max_tokens`` when nothing decodes.

On a fast prefill (a GPU, a CPU with AMX) the time budget allows the whole ``max_tokens``; on a slow one it is what
keeps the streams' inter-token gap bounded. The estimates are exponential moving averages, so they follow the batch
growing, the contexts lengthening and the machine's load.
"""

from __future__ import annotations

MIN_CHUNK_TOKENS = 16
"""The smallest chunk the pacer gives, so that a joining prompt always advances at a useful rate."""

SMOOTHING = 0.3
"""The weight of the newest step in the moving averages."""


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
        self.decode_s: float | None = None
        """A decode-only step's wall time (moving average)."""
        self.token_s: float | None = None
        """What one prefilled token adds to a step (moving average)."""

    def budget(self, decoding: bool) -> int:
        """Padded prompt tokens the next step may prefill; ``decoding``: whether running rows decode in it."""
        if not decoding or self.max_slowdown is None or self.decode_s is None or not self.token_s:
            return self.max_tokens
        tokens = int((self.max_slowdown - 1.0) * self.decode_s / self.token_s)
        return max(min(MIN_CHUNK_TOKENS, self.max_tokens), min(self.max_tokens, tokens))

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from a step that decoded ``num_decodes`` rows and prefilled ``num_prefill_tokens`` padded tokens
        in ``seconds``."""
        if num_prefill_tokens <= 0:
            if num_decodes > 0:
                self.decode_s = _average(self.decode_s, seconds)
            return
        base = (self.decode_s or 0.0) if num_decodes > 0 else 0.0
        self.token_s = _average(self.token_s, max(seconds - base, 0.0) / num_prefill_tokens)


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1.0 - SMOOTHING) * current + SMOOTHING * sample
