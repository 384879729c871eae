"""A TCP proxy on loopback that delays every byte by half a round trip in each direction:
an emulated network RTT without `tc netem` (this kernel has none).

Usage: rtt_proxy.py UPSTREAM_PORT RTT_MS   (prints "listening PORT" on stdout, then serves)

Each chunk read is forwarded `RTT_MS / 2` after it arrived, in order; bandwidth is not
limited. Bounded: a connection's in-flight queue holds at most 64 chunks (the reader waits).
"""

import asyncio
import sys


async def pipe(reader, writer, delay):
    queue = asyncio.Queue(maxsize=64)
    loop = asyncio.get_running_loop()

    async def read():
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def write():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                try:
                    writer.write_eof()
                except OSError:
                    pass
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main():
    upstream, rtt_ms = int(sys.argv[1]), float(sys.argv[2])
    delay = rtt_ms / 2000.0

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, server_writer, delay),
            pipe(server_reader, client_writer, delay),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
