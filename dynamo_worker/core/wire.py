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


class Control(msgspec.Struct, omit_defaults=True):
    """A control message to one instance; today only ``cancel`` (a request id)."""

    cancel: str | None = None


class Call(msgspec.Struct, tag="r"):
    """A request on a TCP request-plane connection: stream token ``s`` of this connection, the
    endpoint name ``e`` and the request envelope ``r``. Frames come back on the same connection
    as batches (:data:`Batch`) keyed by ``s``."""

    s: str
    e: str
    r: RequestEnvelope


class Cancel(msgspec.Struct, tag="c"):
    """Stop the request with this id (the caller went away); TCP counterpart of :class:`Control`."""

    id: str


_encoder = msgspec.json.Encoder()
_frame_decoder = msgspec.json.Decoder(Frame)
_request_decoder = msgspec.json.Decoder(RequestEnvelope)
_control_decoder = msgspec.json.Decoder(Control)
_batch_decoder = msgspec.json.Decoder(Batch)
_any_decoder = msgspec.json.Decoder()
_tcp_decoder = msgspec.json.Decoder(Call | Cancel)

DecodeError = msgspec.DecodeError


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_frame(data: bytes) -> Frame:
    return _frame_decoder.decode(data)


def decode_batch(data: bytes) -> Batch:
    return _batch_decoder.decode(data)


def decode_request(data: bytes) -> RequestEnvelope:
    return _request_decoder.decode(data)


def decode_control(data: bytes) -> Control:
    return _control_decoder.decode(data)


def decode_tcp(data: bytes) -> Call | Cancel:
    return _tcp_decoder.decode(data)


def decode_json(data: bytes) -> Any:
    return _any_decoder.decode(data)
