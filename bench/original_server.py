"""The original ChatStream (PyPI chatstream==0.3.0) served the way its README documents, for the benchmark.

Runs inside the original's own venv (bench/setup_peers.sh original), never in the project's:

    ~/.cache/chatstream-bench/original-venv/bin/python bench/original_server.py --model DIR --port 8002

What is the original's documented setup: a FastAPI app, its role middleware added before FastSessionMiddleware
(MemoryStore, http_only, secure=False so that plain-HTTP loopback clients keep the cookie), POST /chat_stream calling
``handle_chat_stream_request`` and ``start_queue_worker()`` in a startup hook; fp32, since its sampler rejects bf16.

What the benchmark adds, each said here so that nobody mistakes it for the original's behaviour:
- a Gemma-3 prompt class (the original ships none for Gemma); it renders the same turn format as
  bench/gemma_chat_template.jinja and measures the echoed prompt with the tokenizer, since Gemma's turn markers are
  special tokens that decoding drops;
- GET /health: a plain route on the same app and event loop, so that its latency under load shows how long the loop is
  blocked (the original has no health endpoint);
- ``--ignore-eos``: empties the stop-token list through the generator's params, the same switch vLLM's
  ``ignore_eos`` flips, so that every answer runs to max_new_tokens in the throughput runs.
"""

from __future__ import annotations

import argparse
import logging

import torch
import uvicorn
from chatstream.access_control.default_client_role_grant_middleware import DefaultClientRoleGrantMiddleware
from fastapi import FastAPI, Request
from fastsession import FastSessionMiddleware, MemoryStore
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatstream import ChatStream
from chatstream.chat_prompt import AbstractChatPrompt, RoleType

# Prompts live in the session store; keep the tokenizer off the instances so they stay small.
_TOKENIZER = None


class ChatPromptGemma3(AbstractChatPrompt):
    """Gemma-3 turn format: ``<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n``."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system("")  # the tokenizer adds <bos> itself
        self.set_requester("user")
        self.set_responder("model")

    def get_stop_strs(self) -> list[str]:
        return []

    def create_prompt(self, opts: dict | None = None) -> str:
        parts = [self.system]
        for content in self.get_contents(opts or {}):
            message = content.get_message()
            if not message:
                continue
            if content.get_role_type() is RoleType.REQUESTER:
                parts.append(f"<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n")
            else:
                parts.append(f"{message}<end_of_turn>\n")
        return "".join(parts)

    def build_initial_prompt(self, chat_prompt_obj: AbstractChatPrompt) -> None:
        pass

    def get_skip_len(self, omit_last_message: bool = False) -> int:
        # The original subtracts the special tokens it knows from the prompt's length; Gemma's turn markers are not
        # in special_tokens_map, so measure what decoding (skip_special_tokens=True) really echoes instead.
        prompt = self.create_prompt({"omit_last_message": omit_last_message})
        assert _TOKENIZER is not None
        ids = _TOKENIZER(prompt).input_ids
        return len(_TOKENIZER.decode(ids, skip_special_tokens=True))


def build_app(args: argparse.Namespace) -> FastAPI:
    global _TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    _TOKENIZER = tokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    chat_stream = ChatStream(
        num_of_concurrent_executions=args.concurrency,
        max_queue_size=args.max_queue,
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        chat_prompt_clazz=ChatPromptGemma3,
        max_new_tokens=args.max_new_tokens,
        context_len=args.context_len,
        temperature=0.0,  # its temperature processor takes argmax below 1e-4: greedy
        top_k=None,
        top_p=None,
        repetition_penalty=None,
        too_many_request_as_http_error=True,
    )
    if args.ignore_eos:
        chat_stream.chat_generator.params["stop_ids"] = []

    app = FastAPI()
    app.add_middleware(DefaultClientRoleGrantMiddleware, chat_stream=chat_stream)
    app.add_middleware(
        FastSessionMiddleware,
        secret_key="chatstream-bench-original",
        store=MemoryStore(),
        http_only=True,
        secure=False,
        skip_session_header={"header_name": "X-FastSession-Skip", "header_value": "skip"},
    )

    @app.post("/chat_stream")
    async def stream_api(request: Request):  # type: ignore[no-untyped-def]
        return await chat_stream.handle_chat_stream_request(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.on_event("startup")
    async def startup() -> None:
        await chat_stream.start_queue_worker()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="transformers checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--concurrency", type=int, default=32, help="num_of_concurrent_executions")
    parser.add_argument("--max-queue", type=int, default=1024, help="max_queue_size")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
