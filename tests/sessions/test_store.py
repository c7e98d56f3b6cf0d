"""MemoryStore: live objects, idle expiry, LRU bound."""

from __future__ import annotations

import pytest

from chatstream.sessions.store import FastSessionStoreAdapter, MemoryStore, SessionStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_is_a_session_store() -> None:
    assert isinstance(MemoryStore(), SessionStore)


def test_get_returns_the_live_dict() -> None:
    store = MemoryStore()
    data: dict[str, object] = {"prompt": object()}
    store.save("a", data)
    assert store.get("a") is data
    data["n"] = 1
    assert store.get("a") == data
    assert store.get("missing") is None
    store.delete("a")
    store.delete("a")  # unknown ids are ignored
    assert store.get("a") is None and len(store) == 0


def test_idle_sessions_expire_and_use_restarts_the_clock() -> None:
    clock = FakeClock()
    store = MemoryStore(ttl_seconds=10, clock=clock)
    store.save("a", {"x": 1})
    clock.now += 9
    assert store.get("a") == {"x": 1}  # a use: expires 10 s from now
    clock.now += 9
    assert "a" in store
    clock.now += 1.5
    assert "a" not in store
    assert store.get("a") is None
    assert len(store) == 0


def test_contains_does_not_count_as_a_use() -> None:
    clock = FakeClock()
    store = MemoryStore(ttl_seconds=10, clock=clock)
    store.save("a", {})
    clock.now += 9
    assert "a" in store
    clock.now += 2
    assert store.get("a") is None


def test_expired_sessions_are_dropped_on_save() -> None:
    clock = FakeClock()
    store = MemoryStore(ttl_seconds=10, clock=clock)
    for sid in "abc":
        store.save(sid, {})
    clock.now += 11
    store.save("d", {})
    assert len(store) == 1


def test_least_recently_used_session_is_evicted() -> None:
    store = MemoryStore(max_sessions=2)
    store.save("a", {})
    store.save("b", {})
    assert store.get("a") is not None  # "b" is now the least recently used
    store.save("c", {})
    assert len(store) == 2
    assert "b" not in store and "a" in store and "c" in store


def test_no_ttl_keeps_sessions() -> None:
    clock = FakeClock()
    store = MemoryStore(ttl_seconds=None, clock=clock)
    store.save("a", {})
    clock.now += 10**9
    assert store.get("a") == {}
    store.clear()
    assert len(store) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"ttl_seconds": 0}, "ttl_seconds"), ({"max_sessions": 0}, "max_sessions")]
)
def test_bad_settings_are_rejected(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryStore(**kwargs)  # type: ignore[arg-type]


def test_fastsession_store_adapter_keeps_the_live_dict() -> None:
    import fastsession

    adapter = FastSessionStoreAdapter(fastsession.MemoryStore())
    assert adapter.get("a") is None
    adapter.save("a", {"x": 1})
    live = adapter.get("a")
    assert live == {"x": 1}
    live["y"] = 2  # type: ignore[index]
    assert adapter.get("a") == {"x": 1, "y": 2}
    adapter.save("a", live)  # type: ignore[arg-type]
    assert adapter.get("a") is live
    adapter.delete("a")
    assert adapter.get("a") is None
    with pytest.raises(ValueError, match="create_store"):
        FastSessionStoreAdapter(object())
