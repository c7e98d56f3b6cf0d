"""bench/vllm_vs_chatstream.py's own logic: the tap's reading of the upstream's stream and the per-chunk pairing."""

import json

import bench.vllm_vs_chatstream as versus
import httpx
import pytest
from bench.load import OpenAITarget, RequestResult
from bench.stats import ratio
from bench.vllm_vs_chatstream import (
    FrontStamps,
    Requests,
    Sent,
    Tap,
    _minus,
    _SseText,
    answer_tokens,
    chunk_delays,
    front_delays,
    one_round,
    paired,
    parse_args,
)


def _event(text: str, chat: bool = True) -> bytes:
    choice = {"delta": {"content": text}} if chat else {"text": text}
    return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()


def test_the_tap_reads_text_across_split_reads_of_both_apis():
    sent = Sent()
    reader = _SseText(sent)
    stream = _event("", chat=True) + _event("Hel", chat=False) + _event("lo ") + b"data: [DONE]\n\n"
    reader.feed(1.0, stream[:30])
    reader.feed(2.0, stream[30:70])
    reader.feed(3.0, stream[70:])
    assert sent.text == "Hello "
    assert sent.chars == [3, 6]
    assert sent.times[-1] == 3.0


def test_each_client_chunk_pairs_with_the_moment_the_upstream_had_sent_its_text():
    sent = Sent(times=[10.0, 11.0, 12.0], chars=[2, 4, 6], text="aabbcc")
    # the front merged the first two upstream pieces, then passed the third on
    result = RequestResult(ok=True, text="aabbcc", arrivals=[11.5, 12.25], arrival_chars=[4, 6])
    assert chunk_delays(result, sent) == [0.5, 0.25]
    assert chunk_delays(RequestResult(ok=True, text="xx", arrivals=[1.0], arrival_chars=[2]), sent) is None


async def test_the_tap_forwards_the_request_and_timestamps_the_tagged_answer():
    seen = {}

    def upstream(request):
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, content=_event("Hi") + _event("!") + b"data: [DONE]\n\n")

    tap = Tap("http://upstream")
    tap._client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    body = json.dumps({"prompt": "say hi (bench-req-7)"}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent_messages = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent_messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "headers": []}
    await tap(scope, receive, send)
    assert seen["body"]["prompt"] == "say hi (bench-req-7)"
    assert sent_messages[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent_messages[1:]).count(b"data:") == 3
    assert tap.sent[7].text == "Hi!" and tap.sent[7].chars == [2, 3]
    assert tap.sent[7].requested is not None and tap.sent[7].requested <= tap.sent[7].times[0]


def test_each_round_has_its_own_prompts_and_every_chat_its_own_tag():
    requests = Requests(requests_per_client=2)
    first, second = requests.round(3, 0), requests.round(3, 1)
    assert list(first) == [0, 1, 2, 3, 4, 5] and list(second) == [6, 7, 8, 9, 10, 11]
    assert first[0][0]["content"].endswith("(bench-req-0000000)")
    prompts = [chat[0]["content"].rsplit(" (", 1)[0] for chat in (*first.values(), *second.values())]
    assert len(set(prompts)) == 12  # another slice of the prompt set in the next round


def test_options_are_checked():
    args = parse_args(["--parts", "vllm", "--concurrency", "4,16", "--kv-cache-gib", "0.5"])
    assert args.concurrency == [4, 16] and args.kv_cache_bytes == 1 << 29
    with pytest.raises(SystemExit):
        parse_args(["--parts", "vllm,other"])


def test_short_rounds_have_one_request_per_chat_and_prompts_of_their_own():
    requests = Requests(requests_per_client=2)
    long_round = requests.round(4, 0)
    short = requests.round(4, 1, per_client=1)
    assert len(long_round) == 8 and len(short) == 4
    assert not set(long_round) & set(short)


def test_paired_estimates_skip_rounds_with_a_missing_side():
    estimate = paired([110.0, None, 90.0, 100.0], [100.0, 80.0, 100.0, None], _minus)
    assert estimate["pairs"] == 2.0  # the pairs with a missing side are left out
    assert estimate["median"] == 0.0
    assert estimate["ci95_low"] == -10.0 and estimate["ci95_high"] == 10.0
    ratios = paired([110.0, 90.0, 100.0], [100.0, 100.0, 0.0], ratio)
    assert ratios["pairs"] == 2.0 and ratios["median"] == pytest.approx(1.0)  # no ratio to a zero peer


def test_front_stamps_are_read_once_and_only_whole_lines(tmp_path):
    path = tmp_path / "probe.txt"
    stamps = FrontStamps(path)
    assert stamps.take() == {"h": [], "o": []}  # the server has not written yet
    path.write_bytes(b"h 1.5\no 2.25\nh 3.")
    assert stamps.take() == {"h": [1.5], "o": [2.25]}
    with path.open("ab") as file:
        file.write(b"75\n")
    assert stamps.take() == {"h": [3.75], "o": []}
    assert stamps.take() == {"h": [], "o": []}


def test_front_delays_split_the_ttft_into_the_ways_in_and_out():
    def sent_at(start, ttft):
        return RequestResult(ok=True, ttft_s=ttft, arrivals=[start + ttft])

    # sent at 10.000, 10.002, 10.004; first text at 11.000, 11.002, 11.104 (the last one a step later)
    results = {0: sent_at(10.0, 1.0), 1: sent_at(10.002, 1.0), 2: sent_at(10.004, 1.1)}
    stamps = {"h": [10.009, 10.003, 10.006], "o": [10.5, 10.999, 11.1, 11.2]}
    delays = front_delays(results, stamps)
    assert delays["front_p50_ms"] == pytest.approx(4.0)  # handed over 3, 4 and 5 ms after their sending
    assert delays["front_last_ms"] == pytest.approx(9.0)
    assert delays["egress_p50_ms"] == pytest.approx(3.0)  # 1, 3 and 4 ms after the step's outputs came in
    missing = front_delays(results, {"h": [10.003], "o": []})  # requests the probe never saw handed over
    assert missing["front_p50_ms"] is None and missing["egress_p50_ms"] is None and missing["front_stamps"] == 1.0


def test_answer_lengths_vary_by_tag_within_the_asked_range_and_alike_for_every_server():
    lengths = [answer_tokens(tag, 64, 0.75) for tag in range(200)]
    assert min(lengths) >= 16 and max(lengths) <= 64
    assert len(set(lengths)) > 20  # spread over the range, not a few values
    assert lengths == [answer_tokens(tag, 64, 0.75) for tag in range(200)]  # the same draw for the same chats
    assert {answer_tokens(tag, 64, 0.0) for tag in range(20)} == {64}
    assert answer_tokens(3, 2, 1.0) >= 1


async def test_a_round_sends_each_request_its_length_and_keeps_the_opening_burst_out_of_the_steady_ttft(monkeypatch):
    asked: dict[int, int] = {}

    async def fake_chat(client, target, messages, count_tokens, result):
        tag = int(messages[0]["content"].rsplit("bench-req-", 1)[1].rstrip(")"))
        asked[tag] = target.max_tokens
        result.ok, result.output_tokens = True, target.max_tokens
        result.ttft_s = 2.0 if tag < 3 else 0.1 + tag / 1000.0  # the opening burst waits longer
        return result

    monkeypatch.setattr(versus, "openai_chat", fake_chat)
    chats = Requests(requests_per_client=4).round(3, 0)  # 3 chats x 4 requests: tags 0-11, the burst is 0-2
    summary, results = await one_round(OpenAITarget("http://server", "m", 64), chats, 3, 10.0, vary=0.5)
    assert asked == {tag: answer_tokens(tag, 64, 0.5) for tag in range(12)}
    assert summary["steady_ttft_samples"] == 9.0
    assert summary["steady_ttft_p50_ms"] == pytest.approx(107.0)  # tags 3-11: 103-111 ms
    assert summary["ttft_p50_ms"] > summary["steady_ttft_p50_ms"]  # the burst counts in the round's own p50
    assert len(results) == 12
