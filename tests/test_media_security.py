"""What an image URL may make the processor read: no SSRF through http(s), no file outside the
allowed directories through file://. :class:`MediaLoader` directly (no engine, no NATS): a real
HTTP server on 127.0.0.1 that would serve a valid PNG, so a missing guard fails the tests, and
real files, symlinks and a FIFO in a temp directory. The processor role's flags through the CLI.
The end-to-end counterparts are in tests/test_multimodal.py.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.multimodal import media
from dynamo_worker.multimodal.media import CANNOT_FETCH, GuardedResolver, MediaLimits, MediaLoader
from tests.helpers import free_port, run_cli

WHERE = "messages[0].content[0]"
REFUSED = f"{WHERE}: {CANNOT_FETCH}"


def png(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


RED = png()


class ImageServer:
    """``/red.png`` (a valid PNG), ``/slow.png`` (3 s late), ``/redirect?to=URL`` (302), ``/loop``
    (redirects to itself); every request's path is recorded, so a test sees whether the loader
    connected at all."""

    def __init__(self) -> None:
        paths = self.paths = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                paths.append(self.path)
                url = urllib.parse.urlparse(self.path)
                if url.path in ("/redirect", "/loop"):
                    to = urllib.parse.parse_qs(url.query)["to"][0] if url.path == "/redirect" else "/loop"
                    self.send_response(302)
                    self.send_header("Location", to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if url.path == "/slow.png":
                    time.sleep(3)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(RED)))
                self.end_headers()
                try:
                    self.wfile.write(RED)
                except (BrokenPipeError, ConnectionResetError):
                    return  # /slow.png: the loader gave up before the answer (its timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    s = ImageServer()
    yield s
    s.close()


def loader(*domains: str, timeout: float = 5.0) -> MediaLoader:
    return MediaLoader(fetch_timeout=timeout, allowed_domains=media.parse_media_domains(domains))


async def refusal(load: MediaLoader, url: str) -> str:
    with pytest.raises(RequestError) as err:
        await load.load(url, WHERE)
    assert err.value.code == "bad_request"
    return err.value.message


# ---- remote URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fec0::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
        "2001:db8::1",
        "not-an-address",
        "",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not media.public_address(address)


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert media.public_address(address)


async def test_a_loopback_url_is_refused_by_default_though_a_server_there_would_serve_it(server: ImageServer) -> None:
    # The control: the server answers this very URL with a valid PNG when the host is allowed.
    assert await loader("127.0.0.1").load(server.url("/red.png"), WHERE) == media.normalize_image(
        RED, MediaLimits(), WHERE
    )
    before = len(server.paths)
    # By IP literal, by a name resolving to it, IPv4-mapped IPv6, and 0.0.0.0 (reaches this host).
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0"):
        assert await refusal(loader(), server.url("/red.png", host)) == REFUSED, host
    assert len(server.paths) == before, "the loader connected to a refused address"


async def test_a_refused_address_reads_like_a_closed_port_a_timeout_and_a_dns_failure(
    server: ImageServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    closed = free_port()  # nothing listens there
    caplog.set_level(logging.WARNING, logger=media.__name__)
    messages = {
        "refused address, open port": await refusal(loader(), server.url("/red.png")),
        "refused address, closed port": await refusal(loader(), f"http://127.0.0.1:{closed}/red.png"),
        "refused name": await refusal(loader(), server.url("/red.png", "localhost")),
        "connection refused": await refusal(loader("127.0.0.1"), f"http://127.0.0.1:{closed}/red.png"),
        "timeout": await refusal(loader("127.0.0.1", timeout=0.5), server.url("/slow.png")),
        "too many redirects": await refusal(loader("127.0.0.1"), server.url("/loop")),
    }

    class NoSuchHost(aiohttp.ThreadedResolver):
        async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> Any:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(aiohttp, "ThreadedResolver", NoSuchHost)  # what GuardedResolver asks
    messages["dns failure"] = await refusal(loader("images.internal"), "http://images.internal/red.png")
    assert set(messages.values()) == {REFUSED}, messages
    # The worker's log keeps each reason apart.
    logged = caplog.text
    for reason in (
        "127.0.0.1 is not a public address",
        "localhost resolves only to non-public addresses",
        "Connect call failed",
        "took over 0.5 s",
        "more than 5 redirects",
        "Name or service not known",
    ):
        assert reason in logged, reason


async def test_a_redirect_from_an_allowed_host_to_another_address_is_refused(server: ImageServer) -> None:
    load = loader("127.0.0.1")
    # The control: a redirect between allowed hosts is followed.
    assert await load.load(server.url("/redirect?to=" + server.url("/red.png")), WHERE)
    for target in (
        server.url("/red.png", "localhost"),
        server.url("/red.png", "[::ffff:127.0.0.1]"),
        server.url("/red.png", "[::1]"),
    ):
        before = len(server.paths)
        assert await refusal(load, server.url("/redirect?to=" + urllib.parse.quote(target))) == REFUSED, target
        assert [p.split("?")[0] for p in server.paths[before:]] == ["/redirect"], "the target was fetched"


async def test_a_host_not_in_the_allow_list_is_refused_by_name_before_connecting(server: ImageServer) -> None:
    before = len(server.paths)
    message = await refusal(loader("images.example.com"), server.url("/red.png"))
    assert message == f"{WHERE}: host '127.0.0.1' is not in --allowed-media-domains"
    assert len(server.paths) == before


async def test_no_remote_media_refuses_every_remote_url(server: ImageServer) -> None:
    before = len(server.paths)
    message = await refusal(MediaLoader(allow_remote=False), server.url("/red.png"))
    assert message == f"{WHERE}: remote image URLs are refused (--no-remote-media); send a data: URL"
    assert len(server.paths) == before


class FakeDNS:
    """An upstream resolver answering fixed addresses, as a rebinding DNS server would."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[dict[str, Any]]:
        return [
            {
                "hostname": host,
                "host": a,
                "port": port,
                "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
            for a in self.answers.pop(0)
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_filters_every_answer_so_a_rebinding_name_never_reaches_a_private_address() -> None:
    dns = GuardedResolver(
        upstream=FakeDNS(
            ["93.184.216.34"], ["127.0.0.1", "::1", "::ffff:10.0.0.1"], ["169.254.169.254", "93.184.216.34"]
        )
    )
    assert [r["host"] for r in await dns.resolve("rebind.example", 80)] == ["93.184.216.34"]
    with pytest.raises(OSError, match="resolves only to non-public addresses"):
        await dns.resolve("rebind.example", 80)  # the second answer: private
    assert [r["host"] for r in await dns.resolve("rebind.example", 80)] == ["93.184.216.34"]
    exempt = GuardedResolver(frozenset({"images.internal"}), upstream=FakeDNS(["10.0.0.5"]))
    assert [r["host"] for r in await exempt.resolve("Images.Internal.", 80)] == ["10.0.0.5"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--allowed-media-domains", "https://images.example.com"],
            (
                "--allowed-media-domains https://images.example.com: give a host name such as images.example.com "
                "(no scheme, port or path)"
            ),
        ),
        (
            ["--allowed-media-domains", "images.example.com", "--no-remote-media"],
            "--allowed-media-domains allows remote images that --no-remote-media refuses; pass only one of them",
        ),
    ],
)
def test_a_bad_allowed_media_domains_is_one_line_naming_the_flag(argv: list[str], message: str) -> None:
    out = run_cli("--multimodal-processor", "--enable-multimodal", "--model", "/nonexistent", *argv)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"dynamo-worker: error: {message}"]


# ---- file:// URLs -------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """An allowed directory with an image, a symlink to it, a symlink out and a FIFO; an image outside."""
    allowed, outside = tmp_path / "media", tmp_path / "secret"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "red.png").write_bytes(RED)
    (outside / "red.png").write_bytes(png((0, 0, 255)))  # a valid image: only the check refuses it
    (allowed / "inside-link.png").symlink_to(allowed / "red.png")
    (allowed / "out-link.png").symlink_to(outside / "red.png")
    os.mkfifo(allowed / "pipe.png")
    return {"allowed": allowed.resolve(), "outside": outside.resolve()}


def file_loader(files: dict[str, Path], max_bytes: int = media.DEFAULT_MAX_BYTES) -> MediaLoader:
    return MediaLoader(MediaLimits(max_bytes=max_bytes), allowed_dirs=(files["allowed"],))


async def test_files_below_the_allowed_directory_are_read(files: dict[str, Path]) -> None:
    want = media.normalize_image(RED, MediaLimits(), WHERE)
    for name in ("red.png", "inside-link.png"):
        assert await file_loader(files).load((files["allowed"] / name).as_uri(), WHERE) == want


async def test_a_file_that_exists_outside_the_allowed_directory_is_refused(files: dict[str, Path]) -> None:
    secret = files["outside"] / "red.png"
    assert secret.is_file()
    message = await refusal(file_loader(files), secret.as_uri())
    assert message == f"{WHERE}: {secret} is outside the directories --allowed-local-media-path allows"
    # A missing file there gets the same answer: a refusal tells nothing of what exists outside.
    missing = files["outside"] / "missing.png"
    assert await refusal(file_loader(files), missing.as_uri()) == message.replace(str(secret), str(missing))


async def test_dot_dot_out_of_the_allowed_directory_is_refused(files: dict[str, Path]) -> None:
    path = f"{files['allowed']}/../secret/red.png"
    message = await refusal(file_loader(files), f"file://{path}")
    assert message == f"{WHERE}: {path}: '..' leads outside the directories --allowed-local-media-path allows"


async def test_a_symlink_in_the_allowed_directory_pointing_outside_is_refused(files: dict[str, Path]) -> None:
    path = files["allowed"] / "out-link.png"
    message = await refusal(file_loader(files), path.as_uri())
    assert message == (
        f"{WHERE}: {path}: a symbolic link leads outside the directories --allowed-local-media-path allows"
    )


def unblock(fifo: Path) -> None:
    """End a read blocked on ``fifo`` (open it for writing and close it: the reader gets EOF), so a
    missing guard fails the test instead of hanging it in a thread nothing can cancel."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader is waiting on it
        return


async def test_a_fifo_in_the_allowed_directory_is_refused_without_blocking(files: dict[str, Path]) -> None:
    path = files["allowed"] / "pipe.png"
    try:
        message = await asyncio.wait_for(refusal(file_loader(files), path.as_uri()), 5)
    except asyncio.TimeoutError:
        unblock(path)
        pytest.fail(f"reading {path} blocked on the FIFO")
    assert message == f"{WHERE}: {path} is not a regular file (a FIFO)"


async def test_a_file_over_the_byte_limit_is_refused_before_it_is_read(files: dict[str, Path]) -> None:
    path = files["allowed"] / "red.png"
    message = await refusal(file_loader(files, max_bytes=len(RED) - 1), path.as_uri())
    assert message == f"{WHERE}: {path} is {len(RED)} bytes; the limit is {len(RED) - 1} (--max-image-bytes)"


def test_the_file_reader_refuses_a_fifo_and_a_symlink_swapped_in_after_the_check(files: dict[str, Path]) -> None:
    # read_regular_file gets a resolved path; something swapped in later is refused, never followed
    # or waited on (O_NOFOLLOW, O_NONBLOCK, and the check on the open descriptor).
    with pytest.raises(media.PathRefused, match="is not a regular file \\(a FIFO\\)"):
        media.read_regular_file(files["allowed"] / "pipe.png", 1000, "--max-image-bytes")
    with pytest.raises(media.PathRefused, match="is not a regular file \\(a symbolic link\\)"):
        media.read_regular_file(files["allowed"] / "out-link.png", 1000, "--max-image-bytes")


async def test_a_path_the_os_cannot_name_is_a_bad_request(files: dict[str, Path]) -> None:
    # os functions raise ValueError for these: they must be the caller's 400, not an internal error.
    message = await refusal(file_loader(files), f"file://{files['allowed']}/red%00.png")
    assert message == f"{WHERE}: '{files['allowed']}/red\\x00.png': a path cannot contain a NUL byte"
    message = await refusal(file_loader(files), f"file://{files['allowed']}/red\ud800.png")
    assert message == f"{WHERE}: '{files['allowed']}/red\\ud800.png': not a valid file name"
