"""A TCP fault proxy for fault tests: put it between a client and a server on 127.0.0.1, then break the path.

Built on asyncio protocols, not streams: bytes go from one socket's `data_received` straight to the other
socket's transport, and a transport whose write buffer passes its high-water mark pauses reading on the
opposite socket, so memory stays bounded per connection (about `_HIGH_WATER` plus one 256 KiB read in each
direction) however fast either end is.

Faults, each affecting every connection at once:

- `blackhole()`: connections stay open but nothing moves in either direction. The proxy stops reading both
  sockets (bytes already handed to a socket may still arrive), so the kernels' buffers fill as on a path that
  drops packets; new client connections are accepted but not connected to the target. Only the client's own
  timeouts and pings can notice. `restore()` resumes every black-holed connection where it stopped, nothing
  lost, as TCP does when a path heals, and connects the ones accepted meanwhile; to lose them instead, call
  `drop_all()` before `restore()`.
- `refuse()`: new client connections are accepted and reset at once (the port stays bound, so nothing else
  can take it and a broker advertising it keeps pointing here); clients see a connection reset.
- `drop_all()`: resets (RST) both sockets of every current connection.
- `cut()`: a network outage, `drop_all()` and `refuse()`.
- `restore()`: ends every fault; connections made from then on are forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import cast

_HIGH_WATER = 1 << 20  # bytes buffered towards one socket before the other one stops being read
_LOW_WATER = 256 << 10
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


@dataclass
class ProxyCounters:
    """What the proxy did, for tests to assert on."""

    accepted: int = 0  # client connections accepted, refused ones included
    refused: int = 0  # reset at once because the proxy was refusing
    dropped: int = 0  # reset by drop_all() / cut()
    target_failures: int = 0  # the target did not accept the proxy's connection (the client is then reset)
    bytes_to_target: int = 0  # forwarded client → target
    bytes_to_client: int = 0  # forwarded target → client


class _End(asyncio.Protocol):
    """One socket of a proxied connection (the client's or the target's); its `_Link` decides what to do."""

    def __init__(self, link: _Link, towards_target: bool) -> None:
        self.link = link
        self.towards_target = towards_target  # True for the client's socket: what it reads goes to the target
        self.transport: asyncio.Transport | None = None
        self.blocked = False  # our write buffer is over high water: the other socket must not be read
        self.eof = False  # our peer shut down its sending side
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_HIGH_WATER, low=_LOW_WATER)
        self.link.end_made(self)

    def data_received(self, data: bytes) -> None:
        self.link.forward(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.link.end_eof(self)
        return True  # keep the other direction open: half-close is forwarded, not turned into a close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.end_lost(self, exc)

    def pause_writing(self) -> None:
        self.blocked = True
        self.link.update_reading()

    def resume_writing(self) -> None:
        self.blocked = False
        self.link.update_reading()

    def reset(self) -> None:
        """Close with RST, dropping anything unsent (also when a graceful close is still flushing)."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.abort()


class _Link:
    """A client connection and, once connected, the proxy's connection to the target."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _End(self, towards_target=True)
        self.target = _End(self, towards_target=False)
        self.connecting: asyncio.Task[None] | None = None
        self.closing = False

    def end_made(self, end: _End) -> None:
        if end is self.target:
            if self.closing:
                end.reset()
            else:
                self.update_reading()
            return
        # Nothing is read from the client until the target is connected, so nothing piles up here.
        assert self.client.transport is not None
        self.client.transport.pause_reading()
        self.proxy._link_accepted(self)

    def connect(self) -> None:
        """Open the connection to the target (not while black-holed: the target must see nothing)."""
        if self.connecting is None and not self.closing:
            self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.target, self.proxy.target_host, self.proxy.target_port)
        except OSError:
            self.proxy.counters.target_failures += 1
            self.reset()

    def update_reading(self) -> None:
        """Read a socket only when the other one is connected, can take more and no blackhole holds the path."""
        for end, other in ((self.client, self.target), (self.target, self.client)):
            transport = end.transport
            if transport is None or transport.is_closing():
                continue
            wanted = not self.proxy.blackholed and other.transport is not None and not other.blocked and not end.eof
            if wanted and not transport.is_reading():
                transport.resume_reading()
            elif not wanted and transport.is_reading():
                transport.pause_reading()

    def forward(self, end: _End, data: bytes) -> None:
        other = self.target if end is self.client else self.client
        if other.transport is None or other.transport.is_closing():
            return
        other.transport.write(data)
        if end.towards_target:
            self.proxy.counters.bytes_to_target += len(data)
        else:
            self.proxy.counters.bytes_to_client += len(data)

    def end_eof(self, end: _End) -> None:
        other = self.target if end is self.client else self.client
        if other.transport is not None and not other.transport.is_closing() and other.transport.can_write_eof():
            other.transport.write_eof()
        if self.client.eof and self.target.eof:
            self.close()
        else:
            self.update_reading()

    def end_lost(self, end: _End, exc: Exception | None) -> None:
        other = self.target if end is self.client else self.client
        if exc is None:
            self.close()  # the other socket still gets what is buffered for it
        else:
            self.closing = True
            other.reset()  # pass a reset on as a reset
        if self.connecting is not None and end is self.client:
            self.connecting.cancel()
        if self.client.lost and (self.target.lost or self.target.transport is None):
            self.proxy._link_closed(self)

    def close(self) -> None:
        self.closing = True
        for end in (self.client, self.target):
            if end.transport is not None:
                end.transport.close()

    def reset(self) -> None:
        """Reset both sockets, as a broken path would."""
        self.closing = True
        if self.connecting is not None:
            self.connecting.cancel()
        self.client.reset()
        self.target.reset()


class FaultProxy:
    """Forwards TCP connections from 127.0.0.1:`port` to `target_host`:`target_port`, with faults on demand.

    See the module docstring for what each fault does. Use `async with FaultProxy(...)` or start()/stop().
    """

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_port = listen_port
        self.counters = ProxyCounters()
        self._blackholed = False
        self._refusing = False
        self._links: set[_Link] = set()  # until every socket of the link is closed
        self._server: asyncio.Server | None = None
        self._all_closed: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Listen on 127.0.0.1 (`listen_port`, or a free one when 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Link(self).client, "127.0.0.1", self.listen_port, reuse_address=True
        )
        self.listen_port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and reset every connection; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        links = list(self._links)
        for link in links:
            link.reset()
        connecting = [link.connecting for link in links if link.connecting is not None]
        await asyncio.gather(*connecting, return_exceptions=True)
        while self._links:  # resets complete on the next loop iterations; wait so that no socket outlives stop()
            self._all_closed = asyncio.get_running_loop().create_future()
            await self._all_closed

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port clients connect to (bound once started)."""
        return self.listen_port

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, as clients and advertised listeners spell it."""
        return f"127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections currently open, black-holed ones included."""
        return sum(not link.closing for link in self._links)

    @property
    def blackholed(self) -> bool:
        """Whether `blackhole()` holds."""
        return self._blackholed

    @property
    def refusing(self) -> bool:
        """Whether new connections are refused (`refuse()`, `cut()`)."""
        return self._refusing

    # --- faults

    def blackhole(self) -> None:
        """Stop forwarding in both directions while keeping every connection, old and new, open."""
        self._blackholed = True
        for link in self._links:
            link.update_reading()

    def refuse(self) -> None:
        """Reset new client connections as soon as they are accepted."""
        self._refusing = True

    def drop_all(self) -> None:
        """Reset every current connection, both the client's socket and the target's."""
        for link in list(self._links):
            if not link.closing:
                self.counters.dropped += 1
            link.reset()

    def cut(self) -> None:
        """A network outage: drop every connection and refuse new ones until `restore()`."""
        self.refuse()
        self.drop_all()

    def restore(self) -> None:
        """End every fault: black-holed connections resume (connecting those accepted meanwhile)."""
        self._refusing = False
        self._blackholed = False
        for link in list(self._links):
            link.connect()
            link.update_reading()

    # --- called by the links

    def _link_accepted(self, link: _Link) -> None:
        self.counters.accepted += 1
        self._links.add(link)
        if self._refusing or self._server is None:
            self.counters.refused += 1
            link.reset()
        elif not self._blackholed:
            link.connect()

    def _link_closed(self, link: _Link) -> None:
        self._links.discard(link)
        if not self._links and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)
