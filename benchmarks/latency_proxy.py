"""A TCP proxy that adds a fixed delay to every message in each direction: a Redis a network away.

    python benchmarks/latency_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

Each chunk read from one side is forwarded to the other ``DELAY_MS / 2`` later, in order, so a
request/reply round trip costs ``DELAY_MS`` more (a pipelined batch is one round trip, as on a
real network). Used by ``serve_vllm.py`` for the "Redis with 2 ms per round trip" rows.
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def send() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, None))
    await sender


async def serve(listen: int, target: int, delay_ms: float) -> None:
    half = delay_ms / 2000

    async def handle(client_r, client_w):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(_pipe(client_r, server_w, half), _pipe(server_r, client_w, half),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
