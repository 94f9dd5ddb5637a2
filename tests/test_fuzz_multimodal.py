"""Bad input and SIGTERM for the multimodal roles: ``encode``, ``ec-encoder``, ``processor`` and
the LLM worker's ``--enable-multimodal`` input.

One chain for the module: a real nats-server, an LLM worker (decode with ``--enable-multimodal``)
and an ``ec-encoder``, both on the real vLLM engine with the tiny demo Blip2, an ``encode`` worker
and a ``processor`` (``--no-remote-media``: nothing is fetched). No frontend: ``hypothesis``
talks to the bus.

* ``encoder.generate`` and ``ec_encoder.generate`` get random payloads (random JSON, mutated
  ``EncodeRequest``s whose images are valid images of many modes, formats and sizes, truncated
  or random bytes, non-base64 text) and raw messages (bytes, JSON, envelopes);
* ``processor.generate`` gets random payloads (random JSON, mutated chat requests: content
  parts of every type, data:/file:/ftp:/http: URLs with good and bad images, sampling fields
  replaced by random values) and raw messages;
* the LLM worker's ``backend.generate`` gets random ``multi_modal_data`` and raw messages;

every answer must be data or a structured ``bad_request``/``not_found`` error, never
``internal``/``unavailable``/``engine_dead``; each endpoint must have answered data to some
inputs and refused others; afterwards every process lives, none logged a traceback, and an
image request through processor -> encode -> LLM worker gives the greedy tokens it gave before
the fuzzing (the check that found NaN embeddings poisoning the KV cache, see
``test_nan_or_huge_embeddings_are_refused_and_never_poison_later_requests``). Then SIGTERM of the
processor, the encode worker and the ec-encoder with requests in flight on them: issue 8 asks
that each role drains and exits 0 on SIGTERM, so every in-flight request must complete and each
process exits 0. The tests run in file order (the SIGTERM tests last). Totals are printed
(``-s``) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from tests import fuzz_helpers
from tests.engine_helpers import ENGINE_FLAGS
from tests.helpers import (
    NatsServer,
    WorkerProcess,
    endpoint_inflight,
    free_kv_event_port,
    free_port,
    signal_while_busy,
    worker_env,
)

MODEL = "vlm"
MAX_IMAGE_BYTES = 20_000
BUS_FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RAW_FUZZ = settings(BUS_FUZZ, max_examples=30)
TRIED: Counter[str] = Counter()
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (component, "data" or the error code) of structured payloads


def png(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


# (mode, format) pairs Pillow writes: every one must be normalized to RGB PNG and encoded.
IMAGE_KINDS = [
    ("RGB", "PNG"),
    ("L", "PNG"),
    ("P", "PNG"),
    ("RGBA", "PNG"),
    ("I;16", "PNG"),
    ("1", "PNG"),
    ("LA", "PNG"),
    ("CMYK", "JPEG"),
    ("RGB", "JPEG"),
    ("P", "GIF"),
    ("RGB", "BMP"),
    ("RGBA", "WEBP"),
]


def image(kind: tuple[str, str], size: tuple[int, int], color: int) -> bytes:
    from PIL import Image

    mode, fmt = kind
    out = io.BytesIO()
    Image.new(mode, size, color if mode not in ("RGB", "RGBA", "CMYK") else None).save(out, format=fmt)
    return out.getvalue()


RED = png()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{b64(data)}"


def image_request(image: bytes = RED, max_tokens: int = 6) -> dict[str, Any]:
    """What the frontend sends ``processor.generate`` for a one-image chat request (greedy)."""
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": max_tokens, "ignore_eos": True},
    }


class Chain(fuzz_helpers.FuzzTarget):
    def __init__(self, nats: NatsServer, model: str, media: Path, ec_storage: Path) -> None:
        self.nats = nats
        self.namespace = f"fzmm{uuid.uuid4().hex[:8]}"
        common = ["--nats-url", nats.url, "--namespace", self.namespace, "--graceful-shutdown-timeout", "60"]
        flags = ["--enable-multimodal", "--model", model, "--served-model-name", MODEL, *common]
        self.encode_port = free_port()
        self.processor_port = free_port()
        self.ec_encoder_port = free_port()
        self.processes = {
            "decode": WorkerProcess(
                ["--role", "decode", *flags, *ENGINE_FLAGS],
                env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port())),
            ),
            "encode": WorkerProcess(
                [
                    "--multimodal-encode-worker",
                    *flags,
                    "--system-port",
                    str(self.encode_port),
                    "--max-image-bytes",
                    str(MAX_IMAGE_BYTES),
                ]
            ),
            "processor": WorkerProcess(
                [
                    "--multimodal-processor",
                    *flags,
                    "--system-port",
                    str(self.processor_port),
                    "--no-remote-media",
                    "--allowed-local-media-path",
                    str(media),
                    "--max-image-bytes",
                    str(MAX_IMAGE_BYTES),
                ]
            ),
            "ec-encoder": WorkerProcess(
                [
                    "--vllm-native-encoder-worker",
                    *flags,
                    *ENGINE_FLAGS,
                    "--ec-storage-path",
                    str(ec_storage),
                    "--system-port",
                    str(self.ec_encoder_port),
                    "--max-image-bytes",
                    str(MAX_IMAGE_BYTES),
                ],
                env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port())),
            ),
        }
        super().__init__()
        self.instances: dict[str, str] = {}  # component -> instance id

    def start(self) -> None:
        for name, proc in self.processes.items():
            proc.wait_for_log("serving", timeout=300 if name in ("decode", "ec-encoder") else 120)
        self.runtime = self.loop.run(Runtime.connect(self.nats.url, self.namespace, name="mm-fuzzer"))

        async def discover(component: str) -> str:
            assert self.runtime is not None  # the client's watcher lives on the loop
            return (await self.runtime.client(component, "generate").wait_for_instances(30))[0].instance_id

        for component in ("encoder", "processor", "backend", "ec_encoder"):
            self.instances[component] = self.loop.run(discover(component), timeout=40)

    async def collect(self, component: str, payload: Any) -> list[Any]:
        assert self.runtime is not None
        client = self.runtime.client(component, "generate")
        async with aclosing(client.direct(payload, self.instances[component])) as stream:
            return [item async for item in stream]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    (d / "red.png").write_bytes(RED)
    (d / "junk.png").write_bytes(b"not an image")
    return d


@pytest.fixture(scope="module")
def chain(nats_server: NatsServer, vlm: str, media: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    c = Chain(nats_server, vlm, media, tmp_path_factory.mktemp("ec-storage"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def baseline(chain: Chain) -> list[int]:
    """The greedy answer to the red image through processor -> encode -> LLM worker, before fuzzing."""
    out = chain.loop.run(chain.collect("processor", image_request()), timeout=120)
    tokens = [t for item in out for t in item["token_ids"]]
    assert len(tokens) == 6
    return tokens


# ---- strategies --------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-5, max_value=600)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)


def _truncate(data: bytes, n: int) -> bytes:
    return data[:n]


valid_images = st.just(RED) | st.builds(
    image,
    st.sampled_from(IMAGE_KINDS),
    st.tuples(st.integers(1, 4), st.integers(1, 4))
    | st.tuples(st.integers(1, 48), st.integers(1, 48))
    | st.sampled_from([(1, 300), (300, 1), (2, 200)]),
    st.integers(0, 255),
)
image_bytes = (
    valid_images
    | st.binary(max_size=200)
    | st.builds(_truncate, st.just(png((24, 24), (1, 2, 3))), st.integers(0, 120))
)
image_fields = image_bytes.map(b64) | st.text(max_size=40) | json_values

encode_payloads = (
    json_values
    | st.builds(lambda im: {"images": [b64(im)]}, valid_images)
    | st.builds(
        lambda images, extra: {"images": images, **extra},
        st.lists(image_fields, max_size=3),
        st.dictionaries(
            st.sampled_from(["model", "extra", "image_embeds", "token_ids"]) | st.text(max_size=6),
            st.sampled_from([MODEL, "nope", ""]) | json_values,
            max_size=2,
        ),
    )
)

urls = (
    image_bytes.map(data_url)
    | st.builds(data_url, image_bytes, st.sampled_from(["image/jpeg", "text/plain", "", "image/x"]))
    | st.sampled_from(
        [
            "data:image/png,abc",
            "data:image/png;base64,!!!",
            "data:",
            "file:///etc/passwd",
            "file:///nonexistent/x.png",
            "ftp://127.0.0.1/x.png",
            "http://127.0.0.1:1/x.png",
            "file://otherhost/x.png",
            "",
            "javascript:alert(1)",
        ]
    )
    | st.text(max_size=40)
)
parts = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, st.text(max_size=40) | json_values),
    st.builds(lambda url: {"type": "image_url", "image_url": {"url": url}}, urls),
    st.builds(lambda url: {"type": "image_url", "image_url": url}, urls | json_values),
    st.builds(
        lambda kind, value: {"type": kind, kind: value},
        st.sampled_from(["video_url", "video", "input_audio", "image", "file", "image_url"]) | st.text(max_size=8),
        json_values | urls,
    ),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values,
            "content": st.text(max_size=40) | st.lists(parts, max_size=3) | json_values,
        }
    ),
    max_size=3,
)
PROCESSOR_FIELDS = [
    "messages",
    "model",
    "stop_conditions",
    "sampling_options",
    "output_options",
    "token_ids",
    "multi_modal_data",
    "prompt_embeds",
    "eos_token_ids",
    "annotations",
    "routing",
    "extra_args",
]
nested_options = st.dictionaries(
    st.sampled_from(
        [
            "max_tokens",
            "min_tokens",
            "stop_token_ids",
            "ignore_eos",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "logprobs",
            "n",
            "image_embeds",
            "images",
        ]
    )
    | st.text(max_size=6),
    json_values | st.integers(min_value=-2, max_value=300),
    max_size=4,
)
processor_payloads = json_values | st.builds(
    lambda image, changes, dropped: {k: v for k, v in {**image_request(image), **changes}.items() if k not in dropped},
    valid_images | image_bytes,
    st.dictionaries(
        st.sampled_from(PROCESSOR_FIELDS) | st.text(max_size=8), messages | nested_options | json_values, max_size=3
    ),
    st.sets(st.sampled_from(["messages", "model", "stop_conditions"]), max_size=2),
)
ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
FILLS = [b"\0", b"\x7f", b"\xff", b"\x01\x02\x03"]  # zeros, huge values, NaNs, noise


def filled(dtype: str, shape: list[int], fill: bytes) -> dict[str, Any]:
    size = math.prod(shape) * ITEM_SIZE.get(dtype, 4)
    return {"dtype": dtype, "shape": shape, "data": b64((fill * size)[:size])}


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    """``TensorData``: any dtype and shape, with the byte count they need or a random one."""
    dtype = draw(st.sampled_from([*ITEM_SIZE, "int32", "float64", "", "torch.float32"]) | st.text(max_size=5))
    shape = draw(
        st.sampled_from(
            [[1, 4, 128], [1, 3, 128], [2, 4, 128], [4, 128], [1, 4, 128, 1], [0, 4, 128], [-1, 4, 128], [1, 4, 64], []]
        )
        | st.lists(st.integers(-2, 2**40) | json_values, max_size=5)
    )
    sane = isinstance(shape, list) and all(type(d) is int and 0 < d < 1000 for d in shape)
    if sane and math.prod(shape) < 20_000 and draw(st.booleans()):
        return filled(dtype, shape, draw(st.sampled_from(FILLS)))
    return {"dtype": dtype, "shape": shape, "data": draw(st.binary(max_size=64).map(b64) | json_values)}


multi_modal_data = st.one_of(
    st.builds(
        lambda dtype, fill: {"image_embeds": filled(dtype, [1, 4, 128], fill)},
        st.sampled_from(list(ITEM_SIZE)),
        st.sampled_from(FILLS),
    ),
    st.builds(lambda t: {"image_embeds": t}, tensors()),
    st.builds(lambda images: {"images": images}, st.lists(image_fields, max_size=2)),
    st.dictionaries(
        st.sampled_from(["image_embeds", "images", "extra", "video", "image"]),
        tensors()
        | st.lists(image_fields, max_size=2)
        | st.dictionaries(st.text(max_size=5), tensors(), max_size=2)
        | json_values,
        max_size=3,
    ),
    json_values,
)
backend_payloads = st.builds(
    lambda mm, tokens: {
        "model": MODEL,
        "token_ids": tokens,
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": 2},
        "multi_modal_data": mm,
    },
    multi_modal_data,
    st.sampled_from([[2, 100, 200, 300], [5, 6], list(range(1, 240))]),
)
raw_messages = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.builds(lambda i, p: json.dumps({"id": i, "p": p}).encode(), json_values, json_values)
)


# ---- the fuzzing -------------------------------------------------------------------------------


async def call(chain: Chain, component: str, payload: Any) -> RequestError | None:
    assert chain.runtime is not None
    return await fuzz_helpers.call(chain.runtime, component, "generate", chain.instances[component], payload)


async def send_raw(chain: Chain, component: str, data: bytes) -> None:
    assert chain.runtime is not None
    await fuzz_helpers.send_raw(chain.runtime, component, "generate", chain.instances[component], data)


def test_the_fuzzer_reaches_past_validation(chain: Chain, baseline: list[int]) -> None:
    """The strategies' valid corners really are valid: the checks below are not all rejections."""
    assert chain.loop.run(call(chain, "encoder", {"images": [b64(RED)], "model": MODEL})) is None
    assert chain.loop.run(call(chain, "processor", image_request(png((5, 7), (9, 9, 9)))), timeout=120) is None
    err = chain.loop.run(call(chain, "encoder", {"images": [b64(RED)], "model": "nope"}))
    assert err is not None and err.code == "not_found"
    err = chain.loop.run(call(chain, "processor", {**image_request(), "messages": "hi"}))
    assert err is not None and err.code == "bad_request"


STRATEGIES = {
    "encoder": encode_payloads,
    "ec_encoder": encode_payloads,
    "processor": processor_payloads,
    "backend": backend_payloads,
}


def embeds_of(value: float, dtype: str = "float32") -> dict[str, Any]:
    import torch

    t = torch.full((1, 4, 128), value, dtype=getattr(torch, dtype))
    raw = t.view(torch.int16) if dtype == "bfloat16" else t
    return {"dtype": dtype, "shape": [1, 4, 128], "data": b64(raw.numpy().tobytes())}


def test_nan_or_huge_embeddings_are_refused_and_never_poison_later_requests(chain: Chain, baseline: list[int]) -> None:
    """Found by this fuzzer: image embeddings of NaN (or of values so large the model overflows)
    were run by vLLM, and on CPU the NaNs its attention wrote to the KV cache stayed in the freed
    blocks: every later request of any client whose prompt took them answered token 0 forever.
    The LLM worker now refuses them; the largest values it takes leave later answers intact."""

    def backend(embeds: dict[str, Any], length: int) -> RequestError | None:
        return chain.loop.run(
            call(
                chain,
                "backend",
                {
                    "model": MODEL,
                    "token_ids": list(range(1, length)),
                    "sampling_options": {"temperature": 0.0},
                    "stop_conditions": {"max_tokens": 2},
                    "multi_modal_data": {"image_embeds": embeds},
                },
            ),
            timeout=120,
        )

    for value, dtype, fragment in [
        (math.nan, "float32", "non-finite"),
        (math.inf, "float16", "non-finite"),
        (-math.inf, "bfloat16", "non-finite"),
        (3e38, "float32", "magnitude 3e+38"),
        (1.001e4, "float32", "magnitude 1e+04"),
    ]:
        err = backend(embeds_of(value, dtype), 60)
        assert err is not None and err.code == "bad_request" and fragment in err.message, (value, dtype, err)
    for length in (3, 60, 120, 200):  # prompts over several KV blocks, at the limit of what is taken
        for value in (1e4, -1e4):
            assert backend(embeds_of(value), length) is None
    out = chain.loop.run(chain.collect("processor", image_request()), timeout=120)
    assert [t for item in out for t in item["token_ids"]] == baseline


@pytest.mark.parametrize("component", list(STRATEGIES))
def test_random_payloads_and_raw_messages_get_data_or_a_clean_error(
    chain: Chain, baseline: list[int], component: str
) -> None:
    """``backend`` is the LLM worker's ``generate`` with ``--enable-multimodal``: random
    ``multi_modal_data`` (embeddings of every dtype, shape and byte count, NaN and huge values,
    images, unknown keys); wrong embeddings kill vLLM's engine if they reach it."""
    strategy = STRATEGIES[component]

    @BUS_FUZZ
    @given(payload=strategy)
    def structured(payload: Any) -> None:
        TRIED[f"{component}.generate payloads"] += 1
        err = chain.loop.run(call(chain, component, payload), timeout=120)
        OUTCOMES[component, "data" if err is None else err.code] += 1

    @RAW_FUZZ
    @given(data=raw_messages)
    def raw(data: bytes) -> None:
        TRIED[f"{component}.generate raw"] += 1
        chain.loop.run(send_raw(chain, component, data), timeout=120)

    structured()
    raw()
    assert chain.all_alive() == dict.fromkeys(chain.processes)
    # Both sides were exercised: some inputs got past validation (to the encoder, or through
    # encode and the LLM worker), some were refused.
    print(
        f"\nFIGURE multimodal fuzz {component} outcomes: "
        f"{ {code: n for (c, code), n in OUTCOMES.items() if c == component} }"
    )
    assert OUTCOMES[component, "data"] >= 3 and OUTCOMES[component, "bad_request"] >= 10


def test_after_the_fuzzing_every_process_lives_and_the_chain_answers_as_before(
    chain: Chain, baseline: list[int]
) -> None:
    assert chain.all_alive() == dict.fromkeys(chain.processes)
    out = chain.loop.run(chain.collect("processor", image_request()), timeout=120)
    assert [t for item in out for t in item["token_ids"]] == baseline
    for name, proc in chain.processes.items():
        assert "Traceback" not in proc.log(), f"{name} logged a traceback:\n{proc.log()[-3000:]}"
    total = sum(TRIED.values())
    print(f"\nFIGURE multimodal fuzz: {total} malformed or random inputs, 0 processes died")
    for target, count in sorted(TRIED.items()):
        print(f"FIGURE multimodal fuzz {target}: {count}")
    assert total >= 200


# ---- SIGTERM with requests in flight -----------------------------------------------------------
# Each role is called on its instance itself (``Chain.collect``: the runtime's ``Client.direct``, no
# frontend): nothing retries or migrates, so a request the signalled role cut is an error in
# ``results``, and the role's log must not report any cut ("did not finish in time").


def test_sigterm_to_the_processor_mid_stream_drains_it_and_exits_0(chain: Chain, baseline: list[int]) -> None:
    long_tokens = 120
    proc = chain.processes["processor"]

    def start(_wave: int) -> list[asyncio.Task[Any]]:
        return [
            asyncio.create_task(chain.collect("processor", image_request(max_tokens=long_tokens))) for _ in range(4)
        ]

    at_signal, results = chain.loop.run(
        signal_while_busy(proc, signal.SIGTERM, start, lambda: endpoint_inflight(chain.processor_port), at_least=4),
        timeout=300,
    )
    assert proc.wait(120) == 0
    errors = [r for r in results if isinstance(r, BaseException)]
    print(f"\nFIGURE sigterm processor: {at_signal:.0f} image requests in flight at the signal, {len(errors)} failed")
    assert errors == [], errors
    for out in results:
        tokens = [t for item in out for t in item["token_ids"]]
        assert len(tokens) == long_tokens and tokens[: len(baseline)] == baseline
    log = proc.log()
    assert "draining" in log and "did not finish in time" not in log and "Traceback" not in log


def test_sigterm_to_the_encode_worker_with_requests_in_flight_drains_it_and_exits_0(chain: Chain) -> None:
    proc = chain.processes["encode"]
    count = 24

    def start(wave: int) -> list[asyncio.Task[Any]]:  # each wave's images are new to the worker
        return [
            asyncio.create_task(
                chain.collect("encoder", {"images": [b64(png((20 + i % 200, 20 + i // 200), (i % 256, 9, 9)))]})
            )
            for i in range(wave * count, wave * count + count)
        ]

    at_signal, results = chain.loop.run(
        signal_while_busy(proc, signal.SIGTERM, start, lambda: endpoint_inflight(chain.encode_port)), timeout=300
    )
    assert proc.wait(120) == 0
    errors = [r for r in results if isinstance(r, BaseException)]
    print(
        f"\nFIGURE sigterm encode: {count} encode requests, {at_signal:.0f} in flight on the worker at the "
        f"signal, {len(errors)} failed"
    )
    assert errors == [], errors
    assert all(len(out) == 1 and out[0]["image_embeds"]["shape"] == [1, 4, 128] for out in results)
    log = proc.log()
    assert "draining" in log and "did not finish in time" not in log and "Traceback" not in log


def test_sigterm_to_the_ec_encoder_with_requests_in_flight_drains_it_and_exits_0(chain: Chain) -> None:
    proc = chain.processes["ec-encoder"]
    count = 24

    def start(wave: int) -> list[asyncio.Task[Any]]:  # each wave's images are new (not in its EC store)
        return [
            asyncio.create_task(
                chain.collect("ec_encoder", {"images": [b64(png((20 + i % 200, 21 + i // 200), (9, i % 256, 9)))]})
            )
            for i in range(wave * count, wave * count + count)
        ]

    at_signal, results = chain.loop.run(
        signal_while_busy(proc, signal.SIGTERM, start, lambda: endpoint_inflight(chain.ec_encoder_port)), timeout=300
    )
    assert proc.wait(120) == 0
    errors = [r for r in results if isinstance(r, BaseException)]
    print(
        f"\nFIGURE sigterm ec-encoder: {count} encode requests, {at_signal:.0f} in flight on the worker at the "
        f"signal, {len(errors)} failed"
    )
    assert errors == [], errors
    assert all(out == [{"stored": 1}] for out in results)
    log = proc.log()
    assert "draining" in log and "did not finish in time" not in log and "Traceback" not in log
