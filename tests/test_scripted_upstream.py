"""The scripted upstream really produces each fault, as an aiohttp client sees it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from scripted_upstream import Framing, Script, scripted_upstream

EVENTS = [b'data: {"a":1}\n\n', b'data: {"b":', b"2}\n\n", b"data: [DONE]\n\n"]


async def _read_all(resp: aiohttp.ClientResponse) -> list[bytes]:
    return [chunk async for chunk in resp.content.iter_any()]


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
async def test_ok_response_arrives_byte_exact(framing: Framing) -> None:
    script = Script(status=201, headers={"X-Test": "yes"}, chunks=[*EVENTS], framing=framing)
    async with scripted_upstream(script) as up, aiohttp.ClientSession() as session:
        body = b'{"model":"m"}'
        async with session.post(f"{up.url}/chat/completions?x=1", data=body) as resp:
            assert resp.status == 201
            assert resp.headers["X-Test"] == "yes"
            assert b"".join(await _read_all(resp)) == b"".join(EVENTS)
        assert not up.disconnected.is_set()
    method, path, headers, received = up.requests[0]
    assert (method, path, received) == ("POST", "/v1/chat/completions?x=1", body)
    assert headers["Content-Length"] == str(len(body))


async def test_chunked_request_body_is_read() -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    async with (
        scripted_upstream(Script(chunks=[b"ok"])) as up,
        aiohttp.ClientSession() as s,
        s.post(up.url, data=gen()) as resp,
    ):
        assert await resp.read() == b"ok"
    assert up.requests[0][3] == b"hello world"


async def test_chunks_arrive_separately_with_sleeps() -> None:
    script = Script(chunks=[b"first", 0.2, b"second"])
    async with (
        scripted_upstream(script) as up,
        aiohttp.ClientSession() as session,
        session.get(up.url) as resp,
    ):
        first = await resp.content.read(5)
        assert first == b"first"
        assert not resp.content.at_eof()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await resp.content.read() == b"second"
        assert loop.time() - started >= 0.15


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_reset_mid_body_is_a_payload_error(framing: Framing) -> None:
    headers = {"Content-Length": "1000"} if framing == "length" else {}
    script = Script(headers=headers, chunks=[b"data: partial\n\n"], framing=framing, end="reset")
    async with (
        scripted_upstream(script) as up,
        aiohttp.ClientSession() as session,
        session.get(up.url) as resp,
    ):
        assert resp.status == 200
        assert await resp.content.readuntil(b"\n\n") == b"data: partial\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await _read_all(resp)


async def test_aiohttp_takes_a_reset_for_the_end_of_a_close_delimited_body() -> None:
    # Pins aiohttp's behaviour: a body framed by connection close cannot be told apart
    # from one cut short by a reset, so the gateway sees a clean (truncated) end.
    script = Script(chunks=[b"data: partial\n\n"], framing="close", end="reset")
    async with (
        scripted_upstream(script) as up,
        aiohttp.ClientSession() as session,
        session.get(up.url) as resp,
    ):
        assert await resp.read() == b"data: partial\n\n"


async def test_reset_after_a_complete_length_body_is_harmless() -> None:
    script = Script(chunks=[b"complete"], framing="length", end="reset")
    async with (
        scripted_upstream(script) as up,
        aiohttp.ClientSession() as session,
        session.get(up.url) as resp,
    ):
        assert await resp.read() == b"complete"


async def test_reset_before_headers() -> None:
    async with (
        scripted_upstream(Script(before_headers="reset")) as up,
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await session.post(up.url, data=b"{}")
    assert len(up.requests) == 1  # aiohttp would retry a GET once; a POST it does not


async def test_garbage_before_headers() -> None:
    async with (
        scripted_upstream(Script(before_headers="garbage")) as up,
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(aiohttp.ClientResponseError):
            await session.get(up.url)


async def test_hang_before_headers_times_out_and_sees_the_disconnect() -> None:
    async with (
        scripted_upstream(Script(before_headers="hang")) as up,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session,
    ):
        with pytest.raises(asyncio.TimeoutError):
            await session.get(up.url)
        await asyncio.wait_for(up.disconnected.wait(), 2)


async def test_hang_after_chunks_then_client_leaves() -> None:
    script = Script(chunks=[b"data: 1\n\n"], end="hang")
    async with scripted_upstream(script) as up, aiohttp.ClientSession() as session:
        async with session.get(up.url) as resp:
            assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
            assert not up.disconnected.is_set()
        await asyncio.wait_for(up.disconnected.wait(), 2)


async def test_client_leaving_during_a_sleep_is_seen() -> None:
    script = Script(chunks=[b"data: 1\n\n", 30.0, b"data: 2\n\n"])
    async with scripted_upstream(script) as up, aiohttp.ClientSession() as session:
        async with session.get(up.url) as resp:
            await resp.content.readuntil(b"\n\n")
        await asyncio.wait_for(up.disconnected.wait(), 2)


async def test_script_is_taken_per_request_and_close_leaves_no_task() -> None:
    async with aiohttp.ClientSession() as session:
        async with scripted_upstream() as up:
            up.script = Script(chunks=[b"one"])
            async with session.get(up.url) as resp:
                assert await resp.read() == b"one"
            up.script = Script(status=503, headers={}, chunks=[b"busy"], framing="length")
            async with session.get(up.url) as resp:
                assert (resp.status, await resp.read()) == (503, b"busy")
            up.script = Script(before_headers="hang")
            pending = asyncio.create_task(session.post(up.url, data=b"{}"))
            await asyncio.wait_for(up.wait_for_requests(3), 2)
        # close() ended the hanging connection and every task of the upstream
        assert asyncio.all_tasks() == {pending, asyncio.current_task()}
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await pending
    assert [r[:2] for r in up.requests] == [("GET", "/v1"), ("GET", "/v1"), ("POST", "/v1")]
