"""Images from a chat request, validated before anything heavy sees them.

The processor loads each ``image_url`` part with :class:`MediaLoader`:

* ``data:image/...;base64,...`` URLs: the media type must be an image type;
* ``file://`` URLs: only below a directory given with ``--allowed-local-media-path`` (vLLM's
  flag name); with none given every file URL is refused, so a request cannot read the worker's
  files. Symlinks and ``..`` are resolved before the check (:func:`confine`), only a regular
  file is read (a FIFO or a device is refused without blocking), with the byte limit and off the
  event loop (:func:`read_regular_file`);
* ``http(s)://`` URLs: fetched with aiohttp, with a timeout and a byte limit read as the body
  arrives (a huge or endless body is cut off, not buffered); ``--no-remote-media`` refuses them.
  A request must not reach what only the worker can reach (SSRF): every hop, redirects
  included, may connect only to a public address (:func:`public_address`), checked on the
  address actually connected to; ``--allowed-media-domains`` (vLLM's flag) restricts the host
  names instead. Why a fetch failed is logged, never told to the caller (see :meth:`MediaLoader._fetch`).

Every image is then decoded with Pillow: it must be one of :data:`FORMATS`, at most
``max_pixels`` pixels (checked from the header, before decoding) and at most ``max_bytes``, and
it must decode completely. It is converted to RGB and re-encoded as PNG: the bytes the encoder
and the LLM worker receive are the same lossless image, so an EC connector's content hash is
the same on both, and a corrupt or hostile file never reaches them. Any failure is a
``bad_request`` (HTTP 400) naming the content part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import io
import ipaddress
import logging
import os
import pathlib
import socket
import stat
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp
import attrs
import yarl

from dynamo_worker.core.request_plane import RequestError

log = logging.getLogger(__name__)

# Formats Pillow decodes that an image_url may carry.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
# Images travel inside one NATS message (1 MiB by default) as base64: about 700 kB of PNG fit.
DEFAULT_MAX_BYTES = 700_000
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_FETCH_TIMEOUT = 10.0
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
# The one answer for a remote URL that cannot be fetched, whatever the reason (refused address,
# connection refused, timeout, DNS failure, too many redirects): a caller must not learn from it
# which internal hosts and ports exist. The reason goes to the worker's log.
CANNOT_FETCH = "cannot fetch this image URL (the processor's log has the reason)"


def add_limit_arguments(group: Any) -> None:
    """``--max-image-bytes`` and ``--max-image-pixels`` (processor and encode roles)."""
    group.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help="refuse an image larger than this, as sent and as PNG (default %(default)s: "
        "an image travels in one NATS message)",
    )
    group.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse an image with more pixels than this (default %(default)s)",
    )


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
                raise bad(
                    where,
                    f"the image is {width}x{height} pixels; the limit is {limits.max_pixels} "
                    "pixels (--max-image-pixels)",
                )
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


# ---- remote URLs: which addresses a fetch may connect to -----------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a fetch may connect to ``address``: a globally routable unicast address.

    Refused: loopback, private (RFC 1918, unique-local), shared (100.64/10), link-local (cloud
    metadata services live at 169.254.169.254), multicast, reserved, unspecified (0.0.0.0 and
    ``::`` reach this host on Linux), site-local, and IPv6 forms that embed such an IPv4 address
    (IPv4-mapped ``::ffff:127.0.0.1``, 6to4, NAT64). Unparseable input is refused (fail closed).
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return public_address(ip.ipv4_mapped)
        if ip in _NAT64:  # DNS64 networks reach every IPv4 host this way: the embedded one decides
            return public_address(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
        if ip.sixtofour is not None:
            return public_address(ip.sixtofour)
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_reserved or ip.is_unspecified
    )


def _host_key(host: str | None) -> str:
    """A host name as the allow-list compares it: lower case, no trailing dot."""
    return (host or "").lower().rstrip(".")


def parse_media_domains(values: Iterable[str]) -> frozenset[str]:
    """``--allowed-media-domains`` values as the hops' hosts compare (lower case, IDNA, IP addresses
    in their compressed form); a ValueError naming a value that is not a host name."""
    hosts = set()
    for value in values:
        host = value.strip()
        try:
            hosts.add(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        wrong = ValueError(
            f"--allowed-media-domains {value}: give a host name such as images.example.com (no scheme, port or path)"
        )
        if not host or any(c in host for c in "/:@[]?#% "):
            raise wrong
        try:
            hosts.add(_host_key(yarl.URL.build(scheme="http", host=host).raw_host))
        except ValueError:
            raise wrong from None
    return frozenset(hosts)


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """DNS for remote image fetches that drops every address :func:`public_address` refuses.

    The connector connects to exactly the addresses this returns, so the address checked is the
    address connected to: a name that answers a public address to a first lookup and a private
    one to the next (DNS rebinding) cannot slip through, and every redirect hop resolves here.
    Hosts in ``exempt`` (``--allowed-media-domains``) are the operator's choice and may resolve
    to private addresses (an internal image store). IP-literal URLs never reach a resolver in
    aiohttp: :meth:`MediaLoader._check_hop` checks those.
    """

    def __init__(self, exempt: frozenset[str] = frozenset(), upstream: Any = None) -> None:
        self.exempt = exempt
        # The system resolver (getaddrinfo: /etc/hosts, nsswitch), as every other client on the host.
        self.upstream = upstream if upstream is not None else aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        found = await self.upstream.resolve(host, port, family)
        if _host_key(host) in self.exempt:
            return found
        kept = [r for r in found if public_address(r["host"])]
        if not kept:
            # An OSError, as a failed lookup is: aiohttp reports it as a connection error (with
            # an errno, so its message keeps this one for the log).
            raise OSError(
                errno.EACCES,
                f"{host} resolves only to non-public addresses ({', '.join(sorted({r['host'] for r in found}))})",
            )
        return kept

    async def close(self) -> None:
        await self.upstream.close()


class _Unfetchable(Exception):
    """A hop refused before connecting; the message is for the log only."""


# ---- local files: the real path, regular files only --------------------------------------------


class PathRefused(ValueError):
    """A path a request named may not be read; the message says which rule refused it."""


def _below(path: str, directory: pathlib.Path) -> bool:
    return path == str(directory) or path.startswith(str(directory).rstrip(os.sep) + os.sep)


def confine(raw: str, allowed: Sequence[pathlib.Path], flag: str) -> pathlib.Path:
    """``raw`` with symlinks and ``..`` resolved, if that real path lies in one of ``allowed``
    (resolved directories); a :class:`PathRefused` naming the reason otherwise.

    The reason is chosen from the path as written, never from what exists outside ``allowed``,
    so a refusal does not tell whether a file outside exists.
    """
    if "\0" in raw:  # the OS cannot name such a path (os functions raise ValueError)
        raise PathRefused(f"{raw!r}: a path cannot contain a NUL byte")
    try:
        real = os.path.realpath(raw)
    except UnicodeEncodeError:  # a lone surrogate from the JSON: no file system name
        raise PathRefused(f"{raw!r}: not a valid file name") from None
    if any(_below(real, d) for d in allowed):
        return pathlib.Path(real)
    written = os.path.abspath(raw)  # ".." removed as text, symlinks kept
    if any(_below(written, d) for d in allowed):
        raise PathRefused(f"{raw}: a symbolic link leads outside the directories {flag} allows")
    if ".." in pathlib.PurePath(raw).parts:
        raise PathRefused(f"{raw}: '..' leads outside the directories {flag} allows")
    raise PathRefused(f"{written} is outside the directories {flag} allows")


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a refusal message."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: pathlib.Path) -> os.stat_result:
    """``path``'s stat if it is a regular file; :class:`PathRefused` otherwise (also when missing)."""
    try:
        st = os.stat(path, follow_symlinks=False)  # resolved already: a symlink now is a swap
    except OSError as exc:
        raise PathRefused(f"cannot read {path}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PathRefused(f"{path} is not a regular file ({file_kind(st.st_mode)})")
    return st


def read_regular_file(path: pathlib.Path, max_bytes: int, limit_flag: str) -> bytes:
    """The bytes of the regular file at the resolved ``path``, at most ``max_bytes`` of them.

    Blocking: call it off the event loop. The file is checked before it is opened (opening a
    device can have effects), then opened with O_NOFOLLOW (a symlink swapped in since the path
    was resolved is refused) and O_NONBLOCK (a FIFO swapped in does not block the open), and
    checked again on the open descriptor; at most ``max_bytes + 1`` bytes are read.
    """
    st = check_regular(path)
    if st.st_size > max_bytes:
        raise PathRefused(f"{path} is {st.st_size} bytes; the limit is {max_bytes} ({limit_flag})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(f.fileno())
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise PathRefused(f"{path} was replaced while it was opened")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise PathRefused(f"cannot read {path}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    if len(data) > max_bytes:
        raise PathRefused(f"{path} is over {max_bytes} bytes ({limit_flag})")
    return data


@attrs.define
class MediaLoader:
    """Loads ``image_url`` parts: data URLs, allowed local files, remote URLs (see the module doc).

    ``allowed_dirs`` must be resolved directories; ``allowed_domains`` are host names as
    :func:`parse_media_domains` gives them (empty: any host with a public address).
    """

    limits: MediaLimits = attrs.field(factory=MediaLimits)
    allowed_dirs: tuple[pathlib.Path, ...] = ()
    allow_remote: bool = True
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    allowed_domains: frozenset[str] = frozenset()

    async def load(self, url: str, where: str) -> bytes:
        """The image at ``url`` as validated PNG bytes; a ``bad_request`` naming ``where`` otherwise."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            raw = self._data_url(url, where)
        elif scheme == "file":
            raw = await self._file(url, where)
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
            raise bad(
                where,
                f"media type {media_type or '(none)'!r} is not an image type this model takes "
                f"({', '.join(MEDIA_TYPES)})",
            )
        if "base64" not in params:
            raise bad(where, "image data: URLs must be base64-encoded (data:image/png;base64,...)")
        if len(payload) > self.limits.max_bytes * 4 // 3 + 4:
            raise bad(where, f"the image is over {self.limits.max_bytes} bytes (--max-image-bytes)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad(where, "the data: URL's base64 payload is malformed") from None

    async def _file(self, url: str, where: str) -> bytes:
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad(where, "file:// URLs must name a local path (file:///dir/image.png)")
        if not self.allowed_dirs:
            raise bad(where, "file:// URLs are refused: the processor was started without --allowed-local-media-path")
        raw = urllib.parse.unquote(parsed.path)

        def read() -> bytes:
            path = confine(raw, self.allowed_dirs, "--allowed-local-media-path")
            return read_regular_file(path, self.limits.max_bytes, "--max-image-bytes")

        try:
            return await asyncio.to_thread(read)  # disk (or a slow network mount) must not stall the loop
        except PathRefused as exc:
            raise bad(where, str(exc)) from None

    def _check_hop(self, url: yarl.URL) -> None:
        """Refuse a hop before connecting: its scheme, its host against ``--allowed-media-domains``,
        and an IP-literal host against :func:`public_address` (names are checked when resolved)."""
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise _Unfetchable(f"{url} is not an http(s) URL with a host")
        host = _host_key(url.raw_host)
        if self.allowed_domains:
            if host not in self.allowed_domains:
                raise _Unfetchable(f"{host} is not in --allowed-media-domains")
            return
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return  # a name: GuardedResolver filters its addresses
        if not public_address(host):
            raise _Unfetchable(f"{host} is not a public address")

    async def _fetch(self, url: str, where: str) -> bytes:
        if not self.allow_remote:
            raise bad(where, "remote image URLs are refused (--no-remote-media); send a data: URL")
        try:
            first = yarl.URL(url)
        except ValueError:
            raise bad(where, "image_url is not a valid URL") from None
        if self.allowed_domains and _host_key(first.raw_host) not in self.allowed_domains:
            # Configuration, not the network: saying so tells nothing about internal hosts.
            raise bad(where, f"host {first.host!r} is not in --allowed-media-domains")
        try:
            return await asyncio.wait_for(self._get(first, where), self.fetch_timeout)
        except (_Unfetchable, OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError) as exc:
            # OSError covers refused connections and DNS failures, ClientError aiohttp's own,
            # ValueError a malformed Location header. The caller sees one message for all.
            reason = (
                f"took over {self.fetch_timeout:g} s (--media-fetch-timeout)"
                if isinstance(exc, asyncio.TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            log.warning("%s: cannot fetch %s: %s", where, url, reason)
            raise bad(where, CANNOT_FETCH) from None

    async def _get(self, url: yarl.URL, where: str) -> bytes:
        """GET ``url``, following at most :data:`MAX_REDIRECTS` redirects, each hop checked."""
        limit = self.limits.max_bytes
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allowed_domains))
        # trust_env=False: an HTTP(S)_PROXY would make the proxy, not the checked address, connect.
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            for _ in range(MAX_REDIRECTS + 1):
                self._check_hop(url)
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in REDIRECTS and "Location" in resp.headers:
                        url = url.join(yarl.URL(resp.headers["Location"]))
                        continue
                    if resp.status != 200:
                        raise bad(where, f"the image URL answered HTTP {resp.status}")
                    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                    if ctype and ctype not in MEDIA_TYPES:
                        raise bad(where, f"the image URL has media type {ctype!r}, not an image type")
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > limit:
                            raise bad(where, f"the image URL's body is over {limit} bytes (--max-image-bytes)")
                    return bytes(body)
        raise _Unfetchable(f"more than {MAX_REDIRECTS} redirects")


def sample_png(size: int = 8, color: tuple[int, int, int] = (128, 64, 32)) -> bytes:
    """A small solid-colour PNG: the health canary of the image-taking roles."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()
