"""Loaded at start-up by a server the benchmark launches with this folder on PYTHONPATH (``--front-probe`` of
bench/vllm_vs_chatstream.py), both ``vllm serve`` and ``chatstream serve --engine vllm``: each time the server's
front hands a request to vLLM's engine core process (``AsyncMPClient.add_request_async``, the one call both fronts
end in), append ``time.perf_counter()`` (CLOCK_MONOTONIC, the clock the load client stamps its requests with) as a
line to the file named by ``CHATSTREAM_BENCH_FRONT_PROBE``. Nothing happens without that variable."""

import os
import time

_PATH = os.environ.get("CHATSTREAM_BENCH_FRONT_PROBE")

if _PATH:
    from vllm.v1.engine.core_client import AsyncMPClient

    _handed_over = AsyncMPClient.add_request_async
    _fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def _stamped(self, request):  # type: ignore[no-untyped-def]
        os.write(_fd, f"{time.perf_counter():.6f}\n".encode())
        return await _handed_over(self, request)

    AsyncMPClient.add_request_async = _stamped
