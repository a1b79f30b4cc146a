import asyncio

from engines.process.log_ring import TRUNCATED, LineSplitter, LogRing


def test_ring_is_bounded_by_lines_and_bytes() -> None:
    ring = LogRing(max_lines=5, max_bytes=1000, max_line=100)
    for i in range(20):
        ring.append(f"line {i}")
    assert ring.tail() == [f"line {i}" for i in range(15, 20)]
    assert ring.tail(2) == ["line 18", "line 19"] and ring.tail(0) == []
    assert ring.total_lines == 20
    ring = LogRing(max_lines=1000, max_bytes=250, max_line=100)
    for _ in range(10):
        ring.append("y" * 100)
    assert ring.nbytes <= 250 and len(ring) == 2


def test_overlong_lines_are_truncated() -> None:
    ring = LogRing(max_line=10)
    ring.append("é" * 20)
    (line,) = ring.tail()
    assert line.endswith(TRUNCATED) and len(line.removesuffix(TRUNCATED).encode()) <= 10


def test_splitter_handles_chunk_boundaries_crlf_and_long_lines() -> None:
    out: list[str] = []
    split = LineSplitter(out.append, max_line=8)
    for chunk in (b"ab", b"c\r\nde", b"f\n", b"0123456789abcdef", b"ghij\nnext\n", b"tail"):
        split.feed(chunk)
    split.flush()
    assert out == ["abc", "def", "01234567" + TRUNCATED, "next", "tail"]


def test_splitter_survives_invalid_utf8() -> None:
    out: list[str] = []
    split = LineSplitter(out.append)
    split.feed(b"\xff\xfeok\n")
    assert out == ["\ufffd\ufffdok"]


def test_followers_get_new_lines_and_slow_ones_drop_instead_of_blocking() -> None:
    async def main() -> None:
        ring = LogRing()
        ring.append("before")
        fast = ring.subscribe()
        slow = ring.subscribe(maxsize=3)
        for i in range(10):
            ring.append(f"l{i}")
        assert [await fast.get() for _ in range(10)] == [f"l{i}" for i in range(10)]
        got = [await slow.get() for _ in range(4)]
        assert got[:3] == ["l0", "l1", "l2"] and "7 lines dropped" in got[3]
        assert slow.dropped == 7
        ring.append("later")
        assert await slow.get() == "later"
        reader = asyncio.create_task(_collect(fast))
        await asyncio.sleep(0)
        ring.append("live")
        await asyncio.sleep(0)
        fast.close()
        assert await asyncio.wait_for(reader, 5) == ["later", "live"]
        ring.close_followers()
        assert await slow.get() == "live"  # what was buffered is still delivered after close
        assert await slow.get() is None

    asyncio.run(main())


async def _collect(follower) -> list[str]:  # type: ignore[no-untyped-def]
    return [line async for line in follower]
