"""Decoding both wire formats whatever the transport's read boundaries."""

import json

import pytest
from bench.protocols import NativeStreamDecoder, SseDecoder, native_rejection, parse_openai_event


def _sse_lines(payloads):
    for payload in payloads:
        yield f"data: {payload}"
        yield ""


def test_sse_decoder_yields_one_payload_per_event_and_skips_comments():
    decoder = SseDecoder()
    lines = [": keep-alive", "", *list(_sse_lines(['{"a": 1}', "[DONE]"]))]
    events = [e for e in (decoder.feed_line(line) for line in lines) if e is not None]
    assert events == ['{"a": 1}', "[DONE]"]


def test_sse_decoder_joins_multiline_data_and_flushes_at_close():
    decoder = SseDecoder()
    assert decoder.feed_line("data: first") is None
    assert decoder.feed_line("data:second\r") is None
    assert decoder.close() == "first\nsecond"
    assert decoder.close() is None


def test_openai_chat_chunk_text_and_usage():
    chunk = parse_openai_event(
        json.dumps({"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]})
    )
    assert (chunk.text, chunk.finish_reason, chunk.done) == ("Hel", None, False)
    usage = parse_openai_event(json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 128}}))
    assert (usage.text, usage.completion_tokens, usage.prompt_tokens) == ("", 128, 12)
    assert parse_openai_event("[DONE]").done


def test_openai_completion_chunk_and_role_only_delta():
    assert parse_openai_event('{"choices": [{"text": "lo", "finish_reason": "length"}]}').text == "lo"
    first = parse_openai_event('{"choices": [{"delta": {"role": "assistant"}}]}')
    assert first.text == ""


def test_openai_error_event_raises():
    with pytest.raises(ValueError, match="error"):
        parse_openai_event('{"error": {"message": "boom"}}')


def test_native_decoder_handles_split_and_merged_chunks():
    stream = "Hel<::EOS::>Hello<::EOS::>Hello, wo<::EOS::>Hello, world<::EOS::>"
    for size in (1, 3, 7, len(stream)):
        decoder = NativeStreamDecoder()
        snapshots = []
        for start in range(0, len(stream), size):
            snapshots += decoder.feed(stream[start : start + size])
        assert snapshots == ["Hel", "Hello", "Hello, wo", "Hello, world"], size
        assert decoder.pending == ""


def test_native_decoder_keeps_unterminated_tail():
    decoder = NativeStreamDecoder()
    assert decoder.feed("abc<::EOS::>abcd<::EO") == ["abc"]
    assert decoder.pending == "abcd<::EO"


def test_native_rejection_detects_the_originals_json_error():
    assert native_rejection('{"error": "too_many_requests"}') == "too_many_requests"
    assert native_rejection("Hello<::EOS::>") is None
    assert native_rejection("{not json") is None
    assert native_rejection('{"success": true}') is None
