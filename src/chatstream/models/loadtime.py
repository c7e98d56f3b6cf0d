"""``LoadTime``: run a long step (a model load, a conversion) under a progress bar sized by its previous duration.

A drop-in for the ``loadtime`` package that the original ChatStream re-exported (same constructor arguments, same
``LoadTime(name=..., fn=...)()`` call). We keep our own because the package, while it imports cleanly on Python 3.11,
does not behave well enough to wrap a model load:

* an exception raised by ``fn`` is printed and swallowed, so a failed load returns ``None`` to the caller;
* nothing is shown or recorded unless ``name`` is a model already in the Hugging Face hub cache, so a local model
  directory never gets a bar;
* the recorded duration is sampled by the display thread every 0.5 s, and stopping waits for that thread to wake.

Here ``fn``'s exceptions propagate, every name gets a bar, the duration is measured around ``fn`` itself, and the
record is written atomically (``$XDG_CACHE_HOME/<dirname>/<name>.json``, default ``~/.cache/loadtime``) and only
after a successful run. The bar is drawn with tqdm on stderr unless ``fn_print`` is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from tqdm import tqdm

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_FILE_STEM = 100
_BAR_WITH_ESTIMATE = "{desc}{elapsed}/{total_time} [{bar:20}] {percentage:3.0f}%"
_BAR_WITHOUT_PERCENTAGE = "{desc}{elapsed}/{total_time}"
_BAR_WITHOUT_ESTIMATE = "{desc}{elapsed} (recording the time for next time)"


class LoadTime(Generic[T]):
    """Runs ``fn`` once under a progress bar whose length is the duration of the last successful run of ``name``.

    Args:
        name: what is loaded (a model path or id); the key of the stored duration.
        message: text before the time display (default ``'Loading "<name>" ... '``).
        pbar: draw a bar and a percentage (when a previous duration is known); False shows the times only.
        dirname: folder under the cache root where durations are stored.
        hf: ``name`` is a Hugging Face hub id: show nothing while it is not in the hub cache yet, because the hub
            client then draws its own download bars.
        fn: the step to run; its return value is returned by ``start()``/``__call__``. Required.
        fn_print: receives the display text instead of stderr (strings with carriage returns, as a terminal gets).
        store_dir: where to keep the durations (default ``$XDG_CACHE_HOME/<dirname>`` or ``~/.cache/<dirname>``).
        estimate_sec: the bar's length when no duration has been recorded yet.
        refresh_sec: how often the display is redrawn.
    """

    def __init__(
        self,
        name: str = "",
        message: str | None = None,
        pbar: bool = True,
        dirname: str = "loadtime",
        hf: bool = False,
        fn: Callable[[], T] | None = None,
        fn_print: Callable[[str], Any] | None = None,
        *,
        store_dir: Path | None = None,
        estimate_sec: float | None = None,
        refresh_sec: float = 0.5,
    ) -> None:
        if fn is None:
            raise TypeError("LoadTime: fn not set")
        if refresh_sec <= 0:
            raise ValueError(f"refresh_sec={refresh_sec!r} must be > 0")
        self.name = name
        self.message = message if message is not None else f'Loading "{name}" ... '
        self.show_percentage = pbar
        self.fn: Callable[[], T] | None = fn
        self.fn_print = fn_print
        self.hf = hf
        self.store_path = (store_dir or _default_store_dir(dirname)) / f"{_file_stem(name)}.json"
        self.estimate_sec = estimate_sec
        self.refresh_sec = refresh_sec
        self.elapsed_time = -1.0
        self.stored_data: dict[str, Any] = self._read_record()

    @property
    def previous_sec(self) -> float | None:
        """The duration of the last successful run of ``name`` (None when there was none)."""
        total = self.stored_data.get("total_time")
        return float(total) if isinstance(total, int | float) and total > 0 else None

    def __call__(self) -> T:
        return self.start()

    def start(self) -> T:
        """Run ``fn`` under the display and return its result; ``fn``'s exceptions propagate (nothing is recorded)."""
        fn = self.fn
        if fn is None:
            raise RuntimeError(f"LoadTime {self.name!r} has already run")
        self.fn = None
        bar = self._open_bar()
        stop = threading.Event()
        started = time.monotonic()
        ticker = threading.Thread(target=self._tick, args=(bar, started, stop), name="loadtime", daemon=True)
        ticker.start()
        succeeded = False
        try:
            result = fn()
            succeeded = True
        finally:
            self.elapsed_time = time.monotonic() - started
            stop.set()
            ticker.join()
            self._close_bar(bar, succeeded)
        self.stored_data["total_time"] = self.elapsed_time
        self._write_record()
        return result

    def clear_stored_data(self) -> None:
        """Forget the recorded duration of ``name``."""
        self.stored_data["total_time"] = None
        self._write_record()

    def _open_bar(self) -> tqdm[Any] | None:
        if self.hf and not _hub_has(self.name):
            return None
        total = self.previous_sec or self.estimate_sec
        if total is None:
            bar_format = _BAR_WITHOUT_ESTIMATE
        else:
            bar_format = _BAR_WITH_ESTIMATE if self.show_percentage else _BAR_WITHOUT_PERCENTAGE
            bar_format = bar_format.replace("{total_time}", tqdm.format_interval(total))
        file: Any = _PrintWriter(self.fn_print) if self.fn_print is not None else sys.stderr
        return tqdm(
            total=total, desc=self.message, bar_format=bar_format, file=file, mininterval=0, dynamic_ncols=False
        )

    def _tick(self, bar: tqdm[Any] | None, started: float, stop: threading.Event) -> None:
        while not stop.wait(self.refresh_sec):
            if bar is None:
                continue
            elapsed = time.monotonic() - started
            # an overrun holds the bar just short of full until fn really returns
            bar.n = min(elapsed, bar.total * 0.99) if bar.total else elapsed
            bar.refresh()

    def _close_bar(self, bar: tqdm[Any] | None, succeeded: bool) -> None:
        if bar is None:
            return
        if succeeded and bar.total:
            bar.n = bar.total
        bar.refresh()
        bar.close()

    def _read_record(self) -> dict[str, Any]:
        try:
            data = json.loads(self.store_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"total_time": None}
        return data if isinstance(data, dict) else {"total_time": None}

    def _write_record(self) -> None:
        try:
            self.store_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.store_path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self.stored_data, out)
            os.replace(tmp, self.store_path)
        except OSError as exc:
            logger.warning("Could not record the duration of %r in %s: %s", self.name, self.store_path, exc)


class _PrintWriter:
    """A file-like object that hands tqdm's output to a print function."""

    def __init__(self, fn_print: Callable[[str], Any]) -> None:
        self._fn_print = fn_print

    def write(self, text: str) -> None:
        if text:
            self._fn_print(text)

    def flush(self) -> None:
        pass


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _default_store_dir(dirname: str) -> Path:
    if not dirname or Path(dirname).is_absolute() or ".." in Path(dirname).parts:
        raise ValueError(f"dirname={dirname!r} must be a relative folder name inside the cache directory")
    return _cache_root() / dirname


def _file_stem(name: str) -> str:
    """A safe file name for ``name``: odd characters become "_", long names end in a hash of the full name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"
    if len(stem) > _MAX_FILE_STEM:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
        stem = f"{stem[: _MAX_FILE_STEM - 17]}-{digest}"
    return stem


def _hub_has(name: str) -> bool:
    """True when ``name`` is a local directory or a repository already in the Hugging Face hub cache."""
    if Path(name).is_dir():
        return True
    hub = os.environ.get("HF_HUB_CACHE")
    if hub is None:
        hub = str(Path(os.environ.get("HF_HOME") or _cache_root() / "huggingface") / "hub")
    repo_dir = Path(hub) / ("models--" + name.replace("/", "--"))
    return repo_dir.is_dir() and any(repo_dir.iterdir())
