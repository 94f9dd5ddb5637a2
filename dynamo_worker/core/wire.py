"""The messages of the request and event planes (NATS or TCP), and the one encoder/decoder for them.

JSON (through msgspec) rather than a binary format: a Dynamo user can read a captured frame, and
msgspec's JSON is fast enough that per-token frames are affordable (see docs/performance.md).
Nothing on the wire is ever unpickled.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Frame kinds on a response stream.
DATA = "d"
ERROR = "e"
END = "x"


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    """A structured error carried on a response stream.

    ``code`` is one of ``bad_request``, ``not_found``, ``unavailable``, ``cancelled``,
    ``engine_dead``, ``internal``. ``retryable`` says whether the same request may succeed on
    another instance (the frontend retries or migrates those).
    """

    code: str
    message: str
    retryable: bool = False


#: The error code of a message over the request plane's size limit (the NATS server's
#: ``max_payload``, which the TCP plane takes too): a request too large to send, or a response
#: frame too large to deliver. Not retryable (every instance has the same limit); HTTP 413.
TOO_LARGE = "too_large"

#: The error code a TCP worker answers with for an endpoint it does not (or no longer) serve:
#: the caller treats it as NATS's "no responders" (retry elsewhere, route around the instance).
NO_RESPONDERS = "no_responders"


class Frame(msgspec.Struct, omit_defaults=True):
    """One message on a response stream: data, an error, or the end. ``n`` numbers them from 0
    so the caller notices a lost message (core NATS is at-most-once)."""

    k: str
    n: int
    d: Any = None
    err: ErrorInfo | None = None


class RequestEnvelope(msgspec.Struct, omit_defaults=True):
    """A request: its id (used to cancel it) and the endpoint's payload.

    ``b``: the caller also takes its frames in batches (:data:`BATCH_SUBJECT` under its reply
    prefix), so a worker may send the frames of many of its streams in one message.
    """

    id: str
    p: Any
    b: bool = False


#: The last token of the subject a batch of frames goes to: ``{reply prefix}.b``. Stream
#: reply subjects end in a number, so it never names a stream.
BATCH_SUBJECT = "b"

#: A batch: ``[[reply token, frame], ...]`` in the order the frames were produced.
Batch = list[tuple[str, Frame]]


class Call(msgspec.Struct, tag="r"):
    """A request on a TCP request-plane connection: stream token ``s`` of this connection, the
    endpoint name ``e`` and the request envelope ``r``. Frames come back on the same connection
    as batches (:data:`Batch`) keyed by ``s``."""

    s: str
    e: str
    r: RequestEnvelope


class Cancel(msgspec.Struct, tag="c"):
    """Stop the request with this id (its caller went away), on either plane: on a TCP connection
    it reaches only the requests sent on that connection; on NATS it goes to the instance's
    control subject (``_DWCTL.{namespace}.{instance}``)."""

    id: str


# The TCP plane's handshake (dynamo_worker.core.request_plane_auth): the worker speaks first with
# a nonce, the caller proves the deployment's secret over both nonces, the worker proves it back.
# Nothing else is read from a connection before that.


class Hello(msgspec.Struct, tag="h"):
    """Worker to caller, on connect: the worker's nonce ``n`` (hex)."""

    n: str


class Auth(msgspec.Struct, tag="a"):
    """Caller to worker: the caller's nonce ``n`` and its proof ``m`` (hex HMAC) of the secret."""

    n: str
    m: str


class Welcome(msgspec.Struct, tag="w"):
    """Worker to caller: the worker's proof ``m`` of the same secret; calls may follow. ``i``: the
    worker closes the connection after this many idle seconds (the caller closes it first)."""

    m: str
    i: float = 0.0


class Refused(msgspec.Struct, tag="f"):
    """Worker to caller, then the worker closes: why the connection was not accepted."""

    why: str


_encoder = msgspec.json.Encoder()
_frame_decoder = msgspec.json.Decoder(Frame)
_request_decoder = msgspec.json.Decoder(RequestEnvelope)
_cancel_decoder = msgspec.json.Decoder(Cancel)
_batch_decoder = msgspec.json.Decoder(Batch)
_any_decoder = msgspec.json.Decoder()
_tcp_decoder = msgspec.json.Decoder(Call | Cancel)
_auth_decoder = msgspec.json.Decoder(Auth)
_greeting_decoder = msgspec.json.Decoder(Hello | Welcome | Refused)

DecodeError = msgspec.DecodeError


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_frame(data: bytes) -> Frame:
    return _frame_decoder.decode(data)


def decode_batch(data: bytes) -> Batch:
    return _batch_decoder.decode(data)


def decode_request(data: bytes) -> RequestEnvelope:
    return _request_decoder.decode(data)


def decode_cancel(data: bytes) -> Cancel:
    return _cancel_decoder.decode(data)


def decode_tcp(data: bytes) -> Call | Cancel:
    return _tcp_decoder.decode(data)


def decode_auth(data: bytes) -> Auth:
    return _auth_decoder.decode(data)


def decode_greeting(data: bytes) -> Hello | Welcome | Refused:
    return _greeting_decoder.decode(data)


def too_large_frame(frame: Frame, size: int, limit: int) -> Frame:
    """The error frame that takes the place of ``frame`` (``size`` bytes encoded) over ``limit``."""
    return Frame(
        ERROR,
        frame.n,
        err=ErrorInfo(
            TOO_LARGE,
            f"a response message of {size} bytes is over the request plane's {limit}-byte limit "
            "(the NATS server's max_payload); ask for less output per message (fewer logprobs, smaller "
            "media), or have the operator raise max_payload",
        ),
    )


def encode_batches(frames: Batch, limit: int) -> list[bytes]:
    """``frames`` as encoded batches of at most ``limit`` bytes each, in order. A frame too large
    on its own is replaced by :func:`too_large_frame`, which ends its stream for the caller."""
    payload = encode(frames)
    if len(payload) <= limit:
        return [payload]
    if len(frames) > 1:
        half = len(frames) // 2
        return encode_batches(frames[:half], limit) + encode_batches(frames[half:], limit)
    token, frame = frames[0]
    return [encode([(token, too_large_frame(frame, len(payload), limit))])]


def decode_json(data: bytes) -> Any:
    return _any_decoder.decode(data)
