"""ModelRunner: plans carried out on the batch."""

from __future__ import annotations

from typing import Any

import pytest
from tests.tiny_model import PROMPTS, greedy, reference

from chatstream.engine.base import GenerationRequest
from chatstream.engine.model_runner import ModelRunner
from chatstream.engine.scheduler import ModelOutput, Release, ScheduledPrefill, SchedulerOutput
from chatstream.engine.sequence import Sequence


def _seq(request_id: str, prompt: list[int]) -> Sequence:
    return Sequence(GenerationRequest(request_id, "", greedy(8)), prompt, 8)


def test_run_releases_rows_keeps_their_kv_and_prefills_on_it(tiny_model: Any, tiny_tokenizer: Any) -> None:
    runner = ModelRunner(tiny_model)
    a, b = _seq("a", tiny_tokenizer.encode(PROMPTS[1])), _seq("b", tiny_tokenizer.encode(PROMPTS[2]))
    out = runner.run(SchedulerOutput(prefills=(ScheduledPrefill(a), ScheduledPrefill(b))))
    assert set(out.sampled) == {a.seq_id, b.seq_id} and not out.errors
    a.output_ids.append(out.sampled[a.seq_id])
    assert runner.batch is not None and runner.batch.seq_ids == [a.seq_id, b.seq_id]
    runner.run(SchedulerOutput(releases=(Release(a.seq_id, keep=True),)))
    assert runner.batch.seq_ids == [b.seq_id] and runner.kept[a.seq_id].num_tokens == len(a.prompt_ids)
    again = _seq("again", [*a.prompt_ids, a.output_ids[0]])
    prefill = ScheduledPrefill(again, prefix_owner=a.seq_id, num_cached_tokens=len(a.prompt_ids))
    out = runner.run(SchedulerOutput(prefills=(prefill,)))
    assert out.sampled[again.seq_id] == reference(tiny_model, again.prompt_ids, 1)[0]
    assert a.seq_id not in runner.kept and runner.batch.seq_ids == [b.seq_id, again.seq_id]


def test_a_plan_that_does_not_match_the_batch_is_a_bug(tiny_model: Any, tiny_tokenizer: Any) -> None:
    runner = ModelRunner(tiny_model)
    a = _seq("a", tiny_tokenizer.encode(PROMPTS[1]))
    runner.run(SchedulerOutput(prefills=(ScheduledPrefill(a),)))
    with pytest.raises(RuntimeError, match="not the rows"):
        runner.run(SchedulerOutput(decodes=(_seq("stranger", [5]),)))
    with pytest.raises(RuntimeError, match="no row"):
        runner.run(SchedulerOutput(releases=(Release(10**9, keep=False),)))
    assert runner.run(SchedulerOutput()) == ModelOutput()
