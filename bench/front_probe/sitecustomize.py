"""Loaded at start-up by a server the benchmark launches with this folder on PYTHONPATH (``--front-probe`` of
bench/vllm_vs_chatstream.py), both ``vllm serve`` and ``chatstream serve --engine vllm``. It stamps the two moments
where a server's front meets vLLM's engine core process, in the same vLLM code on both sides, as lines of the file
named by ``CHATSTREAM_BENCH_FRONT_PROBE``: ``h <time>`` when the front hands a request over
(``AsyncMPClient.add_request_async``), ``o <time>`` when the front takes a step's outputs in
(``AsyncMPClient.get_output_async``). Times are ``time.perf_counter()`` (CLOCK_MONOTONIC, the clock the load client
stamps its requests and their text with). Nothing happens without that variable."""

import os
import time

_PATH = os.environ.get("CHATSTREAM_BENCH_FRONT_PROBE")

if _PATH:
    from vllm.v1.engine.core_client import AsyncMPClient

    _fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _hand_over = AsyncMPClient.add_request_async
    _take_in = AsyncMPClient.get_output_async

    async def _stamped_hand_over(self, request):  # type: ignore[no-untyped-def]
        os.write(_fd, f"h {time.perf_counter():.6f}\n".encode())
        return await _hand_over(self, request)

    async def _stamped_take_in(self):  # type: ignore[no-untyped-def]
        outputs = await _take_in(self)
        if outputs.outputs:
            os.write(_fd, f"o {time.perf_counter():.6f}\n".encode())
        return outputs

    AsyncMPClient.add_request_async = _stamped_hand_over
    AsyncMPClient.get_output_async = _stamped_take_in
