"""Old import path of :mod:`chatstream.engine.cpu.runtime`, kept until every caller imports the new one."""

from chatstream.engine.cpu.runtime import MALLOC_TUNING_ENV, NUM_THREADS_ENV

__all__ = ["MALLOC_TUNING_ENV", "NUM_THREADS_ENV"]
