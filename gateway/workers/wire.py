"""The owner's control line to its workers: length-prefixed pickle frames on a Unix socket.

Pickle, because the config travels over it whole (pydantic models and dataclasses, exactly as the
owner validated them), and because a frame costs a microsecond either way. The trust boundary is the
socket: it lives in a directory only the gateway's user can enter (``mkdtemp``: 0700), and the owner
refuses a peer whose credentials say another uid. Both ends are this program.

Writes are coalesced: messages sent in one turn of the event loop leave in one ``write`` (one syscall),
which matters when hundreds of requests take and give back leases at once. What travels is one of
the typed messages of ``messages.py``, each as a plain tuple.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.workers.messages import Message, from_wire, to_wire

log = logging.getLogger("gateway.workers")

_LEN = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a config with thousands of models fits; a corrupt length does not


Out = TypeVar("Out", bound=Message)


def frame(message: Message) -> bytes:
    data = pickle.dumps(to_wire(message), protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Channel(asyncio.Protocol, Generic[Out]):
    """One end of the line, sending ``Out`` messages. ``on_message`` gets each decoded message (of either
    direction: the receiver's ``match`` says what it does not expect); ``on_close`` runs once when it ends."""

    def __init__(
        self,
        on_message: Callable[[Message], None],
        on_close: Callable[[], None] = lambda: None,
        *,
        same_user_only: bool = False,
    ) -> None:
        self._on_message = on_message
        self._same_user_only = same_user_only
        self._on_close = on_close
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._closed = asyncio.get_running_loop().create_future()

    # -- sending ------------------------------------------------------------------------------------

    def send(self, message: Out) -> None:
        if self._transport is None or self._transport.is_closing():
            return  # the other end is gone: what it would have done with this is undone by on_close
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frame(message))

    def _flush(self) -> None:
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Cut the line now, unsent messages dropped: ``close`` would first wait for a peer that reads nothing."""
        self._out.clear()
        if self._transport is not None:
            self._transport.abort()

    @property
    def closed(self) -> asyncio.Future[None]:
        return self._closed

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._same_user_only and not check_peer(transport):
            log.error("control line: refused a peer running as another user")
            transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= 4:
            (size,) = _LEN.unpack_from(buffer, start)
            if size > MAX_FRAME:
                log.error("control line: a frame of %d bytes; closing it", size)
                self.close()
                return
            if len(buffer) - start - 4 < size:
                break
            payload = buffer[start + 4 : start + 4 + size]
            start += 4 + size
            try:
                message = from_wire(pickle.loads(payload))
            except Exception:  # a frame from another version of this program: said, and skipped
                log.exception("control line: a frame that is not a message; skipped")
                continue
            try:
                self._on_message(message)
            except Exception:  # one bad message must not end the line that every request needs
                log.exception("control line: handling %s failed", type(message).__name__)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.clear()
        if not self._closed.done():
            self._closed.set_result(None)
            self._on_close()


def check_peer(transport: asyncio.BaseTransport) -> bool:
    """Whether the process at the other end runs as this one's user (the socket's directory already says
    so; this holds even if someone loosens its mode)."""
    sock = transport.get_extra_info("socket")
    try:
        return sock is not None and peer_uid(sock) == os.getuid()
    except OSError:
        return False
