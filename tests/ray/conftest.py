"""The Ray tests: skipped as a whole where the ``ray`` extra is not installed."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
    collect_ignore_glob = ["test_*.py"]
