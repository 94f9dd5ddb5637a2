"""``dynamo-worker up --multimodal``: a whole multimodal stack from one command.

Its own module so that its engine never runs beside test_multimodal's.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.test_multimodal import data_url, image_message, png
from tests.test_up import up_stack


@pytest.mark.parametrize("encoder", ["encode", "ec-encoder"])
def test_up_multimodal_serves_image_requests_through_processor_and_encoder(
        encoder: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from dynamo_worker.demo_vlm import write_demo_vlm

    base = tmp_path_factory.mktemp("up-mm")
    model = str(write_demo_vlm(base / "vlm"))
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
