"""The SQLite store's schema and its forward migrations, run when a store opens its file.

``MIGRATIONS[n - 1]`` takes a database from schema version ``n - 1`` to ``n``; the version is kept in the one-row table
``schema_version``. A migration is a list of statements run in one transaction with the version bump, so a file is
always at a whole version. Migrations only ever go forward; a file from a newer ChatStream is refused, not touched.
To change the schema, append a migration: never edit one that has shipped.
"""

from __future__ import annotations

import logging

import aiosqlite

from chatstream.sessions.errors import SchemaTooNew, StoreUnavailable

logger = logging.getLogger(__name__)

__all__ = ["LATEST_VERSION", "MIGRATIONS", "migrate", "schema_version"]

_V1 = [
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "INSERT INTO schema_version (version) VALUES (0)",
    """CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        data TEXT NOT NULL,              -- a JSON object
        expires_at REAL                  -- Unix seconds; NULL: never
    ) WITHOUT ROWID""",
    """CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        created_at REAL NOT NULL,        -- Unix seconds
        updated_at REAL NOT NULL,
        version INTEGER NOT NULL,        -- changes to messages and prompt settings; renames leave it
        prompt_class TEXT NOT NULL,      -- module.QualName, a name only
        prompt_settings TEXT NOT NULL,   -- a JSON object
        message_count INTEGER NOT NULL
    )""",
    "CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC, id DESC)",
    """CREATE TABLE messages (
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,            -- 0, 1, 2, ... in conversation order
        id TEXT NOT NULL,
        role TEXT NOT NULL,              -- user | assistant | other
        name TEXT NOT NULL,              -- the prompt format's role label
        text TEXT,
        children TEXT,                   -- a JSON array of strings, or NULL
        created_at REAL NOT NULL,
        feedback TEXT,                   -- a JSON object {is_like, form_data, created_at}, or NULL
        generation_params TEXT,          -- a JSON object, or NULL
        PRIMARY KEY (conversation_id, seq)
    ) WITHOUT ROWID""",
]

# Version 2: the indexes of the retention sweep (conversations by age across owners, sessions by expiry).
_V2 = [
    "CREATE INDEX conversations_by_age ON conversations (updated_at)",
    "CREATE INDEX sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL",
]

MIGRATIONS: tuple[list[str], ...] = (_V1, _V2)
LATEST_VERSION = len(MIGRATIONS)


async def schema_version(conn: aiosqlite.Connection, location: str) -> int:
    """The file's schema version: 0 for an empty file.

    Raises:
        StoreUnavailable: the file holds tables but no ``schema_version`` (another application's database).
    """
    rows = list(await conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'"))
    tables = {row[0] for row in rows}
    if "schema_version" not in tables:
        if tables:
            raise StoreUnavailable(f"{location} is not a ChatStream database (tables: {sorted(tables)})")
        return 0
    version_rows = list(await conn.execute_fetchall("SELECT version FROM schema_version"))
    if len(version_rows) != 1 or not isinstance(version_rows[0][0], int):
        raise StoreUnavailable(f"{location}: the schema_version table is damaged ({version_rows!r})")
    return int(version_rows[0][0])


async def migrate(conn: aiosqlite.Connection, location: str, target: int = LATEST_VERSION) -> int:
    """Bring the file up to ``target`` (default: the latest) in one transaction; returns the version it had.

    Raises:
        SchemaTooNew: the file's version is above :data:`LATEST_VERSION`.
    """
    await conn.execute("BEGIN IMMEDIATE")
    try:
        found = await schema_version(conn, location)
        if found > LATEST_VERSION:
            raise SchemaTooNew(location, found, LATEST_VERSION)
        for version in range(found + 1, target + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute("UPDATE schema_version SET version = ?", (version,))
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    if found < target:
        logger.info("%s: schema migrated from version %d to %d", location, found, target)
    return found
