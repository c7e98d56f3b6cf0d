"""What only the SQLite store does: a file in WAL mode, forward migrations, several processes, damaged rows."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from chatstream.sessions import sqlite_schema
from chatstream.sessions.errors import Conflict, CorruptRecord, SchemaTooNew, StoreUnavailable
from chatstream.sessions.retention import RetentionPolicy
from chatstream.sessions.sqlite import SQLiteStore
from tests.sessions.support import START, TickingClock, conversation, message


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute(sql))


async def test_a_new_file_is_created_in_wal_mode_at_the_latest_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "chatstream.db"
    async with SQLiteStore(path) as store:
        assert store.describe() == f"SQLite file {path}"
        await store.sessions.save("s", {"user_id": "u"})
    assert _rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert _rows(path, "SELECT version FROM schema_version") == [(sqlite_schema.LATEST_VERSION,)]
    assert _rows(path, "SELECT id, data FROM sessions") == [("s", '{"user_id":"u"}')]


async def test_an_older_schema_is_migrated_forward_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    async with aiosqlite.connect(path, isolation_level=None) as conn:  # a file as the first release left it
        assert await sqlite_schema.migrate(conn, str(path), target=1) == 0
    assert _rows(path, "SELECT version FROM schema_version") == [(1,)]
    record = conversation()
    with sqlite3.connect(path) as raw:
        raw.execute(
            "INSERT INTO conversations VALUES (?, 'alice', 'old', ?, ?, 1, 'p.Prompt', '{}', 1)",
            (record.id, START, START),
        )
        raw.execute(
            "INSERT INTO messages VALUES (?, 0, 'm0', 'user', '<human>', 'hi', NULL, ?, NULL, NULL)", (record.id, START)
        )
    async with SQLiteStore(path) as store:
        got = await store.conversations.get("alice", record.id)
    assert (got.title, [m.text for m in got.messages]) == ("old", ["hi"])
    assert _rows(path, "SELECT version FROM schema_version") == [(2,)]
    indexes = {row[0] for row in _rows(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"conversations_by_age", "sessions_by_expiry"} <= indexes


async def test_a_newer_schema_or_a_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    async with SQLiteStore(newer):
        pass
    with sqlite3.connect(newer) as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(SchemaTooNew, match="schema version 99"):
        await SQLiteStore(newer).open()
    assert _rows(newer, "SELECT version FROM schema_version") == [(99,)]
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreUnavailable, match="not a ChatStream database"):
        await SQLiteStore(foreign).open()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database file at all" * 100)
    with pytest.raises(StoreUnavailable, match=r"garbage\.db"):
        await SQLiteStore(garbage).open()


async def test_two_stores_on_one_file_like_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SQLiteStore(path) as first, SQLiteStore(path) as second:
        created = await first.conversations.create(conversation())
        seen_by_second = await second.conversations.get("alice", created.id)
        assert seen_by_second == created
        tab_a = conversation(id=created.id, version=1, texts=("a",))
        tab_b = conversation(id=created.id, version=1, texts=("b",))
        results = await asyncio.gather(
            first.conversations.update(tab_a), second.conversations.update(tab_b), return_exceptions=True
        )
        assert sorted(type(r).__name__ for r in results) == ["Conflict", "Conversation"]
        await asyncio.gather(
            *(
                store.conversations.append_messages("alice", created.id, [message("user", f"{n}-{i}")])
                for i in range(5)
                for n, store in (("first", first), ("second", second))
            )
        )
        assert len((await first.conversations.get("alice", created.id)).messages) == 11


async def test_a_damaged_row_fails_only_its_own_request(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    async with SQLiteStore(path) as store:
        good = await store.conversations.create(conversation())
        bad = await store.conversations.create(conversation())
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE messages SET feedback = '{not json' WHERE conversation_id = ? AND seq = 1", (bad.id,))
        with pytest.raises(CorruptRecord) as caught:
            await store.conversations.get("alice", bad.id)
        assert caught.value.key == bad.id and "not JSON" in str(caught.value)
        assert await store.conversations.get("alice", good.id) == good
        with sqlite3.connect(path) as raw:
            raw.execute("DELETE FROM messages WHERE conversation_id = ? AND seq = 0", (good.id,))
        with pytest.raises(CorruptRecord, match="gaps"):
            await store.conversations.get("alice", good.id)
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE conversations SET title = x'ff' WHERE id = ?", (good.id,))
        listed = await store.conversations.list_recent("alice")
        assert [s.id for s in listed.items] == [bad.id]  # the damaged summary is left out (and logged)
        with pytest.raises(Conflict):
            await store.conversations.update(conversation(id=bad.id, version=5))


async def test_sessions_expire_and_reads_push_the_expiry_back(tmp_path: Path) -> None:
    clock = TickingClock()
    path = tmp_path / "sessions.db"
    async with SQLiteStore(path, session_ttl=100, clock=clock) as store:
        await store.sessions.save("s", {"n": 1})  # expires at START + 101
        clock.now += 60
        assert await store.sessions.get("s") == {"n": 1}  # 39 s left < 50: pushed to now + 100
        clock.now += 90
        assert await store.sessions.get("s") == {"n": 1}
        clock.now += 101
        assert await store.sessions.get("s") is None
        assert await store.conversations.sweep(RetentionPolicy()) == 0
    assert _rows(path, "SELECT count(*) FROM sessions") == [(0,)]


async def test_sessions_without_expiry_and_a_damaged_session(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SQLiteStore(path, session_ttl=None) as store:
        await store.sessions.save("s", {"n": 1})
        assert _rows(path, "SELECT expires_at FROM sessions") == [(None,)]
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE sessions SET data = '[1, 2]'")
        with pytest.raises(CorruptRecord, match="session:s"):
            await store.sessions.get("s")


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore("x.db", synchronous="off")
    with pytest.raises(ValueError, match="session_ttl"):
        SQLiteStore("x.db", session_ttl=0)
