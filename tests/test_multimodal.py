"""The multimodal chain on the real vLLM engine (CPU, the tiny demo Blip2): frontend -> processor
-> encode -> LLM worker, and the ec-encoder path, driven with the official openai client.

One deployment for the module (engine start-up is the slow part); the tests run in file order.
The reference is vLLM's offline engine given the same prompt ids and each image as pixels,
computed before the workers start. The ec-encoder test swaps the processor for one using the
ec-encoder; the last test stops it and checks what a client then gets.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import openai
import pytest

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from tests.engine_helpers import ENGINE_FLAGS, offline_greedy_images
from tests.helpers import NatsServer, WorkerProcess, free_kv_event_port, free_port, wait_until, worker_env

MODEL = "vlm"
QUESTION = "What is in the picture?"
MAX_TOKENS = 12
MAX_IMAGE_BYTES = 20_000  # the processor's --max-image-bytes here: a noisy 200x200 PNG is over it


def png(size: tuple[int, int], color: tuple[int, int, int] | None = None, seed: int = 0) -> bytes:
    """A solid-colour PNG, or random noise (incompressible) without ``color``."""
    import random

    from PIL import Image

    if color is not None:
        im = Image.new("RGB", size, color)
    else:
        rng = random.Random(seed)
        im = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, kind: str = "image_url") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the processor may read file:// images from: two different images."""
    d = tmp_path_factory.mktemp("media")
    (d / "red.png").write_bytes(png((40, 30), (255, 0, 0)))
    (d / "blue.png").write_bytes(png((32, 32), (0, 60, 250)))
    return d


@pytest.fixture(scope="module")
def prompt_ids(vlm: str) -> list[int]:
    """The prompt the processor builds for ``image_message``: chat template, no special tokens added."""
    return chat_ids(vlm_tokenizer(vlm), QUESTION)


def vlm_tokenizer(vlm: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vlm, local_files_only=True)


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    """The prompt the processor builds for an image and ``question``, without the image's tokens."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def reference(
    vlm: str, media: Path, prompt_ids: list[int], tmp_path_factory: pytest.TempPathFactory
) -> list[list[int]]:
    """vLLM offline greedy output for the prompt with red.png, then blue.png, given as pixels."""
    return offline_greedy_images(
        vlm,
        prompt_ids,
        [str(media / "red.png"), str(media / "blue.png")],
        MAX_TOKENS,
        tmp_path_factory.mktemp("offline"),
    )


@pytest.fixture(scope="module")
def expected(vlm: str, reference: list[list[int]]) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vlm, local_files_only=True)
    # rstrip: like vLLM, the frontend drops a character the output stops inside (not U+FFFD).
    return [tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd") for ids in reference]


class Chain:
    """nats (shared), an LLM worker, an encode worker, a processor and a frontend in one namespace."""

    def __init__(self, nats: NatsServer, model: str, media: Path, tmp: Path) -> None:
        self.nats, self.model, self.media = nats, model, media
        self.namespace = f"mm{uuid.uuid4().hex[:8]}"
        self.ec_storage = tmp / "ec-shared"
        self.ec_storage.mkdir()
        self.common = ["--nats-url", nats.url, "--namespace", self.namespace]
        self.model_flags = ["--enable-multimodal", "--model", model, "--served-model-name", MODEL]
        self.http_port = free_port()
        self.workers: list[WorkerProcess] = []
        self.decode = self.start(
            [
                "--role",
                "decode",
                *self.model_flags,
                *self.common,
                *ENGINE_FLAGS,
                "--ec-storage-path",
                str(self.ec_storage),
            ],
            env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port())),
        )
        self.encode = self.start(["--multimodal-encode-worker", *self.model_flags, *self.common])
        self.processor = self.start_processor("encode")
        self.frontend = self.start(["--role", "frontend", *self.common, "--http-port", str(self.http_port)])
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=60)
        self.ec_encoder: WorkerProcess | None = None

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(argv, env=env)
        self.workers.append(worker)
        return worker

    def start_processor(self, encoder: str, *extra: str) -> WorkerProcess:
        return self.start(
            [
                "--multimodal-processor",
                *self.model_flags,
                *self.common,
                "--encoder",
                encoder,
                "--allowed-local-media-path",
                str(self.media),
                "--max-image-bytes",
                str(MAX_IMAGE_BYTES),
                "--media-fetch-timeout",
                "1",
                *extra,
            ]
        )

    def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Any:
        return self.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}, **kw
        )

    def post(self, messages: list[dict[str, Any]], max_tokens: int = MAX_TOKENS) -> tuple[int, dict[str, Any]]:
        body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(f"{self.base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def wait_for_processor(self, processor: WorkerProcess) -> None:
        """Until the frontend routes an image request through ``processor`` (discovery is async)."""
        processor.wait_for_log("serving", timeout=60)
        red = data_url((self.media / "red.png").read_bytes())
        wait_until(
            lambda: self.post(image_message(red))[0] == 200,
            30,
            interval=0.2,
            what="the frontend to route image requests to the processor",
        )

    def call(self, component: str, payload: dict[str, Any]) -> list[Any]:
        """One request to ``component.generate`` over the real runtime, as a peer role sends it."""

        async def go() -> list[Any]:
            rt = await Runtime.connect(self.nats.url, self.namespace)
            try:
                client = rt.client(component, "generate")
                await client.wait_for_instances(10)
                async with aclosing(client.generate(payload)) as stream:
                    return [item async for item in stream]
            finally:
                await rt.close()

        return asyncio.run(go())

    def stop(self) -> None:
        # All at once (each drains and stops its engine), then wait; stop() kills a straggler's group.
        running = [w for w in self.workers if w.proc.poll() is None]
        for worker in running:
            worker.signal(signal.SIGTERM)
        for worker in running:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                continue  # still draining: stop() below kills its process group
        for worker in reversed(self.workers):
            worker.stop()


@pytest.fixture(scope="module")
def chain(
    reference: Any, nats_server: NatsServer, vlm: str, media: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chain]:
    c = Chain(nats_server, vlm, media, tmp_path_factory.mktemp("chain"))
    try:
        c.frontend.wait_for_log("serving")
        c.encode.wait_for_log("serving", timeout=120)
        c.decode.wait_for_log("serving", timeout=300)
        c.wait_for_processor(c.processor)
        yield c
    finally:
        c.stop()


def test_an_image_answer_equals_vllm_offline_given_the_same_image_as_pixels(
    chain: Chain, media: Path, expected: list[str]
) -> None:
    for name, want in zip(("red.png", "blue.png"), expected, strict=True):
        out = chain.chat(image_message(data_url((media / name).read_bytes())))
        assert out.choices[0].message.content == want
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == MAX_TOKENS


def test_two_different_images_give_different_answers(chain: Chain, media: Path, reference: list[list[int]]) -> None:
    red, blue = (
        chain.chat(image_message(data_url((media / n).read_bytes()))).choices[0].message.content
        for n in ("red.png", "blue.png")
    )
    assert reference[0] != reference[1]
    assert red != blue


def test_a_streamed_image_answer_is_the_same_text(chain: Chain, media: Path, expected: list[str]) -> None:
    stream = chain.chat(image_message(data_url((media / "blue.png").read_bytes())), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected[1]


def test_file_urls_are_served_only_below_the_allowed_directory(chain: Chain, media: Path, expected: list[str]) -> None:
    out = chain.chat(image_message((media / "red.png").as_uri()))
    assert out.choices[0].message.content == expected[0]
    # A valid image that exists beside the allowed directory: only the check refuses it.
    outside = media.parent / f"{media.name}-outside.png"
    outside.write_bytes((media / "red.png").read_bytes())
    status, body = chain.post(image_message(outside.as_uri()))
    assert status == 400 and body["error"]["message"].endswith(
        f"messages[0].content[0]: {outside} is outside the directories --allowed-local-media-path allows"
    )
    escape = f"{media}/../{media.name}/../{outside.name}"
    status, body = chain.post(image_message(f"file://{escape}"))
    assert status == 400 and body["error"]["message"].endswith(
        f"messages[0].content[0]: {escape}: '..' leads outside the directories --allowed-local-media-path allows"
    )


BAD_MEDIA = [
    pytest.param(image_message(data_url(png((40, 30), (255, 0, 0))[:60])), "the image is corrupt", id="truncated"),
    pytest.param(image_message(data_url(b"this is not an image at all")), "not a readable image", id="not-an-image"),
    pytest.param(
        image_message(data_url(b"hello", "text/plain")),
        "media type 'text/plain' is not an image type",
        id="wrong-media-type",
    ),
    pytest.param(
        image_message(data_url(png((200, 200), seed=1))),
        f"over {MAX_IMAGE_BYTES} bytes (--max-image-bytes)",
        id="oversized",
    ),
    pytest.param(
        image_message("https://127.0.0.1:1/x.png".replace("https", "ftp")),
        "must be a data:, file:// or http(s):// URL",
        id="unknown-scheme",
    ),
    pytest.param(image_message(data_url(png((8, 8), (1, 2, 3))), "video_url"), "does not take video", id="video"),
    pytest.param(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png((8, 8), (1, 2, 3)))}},
                    {"type": "image_url", "image_url": {"url": data_url(png((8, 8), (3, 2, 1)))}},
                ],
            }
        ],
        "takes at most 1",
        id="two-images",
    ),
]


@pytest.mark.parametrize(("messages", "fragment"), BAD_MEDIA)
def test_bad_media_gets_a_400_and_the_chain_keeps_serving(
    chain: Chain, media: Path, expected: list[str], messages: list[dict[str, Any]], fragment: str
) -> None:
    status, body = chain.post(messages)
    assert status == 400 and fragment in body["error"]["message"], body
    out = chain.chat(image_message(data_url((media / "red.png").read_bytes())))
    assert out.choices[0].message.content == expected[0]


CANNOT_FETCH = "messages[0].content[0]: cannot fetch this image URL (the processor's log has the reason)"


@pytest.fixture
def image_server(media: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1: ``/red.png``, ``/big.png`` (over the byte limit), ``/slow.png``
    (3 s, over the processor's --media-fetch-timeout 1), ``/redirect?to=URL``, 404 otherwise; its
    base URL and the paths it was asked for."""
    import http.server
    import threading

    files = {
        "/red.png": (media / "red.png").read_bytes(),
        "/big.png": png((200, 200), seed=2),
        "/slow.png": (media / "red.png").read_bytes(),
    }
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            asked.append(self.path)
            path, _, query = self.path.partition("?")
            if path == "/redirect":
                self.send_response(302)
                self.send_header("Location", urllib.parse.unquote(query.removeprefix("to=")))
                self.end_headers()
                return
            if path == "/slow.png":
                time.sleep(3)
            body = files.get(path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                self.wfile.write(body or b"")
            except (BrokenPipeError, ConnectionResetError):
                return  # /slow.png: the processor gave up first

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_a_private_address_is_not_fetched_and_reads_like_a_closed_port(
    chain: Chain, image_server: tuple[str, list[str]]
) -> None:
    url, asked = image_server
    # The server would answer a valid PNG; the processor (no --allowed-media-domains) never asks it.
    status, body = chain.post(image_message(f"{url}/red.png"))
    assert status == 400 and body["error"]["message"].endswith(CANNOT_FETCH), body
    closed = chain.post(image_message(f"http://127.0.0.1:{free_port()}/red.png"))
    assert closed == (status, body)
    assert asked == []
    assert "127.0.0.1 is not a public address" in chain.processor.log()  # the reason, on the worker only


def test_a_remote_image_is_fetched_from_an_allowed_host_with_the_size_limit(
    chain: Chain, media: Path, expected: list[str], image_server: tuple[str, list[str]]
) -> None:
    chain.processor.stop()  # the same processor, with the test server's host allowed
    chain.processor = chain.start_processor("encode", "--allowed-media-domains", "127.0.0.1")
    chain.wait_for_processor(chain.processor)
    url, asked = image_server
    assert chain.chat(image_message(f"{url}/red.png")).choices[0].message.content == expected[0]
    status, body = chain.post(image_message(f"{url}/big.png"))
    assert status == 400 and f"is over {MAX_IMAGE_BYTES} bytes" in body["error"]["message"]
    status, body = chain.post(image_message(f"{url}/missing.png"))
    assert status == 400 and "answered HTTP 404" in body["error"]["message"]
    status, body = chain.post(image_message(f"{url}/slow.png"))
    assert status == 400 and body["error"]["message"].endswith(CANNOT_FETCH)
    # A redirect to a host not allowed is not followed, and reads the same.
    target = urllib.parse.quote(url.replace("127.0.0.1", "localhost") + "/red.png")
    status, body = chain.post(image_message(f"{url}/redirect?to={target}"))
    assert status == 400 and body["error"]["message"].endswith(CANNOT_FETCH)
    assert asked[-1].startswith("/redirect")


def test_the_prompt_with_its_image_tokens_is_checked_against_the_context(
    chain: Chain, media: Path, prompt_ids: list[int], vlm: str
) -> None:
    red = data_url((media / "red.png").read_bytes())
    room = 256 - len(prompt_ids) - 4  # --max-model-len 256; Blip2 adds 4 image tokens
    # A max_tokens past the context is lowered to what fits, as vllm serve does.
    status, body = chain.post(image_message(red), max_tokens=room + 50)
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= room
    # A question whose prompt fits the context alone but not with the image's tokens: the
    # processor counts them and refuses it, naming both parts.
    tokenizer = vlm_tokenizer(vlm)
    words = 1
    while len(chat_ids(tokenizer, "cat " * (words + 1))) < 256:
        words += 1
    text_tokens = len(chat_ids(tokenizer, "cat " * words))
    assert text_tokens < 256 <= text_tokens + 4
    message = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": red}}, {"type": "text", "text": "cat " * words}],
        }
    ]
    status, body = chain.post(message, max_tokens=1)
    assert status == 400, body
    assert f"({text_tokens} text tokens and 1 image(s) of 4)" in body["error"]["message"]
    assert "maximum context length is 256 tokens" in body["error"]["message"]


def test_a_text_only_chat_keeps_the_direct_path(chain: Chain) -> None:
    out = chain.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
    )
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 0


def _embeds(shape: list[int], dtype: str = "float32", nbytes: int | None = None) -> dict[str, Any]:
    size = {"float32": 4, "float16": 2, "int32": 4}[dtype]
    count = nbytes if nbytes is not None else size * shape[0] * shape[1] * shape[2]
    return {"dtype": dtype, "shape": shape, "data": base64.b64encode(b"\0" * count).decode()}


def test_wrong_embeddings_are_refused_before_the_engine_and_it_keeps_serving(
    chain: Chain, media: Path, prompt_ids: list[int], reference: list[list[int]]
) -> None:
    request = {
        "model": MODEL,
        "token_ids": prompt_ids,
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": MAX_TOKENS, "ignore_eos": True},
    }
    wrong = [
        (_embeds([1, 3, 128]), "needs [images, 4, 128]"),  # kills vLLM's engine if it gets there
        (_embeds([1, 4, 64]), "needs [images, 4, 128]"),
        (_embeds([2, 4, 128]), "2 images in one prompt"),
        (_embeds([1, 4, 128], nbytes=100), "has 100 bytes"),
        (_embeds([1, 4, 128], "int32"), "is not one of float32"),
    ]
    for embeds, fragment in wrong:
        with pytest.raises(RequestError) as err:
            chain.call("backend", {**request, "multi_modal_data": {"image_embeds": embeds}})
        assert err.value.code == "bad_request" and fragment in err.value.message
    # The engine is alive: the encode worker's embeddings give the pixels' answer.
    encoded = chain.call("encoder", {"images": [base64.b64encode((media / "red.png").read_bytes()).decode()]})
    assert encoded[0]["image_embeds"]["shape"] == [1, 4, 128]
    out = chain.call("backend", {**request, "multi_modal_data": {"image_embeds": encoded[0]["image_embeds"]}})
    assert [t for item in out for t in item["token_ids"]] == reference[0]


def test_the_ec_encoder_path_gives_the_same_answers_as_the_direct_path(
    chain: Chain, media: Path, expected: list[str], prompt_ids: list[int], reference: list[list[int]]
) -> None:
    chain.processor.stop()  # the next processor sends images to an ec-encoder instead
    chain.processor = chain.start_processor("ec-encoder")
    chain.processor.wait_for_log("serving", timeout=60)
    probe = image_message(data_url(png((8, 8), (9, 9, 9))))
    # No ec-encoder yet: the processor says what to start.
    wait_until(lambda: chain.post(probe)[0] == 503, 30, interval=0.2, what="the frontend to find the new processor")
    message = chain.post(probe)[1]["error"]["message"]
    assert "no ec-encoder worker serves model 'vlm'; start one: dynamo-worker --vllm-native-encoder-worker" in message
    chain.ec_encoder = chain.start(
        [
            "--vllm-native-encoder-worker",
            *chain.model_flags,
            *chain.common,
            *ENGINE_FLAGS,
            "--ec-storage-path",
            str(chain.ec_storage),
        ]
    )
    chain.ec_encoder.wait_for_log("serving", timeout=300)
    wait_until(lambda: chain.post(probe)[0] == 200, 30, interval=0.2, what="the processor to find the ec-encoder")

    def stored() -> set[str]:
        return {p.name for p in chain.ec_storage.iterdir()}

    entries: list[str] = []
    for name, want in zip(("red.png", "blue.png"), expected, strict=True):
        before = stored()
        out = chain.chat(image_message(data_url((media / name).read_bytes())))
        assert out.choices[0].message.content == want
        (entry,) = stored() - before  # the ec-encoder stored this image's encoder output
        entries.append(entry)
    # The LLM worker loads what the ec-encoder stored rather than encoding: store a third image,
    # put red's stored output in its place, then ask the LLM worker about the third image.
    green = png((16, 16), (0, 200, 0))
    before = stored()
    assert chain.call("ec_encoder", {"images": [base64.b64encode(green).decode()]}) == [{"stored": 1}]
    (green_entry,) = stored() - before
    for file in (chain.ec_storage / entries[0]).iterdir():
        (chain.ec_storage / green_entry / file.name).write_bytes(file.read_bytes())
    request = {
        "model": MODEL,
        "token_ids": prompt_ids,
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": MAX_TOKENS, "ignore_eos": True},
        "multi_modal_data": {"images": [base64.b64encode(green).decode()]},
    }
    out = chain.call("backend", request)
    assert [t for item in out for t in item["token_ids"]] == reference[0]
    # The control: the third image's own encoder output answers differently.
    encoded = chain.call("encoder", {"images": [base64.b64encode(green).decode()]})
    own = chain.call("backend", {**request, "multi_modal_data": {"image_embeds": encoded[0]["image_embeds"]}})
    assert [t for item in own for t in item["token_ids"]] != reference[0]


def test_without_a_processor_an_image_request_is_a_clear_503(chain: Chain, media: Path) -> None:
    chain.processor.stop()
    red = data_url((media / "red.png").read_bytes())
    wait_until(
        lambda: chain.post(image_message(red))[0] == 503,
        15,
        interval=0.2,
        what="the frontend to drop the stopped processor",
    )
    status, body = chain.post(image_message(red))
    assert body["error"]["type"] == "ServiceUnavailableError" and body["error"]["code"] == 503
    assert "start one: dynamo-worker --multimodal-processor --enable-multimodal" in body["error"]["message"]
    out = chain.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    assert out.usage.completion_tokens >= 1  # text-only requests never needed the processor
