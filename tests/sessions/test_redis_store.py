"""What only the Redis store does, against a real redis-server: keys and TTLs, the owner index, two clients sharing
one Redis like two processes, damaged keys."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis

from chatstream.sessions.errors import CorruptRecord, ForeignRecord, StoreUnavailable
from chatstream.sessions.redis_store import RedisStore
from chatstream.sessions.retention import RetentionPolicy
from tests.sessions.support import START, TickingClock, conversation, message


@pytest.fixture
def raw(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


async def test_keys_ttls_and_the_owner_index(redis_url: str, raw: redis.Redis) -> None:
    async with RedisStore(redis_url, ttl=3600, session_ttl=600, prefix="app1:") as store:
        created = await store.conversations.create(conversation(texts=("hi", "hello")))
        await store.sessions.save("sid", {"user_id": "u"})
    cid = created.id
    assert sorted(raw.keys("*")) == sorted(
        [f"app1:conv:{cid}", f"app1:conv:{cid}:messages", "app1:owner:alice", "app1:session:sid"]
    )
    meta = raw.hgetall(f"app1:conv:{cid}")
    assert meta["owner"] == "alice" and meta["version"] == "1" and meta["schema_version"] == "1"
    assert json.loads(raw.lindex(f"app1:conv:{cid}:messages", 0))["text"] == "hi"  # type: ignore[arg-type]
    assert raw.zrange("app1:owner:alice", 0, -1, withscores=True) == [(cid, START)]
    for key in (f"app1:conv:{cid}", f"app1:conv:{cid}:messages", "app1:owner:alice"):
        assert 3590 < raw.ttl(key) <= 3600
    assert 590 < raw.ttl("app1:session:sid") <= 600
    assert json.loads(raw.get("app1:session:sid")) == {"user_id": "u"}  # type: ignore[arg-type]


async def test_without_ttl_nothing_expires_and_reads_slide_the_session_ttl(redis_url: str, raw: redis.Redis) -> None:
    async with RedisStore(redis_url, session_ttl=600) as store:
        created = await store.conversations.create(conversation())
        await store.sessions.save("sid", {})
        raw.expire("chatstream:session:sid", 5)
        assert await store.sessions.get("sid") == {}
    assert raw.ttl(f"chatstream:conv:{created.id}") == -1
    assert raw.ttl("chatstream:session:sid") > 590


async def test_two_clients_share_one_redis_like_two_processes(redis_url: str) -> None:
    async with RedisStore(redis_url) as first, RedisStore(redis_url) as second:
        created = await first.conversations.create(conversation(texts=()))
        await second.conversations.append_messages("alice", created.id, [message("user", "from the second")])
        turns = [
            store.conversations.append_messages("alice", created.id, [message("user", f"{i}")])
            for i in range(10)
            for store in (first, second)
        ]
        await asyncio.gather(*turns)
        got = await first.conversations.get("alice", created.id)
        assert got.version == 22 and len(got.messages) == 21
        await first.sessions.save("sid", {"conversation_id": created.id})
        assert await second.sessions.get("sid") == {"conversation_id": created.id}


async def test_damaged_keys_fail_only_their_own_request(redis_url: str, raw: redis.Redis) -> None:
    async with RedisStore(redis_url) as store:
        good = await store.conversations.create(conversation())
        bad = await store.conversations.create(conversation())
        raw.rpush(f"chatstream:conv:{bad.id}:messages", "{broken")
        raw.hincrby(f"chatstream:conv:{bad.id}", "message_count", 1)
        with pytest.raises(CorruptRecord, match="not JSON") as caught:
            await store.conversations.get("alice", bad.id)
        assert caught.value.key == bad.id
        raw.delete(f"chatstream:conv:{bad.id}")
        raw.set(f"chatstream:conv:{bad.id}", "a string, not a hash")
        with pytest.raises(CorruptRecord, match="WRONGTYPE"):
            await store.conversations.get("alice", bad.id)
        with pytest.raises(CorruptRecord):
            await store.conversations.append_messages("alice", bad.id, [message("user", "x")])
        raw.hset(f"chatstream:conv:{good.id}", "schema_version", "9")
        with pytest.raises(ForeignRecord, match="schema version"):
            await store.conversations.get("alice", good.id)
        raw.hset(f"chatstream:conv:{good.id}", mapping={"schema_version": "1", "version": "many"})
        with pytest.raises(CorruptRecord, match="version"):
            await store.conversations.append_messages("alice", good.id, [message("user", "x")])
        listed = await store.conversations.list_recent("alice")
        assert listed.items == []  # both damaged summaries are left out (and logged)
        assert await store.conversations.delete_owner("alice") == 2  # a user's data removal takes damaged ones too
        assert raw.keys("chatstream:conv:*") == []
        raw.set("chatstream:session:sid", "[]")
        with pytest.raises(CorruptRecord, match="session:sid"):
            await store.sessions.get("sid")


async def test_expired_conversations_leave_the_index(redis_url: str, raw: redis.Redis) -> None:
    async with RedisStore(redis_url, clock=TickingClock()) as store:
        ids = [(await store.conversations.create(conversation(updated_at=START + i))).id for i in range(4)]
        raw.delete(f"chatstream:conv:{ids[3]}", f"chatstream:conv:{ids[3]}:messages")  # as if its TTL ran out
        page = await store.conversations.list_recent("alice", limit=2)
        assert [s.id for s in page.items] == [ids[2], ids[1]] and page.has_more
        assert raw.zcard("chatstream:owner:alice") == 3
        raw.delete(f"chatstream:conv:{ids[0]}", f"chatstream:conv:{ids[0]}:messages")
        assert await store.conversations.sweep(RetentionPolicy(), now=START) == 0
        assert raw.zrange("chatstream:owner:alice", 0, -1) == [ids[1], ids[2]]


async def test_an_unreachable_redis_is_store_unavailable(redis_url: str) -> None:
    store = RedisStore("redis://:secret@127.0.0.1:1/0", client_options={"socket_connect_timeout": 1})
    assert store.describe() == "Redis redis://:***@127.0.0.1:1/0"
    with pytest.raises(StoreUnavailable, match=r"\*\*\*"):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.conversations.get("alice", "conv_x")
    await store.close()


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="ttl"):
        RedisStore("redis://localhost", ttl=0.5)
