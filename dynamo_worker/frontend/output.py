"""A worker's response messages to OpenAI text deltas, finish reasons, logprobs and usage.

Each ``backend.generate`` message is ``{"token_ids": [new ids], "log_probs"?, "top_logprobs"?,
"finish_reason": null|"eos"|"length"|"stop"|"cancelled"|"error: msg", "completion_usage"?}``.

Finish reasons (Dynamo's -> OpenAI's): ``eos`` and ``stop`` (a stop token) -> ``stop``;
``length`` -> ``length``; ``cancelled``/``abort`` (the engine aborted the request while the
client was still listening) -> ``stop``, because OpenAI has no such reason and the text so far
is well-formed; ``content_filter`` -> ``content_filter``; ``error: msg`` -> an error (HTTP 500,
or an SSE error event mid-stream). A stop string found by the frontend -> ``stop``. A stream
that ends without any finish reason is finished as ``stop``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs

from dynamo_worker.frontend.detokenizer import IncrementalDetokenizer, StopStrings
from dynamo_worker.frontend.protocol import GenerationParams, TokenLogprob, internal, usage_body

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "eos": "stop",
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
    "abort": "stop",
    "content_filter": "content_filter",
}


@attrs.frozen
class Delta:
    """What one worker message adds to the response."""

    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # OpenAI's, set on the last delta
    tokens: int  # token ids the message carried


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def merge_messages(items: list[Any]) -> list[Any]:
    """Consecutive response messages of one stream that arrived together, as one message.

    Under load a stream's messages queue up; detokenizing and writing them as one SSE chunk
    costs one pass instead of one per message (vLLM's DELTA outputs merge the same way). The
    token ids and per-token logprobs are concatenated; everything else (finish reason, usage,
    transfer parameters) comes from the last message. Malformed messages are left alone, for
    :meth:`OutputProcessor.process` to report.
    """
    if len(items) < 2 or not all(isinstance(i, dict) and _is_token_list(i.get("token_ids", [])) for i in items):
        return items
    merged = dict(items[-1])
    merged["token_ids"] = [t for i in items for t in i.get("token_ids") or ()]
    for key, missing in (("log_probs", None), ("top_logprobs", [])):
        if any(key in i for i in items):
            values: list[Any] = []
            for i in items:
                got = i.get(key)
                got = got if isinstance(got, list) else []
                n = len(i.get("token_ids") or ())
                values += got[:n] + [missing] * (n - len(got))  # stays aligned with token_ids
            merged[key] = values
    return [merged]


class OutputProcessor:
    """Detokenizes one request's output, applies stop strings, keeps the usage."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], params: GenerationParams) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids,
                                                  skip_special_tokens=params.skip_special_tokens)
        self.stops = StopStrings(params.stop, include_stop=params.include_stop_str_in_output)
        self.want_logprobs = params.logprobs is not None
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._worker_usage: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, item: Any) -> Delta:
        """One worker message -> the delta to send; an ApiError if the worker reports a failure."""
        if not isinstance(item, dict) or not _is_token_list(item.get("token_ids", [])):
            raise internal(f"the worker sent a malformed response message: {str(item)[:200]}")
        ids: list[int] = item.get("token_ids") or []
        reason = item.get("finish_reason")
        if isinstance(reason, str) and reason.startswith("error"):
            raise internal(f"the worker failed: {reason.partition(':')[2].strip() or reason}")
        self.completion_tokens += len(ids)
        logprobs = self._logprobs(item, ids) if self.want_logprobs else None
        text = self.detokenizer.add(ids)
        if reason is not None:
            text += self.detokenizer.flush()
        out, stopped = self.stops.feed(text)
        if stopped:
            self.finish_reason = "stop"
        elif reason is not None:
            out += self.stops.flush()
            self.finish_reason = FINISH_REASONS.get(str(reason))
            if self.finish_reason is None:
                log.warning("unknown finish reason %r from a worker; reporting 'stop'", reason)
                self.finish_reason = "stop"
            usage = item.get("completion_usage")
            if isinstance(usage, dict):
                self._worker_usage = usage
        return Delta(out, logprobs, self.finish_reason, len(ids))

    def end_of_stream(self) -> Delta:
        """The worker ended the stream without a finish reason: release what is held, finish."""
        out, stopped = self.stops.feed(self.detokenizer.flush())
        if not stopped:
            out += self.stops.flush()
        self.finish_reason = "stop"
        return Delta(out, None, self.finish_reason, 0)

    def _logprobs(self, item: dict[str, Any], ids: list[int]) -> list[TokenLogprob]:
        values = item.get("log_probs") or []
        tops = item.get("top_logprobs") or []
        out = []
        for i, token_id in enumerate(ids):
            value = values[i] if i < len(values) and isinstance(values[i], (int, float)) else float("nan")
            top: list[tuple[int, float]] = []
            if i < len(tops) and isinstance(tops[i], list):
                entries = [e for e in tops[i] if isinstance(e, dict)
                           and type(e.get("token_id")) is int and isinstance(e.get("logprob"), (int, float))]
                entries.sort(key=lambda e: e.get("rank", 0) if isinstance(e.get("rank"), int) else 0)
                top = [(e["token_id"], float(e["logprob"])) for e in entries]
            out.append(TokenLogprob(token_id, float(value), tuple(top)))
        return out

    def usage(self) -> dict[str, Any]:
        """Usage as OpenAI reports it: the worker's numbers when it finished the request itself."""
        u = self._worker_usage
        cached = None
        if u is not None:
            details = u.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                cached = details["cached_tokens"]
            prompt, completion = u.get("prompt_tokens"), u.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                return usage_body(prompt, completion, cached)
        return usage_body(self.prompt_tokens, self.completion_tokens, cached)
