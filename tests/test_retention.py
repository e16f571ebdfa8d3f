"""Retention (`memory.retention_days`, `chatmem db prune`) and the new settings."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from helpers import run_chatmem, upstream_url
from sqlalchemy import text

from chatmem import create_app
from chatmem.config import ConfigError, StorageConfig, load_config
from chatmem.storage import Owner, Store, create_engine
from chatmem.storage.retention import parse_age

OWNER = Owner("default")


async def seed(url: str, ages_in_days: dict[str, float]) -> None:
    """Conversations last updated the given number of days ago."""
    store = Store(create_engine(StorageConfig(url=url)))
    try:
        await store.create_schema()
        for name, days in ages_in_days.items():
            turn = [{"role": "user", "content": name}, {"role": "assistant", "content": "ok"}]
            await store.commit_turn(OWNER, name, system=None, turn=turn)
            async with store.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE conversations SET updated_at = :t WHERE id = :id"),
                    {"t": int(time.time() - days * 86400), "id": name},
                )
    finally:
        await store.close()


async def conversation_ids(url: str) -> list[str]:
    store = Store(create_engine(StorageConfig(url=url)))
    try:
        async with store.engine.connect() as conn:
            rows = await conn.execute(text("SELECT id FROM conversations ORDER BY id"))
            return [row[0] for row in rows]
    finally:
        await store.close()


async def test_gateway_prunes_when_retention_is_set(
    storage_url: str, upstream: TestServer, aiohttp_client: Any
) -> None:
    await seed(storage_url, {"ancient": 400, "last-month": 31, "this-week": 6})
    config = load_config(
        None,
        overrides={
            "upstream": {"url": upstream_url(upstream)},
            "storage": {"url": storage_url},
            "memory": {"retention_days": 30},
        },
        env={},
    )
    client = await aiohttp_client(create_app(config))
    for _ in range(200):
        if await conversation_ids(storage_url) == ["this-week"]:
            break
        await asyncio.sleep(0.05)
    assert await conversation_ids(storage_url) == ["this-week"]
    # Still serving, and the pruned conversation starts afresh if it is used again.
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Conversation-Id": "ancient"},
    )
    assert resp.status == 200
    assert "(1 messages)" in (await resp.json())["choices"][0]["message"]["content"]


async def test_no_retention_keeps_everything(
    storage_url: str, upstream: TestServer, aiohttp_client: Any
) -> None:
    await seed(storage_url, {"ancient": 4000})
    config = load_config(
        None,
        overrides={"upstream": {"url": upstream_url(upstream)}, "storage": {"url": storage_url}},
        env={},
    )
    client = await aiohttp_client(create_app(config))
    assert (await client.get("/v1/health")).status == 200
    assert await conversation_ids(storage_url) == ["ancient"]


def chatmem(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_chatmem(*args, cwd=cwd)


async def test_db_prune_command(storage_url: str, tmp_path: Path) -> None:
    await seed(storage_url, {"a": 90, "b": 45, "c": 10})
    done = await asyncio.to_thread(
        chatmem, "db", "prune", "--older-than", "30d", "--batch-size", "1", "--db", storage_url,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "deleted 2 conversations not updated for 30d\n"
    assert await conversation_ids(storage_url) == ["c"]

    (tmp_path / "chatmem.toml").write_text("[memory]\nretention_days = 5\n")
    done = await asyncio.to_thread(chatmem, "db", "prune", "--db", storage_url, cwd=tmp_path)
    assert done.stdout == "deleted 1 conversations not updated for 5d\n"
    assert await conversation_ids(storage_url) == []


def test_db_prune_needs_an_age(tmp_path: Path) -> None:
    done = chatmem("db", "prune", "--db", f"sqlite+aiosqlite:///{tmp_path}/x.db", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "chatmem db: give --older-than (e.g. 30d) or set memory.retention_days\n"
    )
    bad = chatmem("db", "prune", "--older-than", "soon", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "chatmem db: 'soon' is not an age like 30d, 12h, 90m or 2w"
    )
    # 30 meant as days deleted what was idle for 30 s.
    unitless = chatmem("db", "prune", "--older-than", "30", cwd=tmp_path)
    assert unitless.returncode == 2
    assert unitless.stderr.strip().splitlines()[-1] == (
        "chatmem db: '30': an age needs its unit, s, m, h, d or w (30d is 30 days)"
    )
    # A batch's numbers go to the database as parameters: asyncpg takes 32,767 at most.
    for size in ("0", "10001"):
        refused = chatmem("db", "prune", "--older-than", "30d", "--batch-size", size, cwd=tmp_path)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1] == (
            "chatmem db: --batch-size must be from 1 to 10000"
        )
    for age in ("0d", "infs", "nand"):  # 0 would delete everything; inf overflowed
        refused = chatmem("db", "prune", "--older-than", age, cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert (
            refused.stderr.strip()
            .splitlines()[-1]
            .startswith(f"chatmem db: '{age}': an age must be more than 0")
        )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("2w", 1209600), ("45s", 45.0)],
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "d", "-3d", "3x", "thirty", "0", "30", "0d", "inf", "1e400s", "nan", "nand"]
)
def test_parse_age_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_age(text)


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("memory", {"retention_days": -1}, "memory.retention_days: must not be negative"),
        # As prune's --older-than: a larger one overflowed the store's times (item 146).
        (
            "memory",
            {"retention_days": 10**17},
            "memory.retention_days: must be less than 1000 years (365000)",
        ),
        ("storage", {"pool_size": 0}, "storage.pool_size: must be greater than 0"),
        ("storage", {"max_overflow": -1}, "storage.max_overflow: must not be negative"),
        ("storage", {"pool_timeout": "x"}, "storage.pool_timeout: must be a number, not 'x'"),
    ],
)
def test_storage_and_retention_settings_are_checked(
    section: str, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides={section: values}, env={})
    assert str(caught.value) == message


async def test_storage_settings_reach_the_pool_and_the_server(pg_url: str) -> None:
    config = StorageConfig(
        url=pg_url, pool_size=3, max_overflow=1, pool_timeout=2.5, statement_timeout=1.5
    )
    engine = create_engine(config)
    try:
        pool: Any = engine.pool
        assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 1, 2.5)
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SHOW statement_timeout")).scalar() == "1500ms"
            assert (await conn.exec_driver_sql("SHOW application_name")).scalar() == "chatmem"
    finally:
        await engine.dispose()
