"""A raw client of the TCP request plane, byte by byte, for tests that play a stranger or a
misbehaving peer (tests/test_tcp_plane.py, and the stacks that must refuse strangers)."""

from __future__ import annotations

import socket
import struct

from dynamo_worker.core import request_plane_auth, wire


def raw(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5)


def message(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def read_message(sock: socket.socket) -> bytes | None:
    """One length-prefixed message, or None if the peer closed the connection."""
    header = read_exactly(sock, 4)
    if header is None:
        return None
    body = read_exactly(sock, struct.unpack(">I", header)[0])
    return body


def read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def read_until_closed(sock: socket.socket) -> list[bytes]:
    """Every message the peer sends until it closes the connection (the socket's timeout bounds it)."""
    messages = []
    while (msg := read_message(sock)) is not None:
        messages.append(msg)
    return messages


def handshake(sock: socket.socket, secret: bytes) -> bytes:
    """Speak the caller's side of the handshake with ``secret``; returns the worker's answer."""
    hello = wire.decode_greeting(read_message(sock) or b"")
    assert isinstance(hello, wire.Hello)
    mine = request_plane_auth.new_nonce()
    sock.sendall(message(wire.encode(wire.Auth(mine, request_plane_auth.caller_proof(secret, hello.n, mine)))))
    return read_message(sock) or b""


def count_call(n: int, request_id: str = "raw-1", token: str = "1") -> bytes:
    """A well-formed call of ``math.count`` (the test workers' endpoint)."""
    return message(wire.encode(wire.Call(token, "count", wire.RequestEnvelope(request_id, {"n": n}, b=True))))
