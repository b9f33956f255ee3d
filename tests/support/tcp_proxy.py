"""A TCP proxy, in the test's own event loop, that can lose what passes through it on purpose.

In front of a real redis-server it makes the two failures a client cannot tell apart:
- a command that never reached Redis (`hold_requests`): a request sent while it is on is kept back, and
  so is everything after it on that connection, dropped when the client goes away;
- a command Redis applied whose reply was lost (`drop_replies_to`): requests pass, and once one holding
  these bytes (e.g. a key name) passed, that connection's replies are thrown away.
"""

from __future__ import annotations

import asyncio
import contextlib


class LossyProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.hold_requests = False
        self.drop_replies_to: bytes | None = None
        self.held = asyncio.Event()  # some request is being held back
        self.forwarded = asyncio.Event()  # some request passed while its reply will be dropped
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._handlers: set[asyncio.Future] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        holding, dropping = [False], [False]
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.target_port)
        up = asyncio.create_task(self._requests(client_in, server_out, holding, dropping))
        down = asyncio.create_task(self._replies(server_in, client_out, dropping))
        self._tasks |= {up, down}
        done = asyncio.ensure_future(asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED))
        self._handlers.add(done)
        with contextlib.suppress(asyncio.CancelledError):
            await done
        for task in (up, down):
            task.cancel()
        for writer in (client_out, server_out):
            writer.close()
        self._tasks -= {up, down}
        self._handlers.discard(done)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, holding: list[bool],
                        dropping: list[bool]) -> None:
        while data := await reader.read(65536):
            if self.hold_requests or holding[0]:
                holding[0] = True  # kept back, and the rest of this connection: dropped with it
                self.held.set()
                continue
            if self.drop_replies_to is not None and self.drop_replies_to in data:
                dropping[0] = True  # before it reaches Redis: its reply can't slip through
            writer.write(data)
            await writer.drain()
            if dropping[0]:
                self.forwarded.set()

    @staticmethod
    async def _replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dropping: list[bool]) -> None:
        while data := await reader.read(65536):
            if not dropping[0]:
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.sleep(0.01)  # the handlers close their connections
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
