import asyncio
import logging

import orjson
import pytest

from gateway.observability.log_setup import _JsonFormatter, _RequestIdFilter, request_id_var


def test_each_task_logs_its_own_request_id() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(_RequestIdFilter())
    logger = logging.getLogger("test.request_id")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def answer(rid: str) -> None:
        request_id_var.set(rid)
        await asyncio.sleep(0)
        logger.info("working on %s", rid)

    async def main() -> None:
        await asyncio.gather(answer("a"), answer("b"))

    try:
        asyncio.run(main())
        logger.info("outside any request")
    finally:
        logger.removeHandler(handler)
    assert {(r.getMessage(), r.request_id) for r in records} == {  # type: ignore[attr-defined]
        ("working on a", "a"),
        ("working on b", "b"),
        ("outside any request", "-"),
    }


@pytest.mark.parametrize("rid", ["req-1", "-"])
def test_json_lines_carry_the_request_id(rid: str) -> None:
    record = logging.LogRecord("gateway", logging.WARNING, __file__, 1, "failed: %s", ("x",), None)
    record.request_id = rid
    assert orjson.loads(_JsonFormatter().format(record)) | {"ts": 0} == {
        "ts": 0,
        "level": "warning",
        "logger": "gateway",
        "request_id": rid,
        "message": "failed: x",
    }
