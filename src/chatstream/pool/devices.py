"""Building a pool: one transformers engine per device on its own copy of the model, or a pool of given engines."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from chatstream.config import EngineConfig
from chatstream.engine.base import Engine
from chatstream.pool.config import PoolConfig, PoolMember
from chatstream.pool.engine import PoolEngine

logger = logging.getLogger(__name__)


def device_pool(
    model: Any, tokenizer: Any, config: EngineConfig, devices: Sequence[Any], pool_config: PoolConfig | None = None
) -> PoolEngine:
    """A pool with one :class:`~chatstream.engine.async_engine.TransformersEngine` per device, each on its own copy
    of ``model`` (see :func:`replicate`) and each running ``config.max_batch_size`` generations at once. The
    members are named after their devices ("cuda:0"; a device listed twice gets "#1", "#2" after its name)."""
    from chatstream.engine.async_engine import TransformersEngine
    from chatstream.models.devices import resolve_device

    targets = [resolve_device(d) for d in devices]
    members = [
        PoolMember(name, TransformersEngine(copy_, tokenizer, config), config.max_batch_size)
        for name, copy_ in zip(member_names(targets), replicate(model, targets), strict=True)
    ]
    return PoolEngine(members, pool_config)


def engine_pool(engines: Sequence[Engine], capacity: int, pool_config: PoolConfig | None = None) -> PoolEngine:
    """A pool of given engines named "engine-0", "engine-1", ..., each running ``capacity`` generations at once."""
    members = [PoolMember(f"engine-{i}", engine, capacity) for i, engine in enumerate(engines)]
    return PoolEngine(members, pool_config)


def replicate(model: Any, devices: Sequence[Any]) -> list[Any]:
    """``model`` on each device: the model itself for the first device it is already on, a deep copy moved to the
    device for every other entry (so no two engines share weights, also when a device is listed twice)."""
    from chatstream.models.devices import resolve_device

    if not devices:
        raise ValueError("devices must name at least one device")
    targets = [resolve_device(d) for d in devices]
    own = _same_device_index(getattr(model, "device", None), targets)
    copies = []
    for i, device in enumerate(targets):
        if i == own:
            copies.append(model)
        else:
            logger.info("copying the model to %s", device)
            copies.append(copy.deepcopy(model).to(device).eval())
    return copies


def member_names(devices: Sequence[Any]) -> list[str]:
    """Member names from devices: the device's name, with "#i" after a device that is listed more than once."""
    texts = [str(d) for d in devices]
    repeated = {text for text, count in Counter(texts).items() if count > 1}
    seen: Counter[str] = Counter()
    names = []
    for text in texts:
        names.append(f"{text}#{seen[text]}" if text in repeated else text)
        seen[text] += 1
    return names


def _same_device_index(current: Any, targets: Sequence[Any]) -> int | None:
    if current is None:
        return None
    for i, target in enumerate(targets):
        if target.type == current.type and (target.index or 0) == (current.index or 0):
            return i
    return None
