"""``dynamo-worker up --multimodal``: a whole multimodal stack from one command.

Its own module so that its engine never runs beside test_multimodal's.
"""

from __future__ import annotations

import base64
import json
import re
import signal
from pathlib import Path

import pytest

from dynamo_worker.core import wire
from tests.helpers import run_cli
from tests.raw_tcp import handshake, message, raw, read_message, read_until_closed
from tests.test_multimodal import data_url, image_message, png
from tests.test_up import up_stack


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Blip2, written by the command users run."""
    path = tmp_path_factory.mktemp("vlm") / "model"
    out = run_cli("demo-model", str(path), "--multimodal", "--seed", "3", timeout=180)
    assert out.returncode == 0 and out.stdout.strip() == str(path), out.stderr
    return str(path)


def test_demo_model_multimodal_is_a_deterministic_blip2(vlm: str, tmp_path: Path) -> None:
    from dynamo_worker.demo_vlm import write_demo_vlm

    config = json.loads((Path(vlm) / "config.json").read_text())
    assert config["model_type"] == "blip-2" and config["num_query_tokens"] == 4
    assert config["text_config"]["hidden_size"] == 128
    again = write_demo_vlm(tmp_path / "again", seed=3)
    assert (again / "model.safetensors").read_bytes() == (Path(vlm) / "model.safetensors").read_bytes()
    other = write_demo_vlm(tmp_path / "other", seed=4)
    assert (other / "model.safetensors").read_bytes() != (Path(vlm) / "model.safetensors").read_bytes()


@pytest.mark.parametrize("encoder", ["encode", "ec-encoder"])
def test_up_multimodal_serves_image_requests_through_processor_and_encoder(
    encoder: str, vlm: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("up-mm")
    model = vlm
    with up_stack(
        base,
        "--multimodal",
        "--encoder",
        encoder,
        "--model",
        model,
        "--served-model-name",
        "vlm",
        "--max-num-seqs",
        "16",
    ) as stack:
        assert {"nats", "frontend", "decode-0", f"{encoder}-0", "processor-0"} <= set(stack.manifest())
        out = stack.client.chat.completions.create(
            model="vlm",
            messages=image_message(data_url(png((32, 32), (255, 0, 0)))),
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.usage.completion_tokens == 8 and out.choices[0].message.content
        assert "image_url" in stack.out.read_text()  # the printed example is a multimodal request
        if encoder == "ec-encoder":  # the encoder output went through the shared EC directory
            assert any((stack.log_dir / "ec-shared").iterdir())
        else:
            only_the_deployment_is_served(stack.log_dir)
        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(90) == 0


def test_up_multimodal_flag_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    out = run_cli("up", "--multimodal")
    assert out.returncode == 2 and "--multimodal needs --model PATH" in out.stderr
    out = run_cli("up", "--encoder", "ec-encoder")
    assert out.returncode == 2 and "--encoder ec-encoder needs --multimodal" in out.stderr
    out = run_cli("up", "--multimodal", "--model", str(tmp_path), "--prefill-workers", "1")
    assert out.returncode == 2 and "--multimodal with --prefill-workers is not supported" in out.stderr


def only_the_deployment_is_served(log_dir: Path) -> None:
    """Every TCP listener of the stack refuses a well-formed call from a process without the
    deployment's secret; the encode worker serves one that proves it (the secret ``up`` gave its
    children, read from a child's environment: what a process of the deployment holds)."""
    addresses = {}
    for name in ("decode-0", "processor-0", "encode-0"):
        found = re.search(r"TCP request plane at (\S+)\)", (log_dir / f"{name}.log").read_text())
        assert found, f"{name} logged no TCP request plane address"
        addresses[name] = found.group(1)
    encode_request = wire.RequestEnvelope("raw-1", {"images": [base64.b64encode(png((32, 32), (0, 255, 0))).decode()]})
    for name, address in addresses.items():
        with raw(address) as sock:
            hello = wire.decode_greeting(read_message(sock) or b"")
            assert isinstance(hello, wire.Hello)
            sock.sendall(message(wire.encode(wire.Call("1", "generate", encode_request))))
            answers = [wire.decode_greeting(m) for m in read_until_closed(sock)]
        assert len(answers) == 1 and isinstance(answers[0], wire.Refused), (name, answers)
        assert "refused a request-plane connection" in (log_dir / f"{name}.log").read_text()
    manifest = json.loads((log_dir / "stack.json").read_text())
    environ = Path(f"/proc/{manifest['encode-0']['pid']}/environ").read_bytes().split(b"\0")
    [secret] = [v.partition(b"=")[2] for v in environ if v.startswith(b"DYN_REQUEST_PLANE_TOKEN=")]
    with raw(addresses["encode-0"]) as sock:
        assert isinstance(wire.decode_greeting(handshake(sock, secret)), wire.Welcome)
        sock.sendall(message(wire.encode(wire.Call("1", "generate", encode_request))))
        frames = [f for _, f in wire.decode_batch(read_message(sock) or b"")]
    assert frames[0].k == wire.DATA and frames[0].d["image_embeds"]["shape"] == [1, 4, 128]
