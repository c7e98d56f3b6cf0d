"""The Lua scripts of the Redis store: each write of a conversation is one script, so it is atomic on the server
(no other client's command runs in between), which is what makes the version check safe across processes.

Keys of one conversation (``P`` is the store's prefix): ``P conv:<id>`` (a hash: owner, title, created_at,
updated_at, version, message_count, prompt_class, prompt_settings, schema_version), ``P conv:<id>:messages`` (a list
of message JSON documents) and the owner's index ``P owner:<owner>`` (a sorted set of ids scored by updated_at).
Every write gives all three the store's TTL again, so a conversation expires ``ttl`` seconds after its last change.
"""

from __future__ import annotations

__all__ = ["BUMP", "CREATE", "DELETE", "RENAME"]

_PUSH = """
local function push(key, first)
  for i = first, #ARGV, 1000 do
    redis.call('RPUSH', key, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  return redis.call('LLEN', key)
end
local function expire(ttl)
  if tonumber(ttl) > 0 then
    for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
  end
end
"""

CREATE = (
    _PUSH
    + """
-- KEYS: meta, messages, index. ARGV: ttl, id, updated_at, number of field pairs, field, value, ..., messages...
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local pairs_end = 4 + 2 * tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, pairs_end))
redis.call('DEL', KEYS[2])
push(KEYS[2], pairs_end + 1)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
expire(ARGV[1])
return 1
"""
)

BUMP = (
    _PUSH
    + """
-- Append (replace = '0') or replace (replace = '1') the messages, version + 1.
-- KEYS: meta, messages, index.
-- ARGV: owner, expected version ('' = any), now, title candidate, ttl, id, replace, prompt_class, prompt_settings,
--       messages...
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {'missing'} end
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if version == nil then return {'corrupt', 'version is not a number'} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= version then return {'conflict', tostring(version)} end
if ARGV[7] == '1' then redis.call('DEL', KEYS[2]) end
local count = push(KEYS[2], 10)
version = version + 1
redis.call('HSET', KEYS[1], 'version', version, 'updated_at', ARGV[3], 'message_count', count)
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'prompt_class', ARGV[8], 'prompt_settings', ARGV[9]) end
if redis.call('HGET', KEYS[1], 'title') == '' and ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'title', ARGV[4])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[6])
expire(ARGV[5])
return {'ok', redis.call('HGET', KEYS[1], 'title'), tostring(version), tostring(count),
        redis.call('HGET', KEYS[1], 'created_at')}
"""
)

RENAME = (
    _PUSH
    + """
-- KEYS: meta, messages, index. ARGV: owner, title, ttl.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {} end
redis.call('HSET', KEYS[1], 'title', ARGV[2])
expire(ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""
)

DELETE = """
-- KEYS: meta, messages, index. ARGV: owner, id, from_index ('1': the id was read from this owner's own index, so a
-- damaged record, whose owner cannot be read, is deleted too: a user's data removal must not stop at it).
redis.call('ZREM', KEYS[3], ARGV[2])
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return 0 end
if kind ~= 'hash' then
  if ARGV[3] ~= '1' then return 0 end
elseif redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
