"""Images from a chat request, validated before anything heavy sees them.

The processor loads each ``image_url`` part with :class:`MediaLoader`:

* ``data:image/...;base64,...`` URLs: the media type must be an image type;
* ``file://`` URLs: only below a directory given with ``--allowed-local-media-path`` (vLLM's
  flag name); with none given every file URL is refused, so a request cannot read the worker's
  files. Paths are resolved (symlinks, ``..``) before the check;
* ``http(s)://`` URLs: fetched with aiohttp, with a timeout and a byte limit read as the body
  arrives (a huge or endless body is cut off, not buffered); ``--no-remote-media`` refuses them.

Every image is then decoded with Pillow: it must be one of :data:`FORMATS`, at most
``max_pixels`` pixels (checked from the header, before decoding) and at most ``max_bytes``, and
it must decode completely. It is converted to RGB and re-encoded as PNG: the bytes the encoder
and the LLM worker receive are the same lossless image, so an EC connector's content hash is
the same on both, and a corrupt or hostile file never reaches them. Any failure is a
``bad_request`` (HTTP 400) naming the content part.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import pathlib
import urllib.parse
from typing import Any

import attrs

from dynamo_worker.core.request_plane import RequestError

# Formats Pillow decodes that an image_url may carry.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
# Images travel inside one NATS message (1 MiB by default) as base64: about 700 kB of PNG fit.
DEFAULT_MAX_BYTES = 700_000
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_FETCH_TIMEOUT = 10.0


def add_limit_arguments(group: Any) -> None:
    """``--max-image-bytes`` and ``--max-image-pixels`` (processor and encode roles)."""
    group.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="N",
                       help="refuse an image larger than this, as sent and as PNG (default %(default)s: "
                            "an image travels in one NATS message)")
    group.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help="refuse an image with more pixels than this (default %(default)s)")


def limits_from(options: Any) -> MediaLimits:
    """The limits the options give; a one-line UsageError for a value below 1."""
    from dynamo_worker.core.options import check_positive

    check_positive("--max-image-bytes", options.max_image_bytes)
    check_positive("--max-image-pixels", options.max_image_pixels)
    return MediaLimits(options.max_image_bytes, options.max_image_pixels)


def bad(where: str, message: str) -> RequestError:
    return RequestError("bad_request", f"{where}: {message}")


@attrs.frozen
class MediaLimits:
    """What an image may be: ``--max-image-bytes``, ``--max-image-pixels``."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def normalize_image(raw: bytes, limits: MediaLimits, where: str) -> bytes:
    """``raw`` checked (format, size, complete decode) and re-encoded as RGB PNG."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) > limits.max_bytes:
        raise bad(where, f"the image is {len(raw)} bytes; the limit is {limits.max_bytes} (--max-image-bytes)")
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as im:
            width, height = im.size
            if width * height > limits.max_pixels:
                raise bad(where, f"the image is {width}x{height} pixels; the limit is {limits.max_pixels} "
                                 "pixels (--max-image-pixels)")
            im.load()  # decodes everything now: a truncated or corrupt file fails here
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
    except UnidentifiedImageError:
        raise bad(where, f"not a readable image (accepted formats: {', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise bad(where, f"the image is corrupt: {exc}") from None
    png = out.getvalue()
    if len(png) > limits.max_bytes:
        raise bad(where, f"the image is {len(png)} bytes as PNG; the limit is {limits.max_bytes} (--max-image-bytes)")
    return png


def open_png(data: bytes, limits: MediaLimits, where: str) -> Any:
    """A PIL image from PNG bytes a peer sent (checked again: the wire is not trusted)."""
    from PIL import Image

    png = normalize_image(data, limits, where)
    im = Image.open(io.BytesIO(png), formats=("PNG",))
    im.load()
    return im


@attrs.define
class MediaLoader:
    """Loads ``image_url`` parts: data URLs, allowed local files, remote URLs (see the module doc)."""

    limits: MediaLimits = attrs.field(factory=MediaLimits)
    allowed_dirs: tuple[pathlib.Path, ...] = ()
    allow_remote: bool = True
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT

    async def load(self, url: str, where: str) -> bytes:
        """The image at ``url`` as validated PNG bytes; a ``bad_request`` naming ``where`` otherwise."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            raw = self._data_url(url, where)
        elif scheme == "file":
            raw = self._file(url, where)
        elif scheme in ("http", "https"):
            raw = await self._fetch(url, where)
        else:
            raise bad(where, "image_url must be a data:, file:// or http(s):// URL")
        return normalize_image(raw, self.limits, where)

    def _data_url(self, url: str, where: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise bad(where, "a data: URL needs a comma before its payload")
        media_type, *params = header.split(";")
        if media_type.lower() not in MEDIA_TYPES:
            raise bad(where, f"media type {media_type or '(none)'!r} is not an image type this model takes "
                             f"({', '.join(MEDIA_TYPES)})")
        if "base64" not in params:
            raise bad(where, "image data: URLs must be base64-encoded (data:image/png;base64,...)")
        if len(payload) > self.limits.max_bytes * 4 // 3 + 4:
            raise bad(where, f"the image is over {self.limits.max_bytes} bytes (--max-image-bytes)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad(where, "the data: URL's base64 payload is malformed") from None

    def _file(self, url: str, where: str) -> bytes:
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad(where, "file:// URLs must name a local path (file:///dir/image.png)")
        if not self.allowed_dirs:
            raise bad(where, "file:// URLs are refused: the processor was started without "
                             "--allowed-local-media-path")
        path = pathlib.Path(urllib.parse.unquote(parsed.path)).resolve()
        if not any(path.is_relative_to(d) for d in self.allowed_dirs):
            raise bad(where, f"{path} is not below an --allowed-local-media-path directory")
        try:
            size = path.stat().st_size
            if size > self.limits.max_bytes:
                raise bad(where, f"the image is {size} bytes; the limit is {self.limits.max_bytes} (--max-image-bytes)")
            return path.read_bytes()
        except OSError as exc:
            raise bad(where, f"cannot read {path}: {os.strerror(exc.errno) if exc.errno else exc}") from None

    async def _fetch(self, url: str, where: str) -> bytes:
        import aiohttp

        if not self.allow_remote:
            raise bad(where, "remote image URLs are refused (--no-remote-media); send a data: URL")
        limit = self.limits.max_bytes
        try:
            timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
                if resp.status != 200:
                    raise bad(where, f"fetching {url} answered HTTP {resp.status}")
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if ctype and ctype not in MEDIA_TYPES:
                    raise bad(where, f"{url} has media type {ctype!r}, not an image type")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > limit:
                        raise bad(where, f"{url} is over {limit} bytes (--max-image-bytes)")
                return bytes(body)
        except TimeoutError:
            raise bad(where, f"fetching {url} took over {self.fetch_timeout:g} s (--media-fetch-timeout)") from None
        except aiohttp.ClientError as exc:
            raise bad(where, f"cannot fetch {url}: {exc}") from None


def sample_png(size: int = 8, color: tuple[int, int, int] = (128, 64, 32)) -> bytes:
    """A small solid-colour PNG: the health canary of the image-taking roles."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()
