"""The generated load: fixed-seed random token-id prompts and the request body sent for each."""

from __future__ import annotations

import random
from typing import Any

#: Token ids drawn for prompts: 0-2 are BOS/EOS/PAD in the demo model, 511 is its last id.
FIRST_ID, LAST_ID = 3, 511


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` in-vocabulary token ids, the same for the same seed."""
    rng = random.Random(seed)
    return [[rng.randint(FIRST_ID, LAST_ID) for _ in range(length)] for _ in range(count)]


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """A streaming ``/v1/completions`` request: greedy, exactly ``max_tokens`` out, usage at the end."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
