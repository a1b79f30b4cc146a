"""The ``Exchange`` over the shared aiohttp session: https:// remotes, and every engine when raw connections are off.

aiohttp hands the body out through an awaited read, so a task reads it and passes each chunk to the sink,
waiting for what the sink returns (the ASGI ``send`` of a stream's events) before it reads on: the client's
pace holds the engine back. aiohttp's errors leave here as the exchange's own (``ConnectFailed``,
``EngineClosed``), so the relay has one set to handle.
"""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.proxy.upstream.exchange import ConnectFailed, EngineClosed, Exchange, Sink, retrieve

# What a broken engine connection looks like in aiohttp (ClientConnectorError, a refusal, is one of these too:
# ``start`` tells it apart first).
_BROKEN = (
    aiohttp.ClientPayloadError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientResponseError,
)


class SessionExchange(Exchange):
    """One POST through the shared ``aiohttp.ClientSession``."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._response: aiohttp.ClientResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done.add_done_callback(retrieve)

    async def start(self, url: str, headers: dict[str, str], body: bytes) -> None:
        try:
            self._response = await self._session.post(url, data=body, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            raise ConnectFailed from None  # the session's sock_connect is the connect clock
        except _BROKEN:
            raise EngineClosed("the engine closed the connection") from None
        self.status = self._response.status

    def header(self, name: str) -> str | None:
        assert self._response is not None
        return self._response.headers.get(name)

    def receive(self, sink: Sink) -> asyncio.Future[None]:
        self._reader = asyncio.get_running_loop().create_task(self._read(sink))
        return self._done

    async def _read(self, sink: Sink) -> None:
        assert self._response is not None
        read = self._response.content.readany
        done = self._done
        try:
            while chunk := await read():
                wait = sink(chunk)
                if wait is not None:
                    await wait
                if done.done():  # the sink finished the exchange
                    return
        except _BROKEN:
            if not done.done():
                done.set_exception(EngineClosed("the engine closed the connection"))
            return
        except Exception as exc:  # the client's send failing, say: the relay re-raises it where it waits
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(None)

    def finish(self, error: BaseException | None = None) -> None:
        if not self._done.done():
            if error is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(error)
        self._drop()

    def pause_reading(self) -> None:
        """Nothing to do: the reading task waits for each of the sink's writes before it reads on."""

    def resume_reading(self) -> None:
        """See ``pause_reading``."""

    def close(self, *, reuse: bool) -> None:
        self._drop()  # after a whole read, aiohttp has already given the connection back: the close is a no-op

    def _drop(self) -> None:
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if self._response is not None:
            self._response.close()  # drops the socket unless the answer was read whole: the engine is aborted
