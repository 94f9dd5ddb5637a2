"""``dynamo-worker up --multimodal``: a whole multimodal stack from one command.

Its own module so that its engine never runs beside test_multimodal's.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.helpers import run_cli
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
        encoder: str, vlm: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("up-mm")
    model = vlm
    with up_stack(base, "--multimodal", "--encoder", encoder, "--model", model, "--served-model-name", "vlm",
                  "--max-num-seqs", "16") as stack:
        assert {"nats", "frontend", "decode-0", f"{encoder}-0", "processor-0"} <= set(stack.manifest())
        out = stack.client.chat.completions.create(
            model="vlm", messages=image_message(data_url(png((32, 32), (255, 0, 0)))), max_tokens=8,
            temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 8 and out.choices[0].message.content
        assert "image_url" in stack.out.read_text()  # the printed example is a multimodal request
        if encoder == "ec-encoder":  # the encoder output went through the shared EC directory
            assert any((stack.log_dir / "ec-shared").iterdir())
        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(90) == 0


def test_up_multimodal_flag_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    out = run_cli("up", "--multimodal")
    assert out.returncode == 2 and "--multimodal needs --model PATH" in out.stderr
    out = run_cli("up", "--encoder", "ec-encoder")
    assert out.returncode == 2 and "--encoder ec-encoder needs --multimodal" in out.stderr
    out = run_cli("up", "--multimodal", "--model", str(tmp_path), "--prefill-workers", "1")
    assert out.returncode == 2 and "--multimodal with --prefill-workers is not supported" in out.stderr
