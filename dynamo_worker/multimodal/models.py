"""What each vision-language model takes, read from its ``config.json``.

One table decides which models the multimodal roles serve and what a valid image embedding is
for each: the LLM worker refuses embeddings of any other shape *before* vLLM sees them, because
vLLM's engine dies on a wrong feature-token count (every later request then fails with
``EngineDeadError``). On this CPU build only Blip2 runs (docs/multimodal.md, "CPU limits"); the
table is where a model whose encoder this project can run would be added, with its rule.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import attrs

from dynamo_worker.core.errors import UsageError


@attrs.frozen
class VisionModel:
    """What the multimodal chain needs to know about one served vision-language model."""

    model_type: str
    tokens_per_image: int  # feature tokens one image becomes in the language model
    hidden_size: int  # the language model's width: the last dimension of image embeddings
    max_images: int  # per prompt (vLLM's own limit for the architecture)
    video: bool = False

    @property
    def embeds_shape(self) -> tuple[int, int]:
        return (self.tokens_per_image, self.hidden_size)


def _blip2(config: dict[str, Any]) -> VisionModel:
    # vLLM inserts num_query_tokens image tokens at the start of the prompt and takes one
    # image per prompt (Blip2ProcessingInfo.get_supported_mm_limits).
    return VisionModel(
        "blip-2", int(config["num_query_tokens"]), int(config["text_config"]["hidden_size"]), max_images=1
    )


# model_type -> how to read its rules from config.json.
SUPPORTED = {"blip-2": _blip2}  # transformers' model_type of Blip2


def vision_model(config: dict[str, Any], model: str) -> VisionModel:
    """The rules of the model whose ``config.json`` is ``config``; a UsageError for other models."""
    model_type = str(config.get("model_type"))
    reader = SUPPORTED.get(model_type)
    if reader is None:
        raise UsageError(
            f"model {model} ({model_type}) is not one the multimodal roles serve "
            f"(supported: {', '.join(SUPPORTED)}; see docs/multimodal.md); "
            "try: dynamo-worker demo-model PATH --multimodal"
        )
    try:
        return reader(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"model {model}: config.json lacks what {model_type} needs ({exc})") from None


def add_model_arguments(group: Any) -> None:
    """``--model`` and ``--served-model-name`` of the roles that are not vLLM engines."""
    group.add_argument(
        "--model", default=None, metavar="PATH", help="the local model directory (the same as the decode worker's)"
    )
    group.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model name requests use (default: the --model value, as the decode worker's)",
    )


def configured_model(options: Any) -> tuple[str, str, VisionModel]:
    """``(path, served name, rules)`` from ``--model``/``--served-model-name``; one-line errors."""
    if not options.model:
        raise UsageError(
            "--model is required: the local model directory the decode worker serves "
            "(try: dynamo-worker demo-model PATH --multimodal)"
        )
    config = read_config(options.model)
    return options.model, options.served_model_name or options.model, vision_model(config, options.model)


def read_config(path: str) -> dict[str, Any]:
    """``config.json`` of a local model directory; a one-line UsageError if there is none."""
    file = pathlib.Path(path).expanduser() / "config.json"
    try:
        return dict(json.loads(file.read_text()))
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"--model {path}: cannot read {file} ({exc}); give a local model directory "
            "(try: dynamo-worker demo-model PATH --multimodal)"
        ) from None
