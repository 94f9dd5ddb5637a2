"""Bad input never takes anything down: property-based fuzzing of the frontend and of every endpoint.

One deployment for the module: a real nats-server, a frontend, a prefill and a decode worker on
the real vLLM engine (the tiny demo model, disaggregated through the file connector), and an echo
worker serving the same tokenizer as a second model. ``hypothesis`` then sends

* random and mutated JSON bodies, and raw bytes, to ``/v1/completions`` and ``/v1/chat/completions``:
  every answer is a 2xx or an OpenAI-style 4xx JSON error, never a 5xx;
* random envelopes and payloads, and raw bytes, to every request-plane endpoint of every role
  (decode: generate, clear_kv_blocks, load_lora, unload_lora, list_loras; prefill: generate,
  clear_kv_blocks; echo: generate) and to each instance's control subject: every answer is data
  or a structured ``bad_request``/``not_found`` error, never ``internal`` or ``engine_dead``;

and finally checks that no process died and that normal requests still work. Example counts are
bounded so the module runs in a few minutes; the totals are printed (``-s``) for
docs/reliability.md.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_worker.core.nats_plane import control_subject
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from tests import fuzz_helpers
from tests.engine_helpers import ENGINE_FLAGS
from tests.helpers import NatsServer, WorkerProcess, free_kv_event_port, free_port, wait_until, worker_env

MAX_COMPLETION_TOKENS = 4
# Built on the loaded Hypothesis profile (tests/conftest.py: in CI derandomized, with the failure's
# reproduction blob): set neither derandomize nor print_blob here (tests/test_ci.py checks both hold).
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BUS_FUZZ = settings(FUZZ, max_examples=60)
TRIED: Counter[str] = Counter()  # inputs sent, by target, for the summary


class Stack(fuzz_helpers.FuzzTarget):
    def __init__(self, nats: NatsServer, model: str, storage: str) -> None:
        self.nats = nats
        self.namespace = f"fz{uuid.uuid4().hex[:8]}"
        self.http_port = free_port()
        common = ["--nats-url", nats.url, "--namespace", self.namespace]
        engine = [
            "--model",
            model,
            "--served-model-name",
            "tiny",
            *common,
            *ENGINE_FLAGS,
            "--connector",
            "example",
            "--kv-shared-storage",
            storage,
        ]
        self.processes = {
            "decode": WorkerProcess(
                ["--role", "decode", *engine], env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port()))
            ),
            "prefill": WorkerProcess(
                ["--role", "prefill", *engine], env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port()))
            ),
            "echo": WorkerProcess(["--role", "echo", *common, "--echo-model", model]),
            "frontend": WorkerProcess(
                [
                    "--role",
                    "frontend",
                    *common,
                    "--http-port",
                    str(self.http_port),
                    "--max-completion-tokens",
                    str(MAX_COMPLETION_TOKENS),
                    "--max-request-bytes",
                    "65536",
                ]
            ),
        }
        self.base = f"http://127.0.0.1:{self.http_port}"
        super().__init__()
        self.subjects: dict[str, tuple[str, str, str]] = {}  # "role/endpoint" -> (component, endpoint, instance)

    def start(self) -> None:
        for name, proc in self.processes.items():
            proc.wait_for_log("serving", timeout=300 if name in ("decode", "prefill") else 60)
        self.runtime = self.loop.run(Runtime.connect(self.nats.url, self.namespace, name="fuzzer"))
        wanted = {("backend", "tiny"): "decode", ("prefill", "tiny"): "prefill", ("backend", "echo"): "echo"}

        async def records() -> list[Any]:
            assert self.runtime is not None
            return list(self.runtime.watcher().records.values())  # the watcher lives on the loop

        def discovered() -> bool:
            for record in self.loop.run(records()):
                role = wanted.get((record.component, record.data.get("model")))
                if role is not None:
                    key = f"{role}/{record.endpoint}"
                    self.subjects[key] = (record.component, record.endpoint, record.instance_id)
            return len(self.subjects) == len(ENDPOINTS)

        wait_until(discovered, 30, what="every endpoint of decode, prefill and echo in discovery")
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0)
        wait_until(
            lambda: {m.id for m in client.models.list().data} >= {"tiny", "echo"},
            30,
            what="both models in the frontend",
        )


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(nats_server, demo_model, str(tmp_path_factory.mktemp("kv-shared")))
    try:
        s.start()
        yield s
    finally:
        s.stop()


# ---- strategies --------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-5, max_value=600)
    | st.floats(allow_nan=False)
    | st.floats(min_value=-3, max_value=3)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)

OPENAI_FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "stop_token_ids",
    "seed",
    "logprobs",
    "top_logprobs",
    "echo",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "response_format",
    "user",
    "logit_bias",
    "best_of",
    "suffix",
    "skip_special_tokens",
    "include_stop_str_in_output",
]
token_lists = st.lists(st.integers(min_value=-3, max_value=520) | st.integers(), max_size=12)
openai_values = (
    json_values
    | token_lists
    | st.sampled_from(["tiny", "echo", "", "nope"])
    | st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "x"]),
                "content": st.text(max_size=40) | json_values,
            }
        ),
        max_size=3,
    )
)


def valid_base(endpoint: str, model: str) -> dict[str, Any]:
    if endpoint == "completions":
        return {"model": model, "prompt": "the little bird", "max_tokens": 3}
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}


def bodies(endpoint: str) -> st.SearchStrategy[bytes]:
    mutated = st.builds(
        lambda model, changes, dropped: json.dumps(
            {k: v for k, v in {**valid_base(endpoint, model), **changes}.items() if k not in dropped}
        ).encode(),
        st.sampled_from(["tiny", "echo"]),
        st.dictionaries(st.sampled_from(OPENAI_FIELDS) | st.text(max_size=8), openai_values, max_size=4),
        st.sets(st.sampled_from(["model", "prompt", "messages", "max_tokens"]), max_size=2),
    )
    return mutated | json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300)


GENERATE_FIELDS = [
    "token_ids",
    "model",
    "stop_conditions",
    "sampling_options",
    "output_options",
    "eos_token_ids",
    "routing",
    "prefill_result",
    "extra_args",
    "prompt_embeds",
    "multi_modal_data",
    "delay",
    "lora_name",
    "source",
    "bootstrap_info",
    "annotations",
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
            "min_p",
            "seed",
            "logprobs",
            "n",
            "use_beam_search",
            "allowed_token_ids",
            "uri",
            "disaggregated_params",
            "kv_transfer_params",
            "dp_rank",
        ]
    )
    | st.text(max_size=6),
    json_values | token_lists | st.integers(min_value=-2, max_value=30),
    max_size=4,
)
payloads = json_values | st.builds(
    lambda tokens, extra: {"token_ids": tokens, **extra},
    token_lists,
    st.dictionaries(st.sampled_from(GENERATE_FIELDS), json_values | nested_options | token_lists, max_size=4),
)


# ---- found by this fuzzer ------------------------------------------------------------------------


def test_a_one_token_prompt_never_reaches_the_example_connector(stack: Stack) -> None:
    """vLLM's ExampleConnector fails the engine on a one-token prompt (a prefill worker at once, a
    decode worker once a prefill wrote the empty prefix): both roles refuse it as a bad request."""
    for key in ("prefill/generate", "decode/generate"):
        err = stack.loop.run(call(stack, key, {"token_ids": [0]}))
        assert err is not None and err.code == "bad_request" and "at least 2 tokens" in err.message
    client = openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[0], max_tokens=2)
    assert client.completions.create(model="tiny", prompt=[0, 5], max_tokens=2).usage.completion_tokens == 2
    assert stack.all_alive() == dict.fromkeys(stack.processes)


def test_an_integer_over_64_bits_is_a_bad_request_not_an_internal_error(stack: Stack) -> None:
    for payload in (
        {"token_ids": [1, 5], "sampling_options": {"seed": 2**70}},
        {"token_ids": [1, 5], "stop_conditions": {"max_tokens": 2**64}},
    ):
        err = stack.loop.run(call(stack, "decode/generate", payload))
        assert err is not None and err.code == "bad_request"


# ---- the frontend --------------------------------------------------------------------------------


def post(url: str, body: bytes) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def check_http_answer(status: int, body: bytes, content_type: str) -> None:
    assert status < 500, (status, body[:500])
    if status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"]
    elif content_type.startswith("text/event-stream"):
        assert body.endswith(b"data: [DONE]\n\n"), body[-500:]
        assert b'"error"' not in body, body[-500:]
    else:
        assert json.loads(body)["choices"]


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_random_http_bodies_get_a_2xx_or_an_openai_4xx(stack: Stack, endpoint: str) -> None:
    @FUZZ
    @given(body=bodies(endpoint.replace("chat/", "chat_")))
    def one(body: bytes) -> None:
        TRIED[f"frontend /v1/{endpoint}"] += 1
        check_http_answer(*post(f"{stack.base}/v1/{endpoint}", body))

    one()


# ---- the request plane ---------------------------------------------------------------------------


async def call(stack: Stack, key: str, payload: Any) -> RequestError | None:
    assert stack.runtime is not None
    component, endpoint, instance = stack.subjects[key]
    return await fuzz_helpers.call(stack.runtime, component, endpoint, instance, payload)


async def send_raw(stack: Stack, key: str, data: bytes) -> None:
    assert stack.runtime is not None
    component, endpoint, instance = stack.subjects[key]
    await fuzz_helpers.send_raw(stack.runtime, component, endpoint, instance, data)


ENDPOINTS = [
    "decode/generate",
    "decode/clear_kv_blocks",
    "decode/kv_blocks",
    "decode/load_lora",
    "decode/unload_lora",
    "decode/list_loras",
    "prefill/generate",
    "prefill/clear_kv_blocks",
    "prefill/kv_blocks",
    "echo/generate",
]


@pytest.mark.parametrize("key", ENDPOINTS)
def test_random_payloads_to_each_endpoint_get_data_or_a_clean_error(stack: Stack, key: str) -> None:
    @BUS_FUZZ
    @given(payload=payloads)
    def structured(payload: Any) -> None:
        TRIED[f"bus {key} payloads"] += 1
        stack.loop.run(call(stack, key, payload), timeout=120)

    @settings(BUS_FUZZ, max_examples=30)
    @given(
        data=st.binary(max_size=200)
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.builds(lambda i, p: json.dumps({"id": i, "p": p}).encode(), json_values, json_values)
    )
    def raw(data: bytes) -> None:
        TRIED[f"bus {key} raw"] += 1
        stack.loop.run(send_raw(stack, key, data), timeout=120)

    structured()
    raw()
    assert stack.all_alive() == dict.fromkeys(stack.processes)


def test_malformed_control_messages_are_ignored(stack: Stack) -> None:
    @settings(BUS_FUZZ, max_examples=40)
    @given(data=st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode()))
    def one(data: bytes) -> None:
        assert stack.runtime is not None
        for role in ("decode", "prefill", "echo"):
            TRIED["bus control messages"] += 1
            instance = stack.subjects[f"{role}/generate"][2]
            stack.loop.run(stack.runtime.nc.publish(control_subject(stack.runtime.namespace, instance), data))

    one()
    stack.loop.run(stack.runtime.nc.flush())  # type: ignore[union-attr]


def test_after_the_fuzzing_every_process_lives_and_serves(stack: Stack) -> None:
    assert stack.all_alive() == dict.fromkeys(stack.processes)
    client = openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0)
    for model in ("tiny", "echo"):
        out = client.completions.create(model=model, prompt="the little bird", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.choices[0].message.content is not None
    for name, proc in stack.processes.items():
        assert "Traceback" not in proc.log(), f"{name} logged a traceback:\n{proc.log()[-3000:]}"
    total = sum(TRIED.values())
    print(f"\nFIGURE fuzz: {total} malformed or random inputs, 0 processes died")
    for target, count in sorted(TRIED.items()):
        print(f"FIGURE fuzz {target}: {count}")
    assert total >= 500
