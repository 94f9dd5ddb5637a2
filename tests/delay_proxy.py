"""A delaying TCP proxy: latency between hosts where the kernel has no ``netem`` qdisc.

Each ``--forward LISTEN=TARGET`` accepts connections on ``LISTEN`` and opens one to ``TARGET`` per
connection. Bytes read from either side are handed to the other ``--delay-ms`` later, in order: a
connection through one proxy gains the delay once per direction, so a round trip gains twice it.
Each direction holds at most ``--max-chunks`` reads of up to 64 KiB (bounded memory); past that
it stops reading, and TCP's own flow control holds the sender back. An end of stream (or a reset)
is passed on after the data before it, as a FIN.

SIGUSR1 sets the delay to 0 and SIGUSR2 back to ``--delay-ms`` (so one deployment can be measured
with and without the delay); each change prints ``delay now N ms``. ``ready`` is printed once every
listener is up.

    python -m tests.delay_proxy --delay-ms 10 --forward 10.77.1.2:6222=127.0.0.1:6222

tests/netns.py puts one in front of each host's NATS route port (``NatsCluster(route_delay=...)``);
tests/test_cluster.py also puts one in front of each worker's TCP request-plane listener.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys

CHUNK = 64 * 1024


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_forward(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not LISTEN_HOST:PORT=TARGET_HOST:PORT")
    return parse_address(listen), parse_address(target)


class DelayProxy:
    """Forwards connections, delaying each direction's bytes by :attr:`delay` seconds."""

    def __init__(self, delay: float, max_chunks: int = 64) -> None:
        self.delay = delay
        self.max_chunks = max_chunks
        self.servers: list[asyncio.Server] = []

    async def listen(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._connection(reader, writer, target)

        self.servers.append(await asyncio.start_server(accept, *listen, reuse_address=True))

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: tuple[str, int]
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            print(f"cannot reach {target[0]}:{target[1]}: {exc}", flush=True)
            writer.transport.abort()
            return
        writers = (writer, up_writer)
        for w in writers:  # without it, Nagle's algorithm would add its own delay to small writes
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                await self._pipe(src, dst)
            except OSError:  # one side went away: end the other at once too
                for w in writers:
                    w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in writers:
                w.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy ``src`` to ``dst``, each read delivered :attr:`delay` after it was read, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_chunks)

        async def read() -> None:
            while True:
                try:
                    data = await src.read(CHUNK)
                except OSError:  # a reset: passed on as the end of the stream
                    data = b""
                await queue.put((loop.time() + self.delay, data))  # waits while the queue is full
                if not data:
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if dst.can_write_eof() and not dst.is_closing():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


async def main_async(args: argparse.Namespace) -> None:
    proxy = DelayProxy(args.delay_ms / 1000, args.max_chunks)
    loop = asyncio.get_running_loop()

    def set_delay(ms: float) -> None:
        proxy.delay = ms / 1000
        print(f"delay now {ms:g} ms", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, set_delay, 0.0)
    loop.add_signal_handler(signal.SIGUSR2, set_delay, args.delay_ms)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    for listen, target in args.forward:
        await proxy.listen(listen, target)
        print(f"{listen[0]}:{listen[1]} -> {target[0]}:{target[1]}, delay {args.delay_ms:g} ms each way", flush=True)
    print("ready", flush=True)
    await stop.wait()
    for server in proxy.servers:
        server.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.delay_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--forward",
        type=parse_forward,
        action="append",
        required=True,
        metavar="LISTEN_HOST:PORT=TARGET_HOST:PORT",
        help="a listener and where it forwards (repeatable)",
    )
    p.add_argument("--delay-ms", type=float, default=10.0, help="delay of each direction (default %(default)s)")
    p.add_argument(
        "--max-chunks",
        type=int,
        default=64,
        help="reads of up to 64 KiB held per direction before reading stops (default %(default)s)",
    )
    args = p.parse_args(argv)
    if args.delay_ms < 0 or args.max_chunks < 1:
        p.error("--delay-ms must be 0 or more and --max-chunks 1 or more")
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
