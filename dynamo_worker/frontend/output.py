"""A worker's response messages to OpenAI text deltas, finish reasons, logprobs and usage.

Each ``backend.generate`` message is a :class:`~dynamo_worker.core.generate.GenerateChunk`
(``token_ids``, ``finish_reason``, ``stop_reason``, logprobs, ``completion_usage``), checked
against that schema here: a malformed one is a 500 naming the field, never a half-read answer.
``stop_reason`` (with ``stop``) is vLLM's: the stop token id or the stop string it matched. After
``eos`` or a stop token id the last token's text is left out unless ``include_stop_str_in_output``
(vLLM's detokenizer does the same); the choice's ``stop_reason`` is that id, or the stop string
the frontend matched, else null (EOS, length), as vllm serve reports it.

Finish reasons (Dynamo's -> OpenAI's): ``eos`` and ``stop`` (a stop token) -> ``stop``;
``length`` -> ``length``; ``cancelled``/``abort`` (the engine aborted the request while the
client was still listening) -> ``stop``, because OpenAI has no such reason and the text so far
is well-formed; ``content_filter`` -> ``content_filter``; ``error: msg`` -> an error (HTTP 500,
or an SSE error event mid-stream). A stop string found by the frontend -> ``stop``. A stream
that ends without any finish reason is finished as ``stop``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import msgspec

from dynamo_worker.core.generate import GenerateChunk, TopLogprob, Usage
from dynamo_worker.frontend.detokenizer import LOGPROB_CONTEXT_TOKENS, IncrementalDetokenizer, StopStrings
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
    token_ids: tuple[int, ...] = ()  # those ids (vLLM's reasoning/tool parsers read them)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def merge_messages(items: list[Any]) -> list[Any]:
    """Consecutive response messages of one stream that arrived together, as one message.

    Under load a stream's messages queue up; detokenizing and writing them as one SSE chunk
    costs one pass instead of one per message (vLLM's DELTA outputs merge the same way). The
    token ids and per-token logprobs are concatenated; everything else (finish reason, usage,
    transfer parameters) comes from the last message, the prompt logprobs from the first.
    Malformed messages are left alone, for :meth:`OutputProcessor.process` to report.
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
    prompt_logprobs = next((i["prompt_logprobs"] for i in items if "prompt_logprobs" in i), None)
    if prompt_logprobs is not None:  # sent once, with the first message
        merged["prompt_logprobs"] = prompt_logprobs
    return [merged]


class OutputProcessor:
    """Detokenizes one request's output, applies stop strings, keeps the usage."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], params: GenerationParams) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        self.stops = StopStrings(params.stop, include_stop=params.include_stop_str_in_output)
        self.want_logprobs = params.logprobs is not None
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)  # vLLM's EOS is the tokenizer's
        self._worker_usage: Usage | None = None
        self.prompt_logprobs: list[list[TopLogprob] | None] | None = None  # the worker's, as it sent them
        self._recent: list[int] = []  # the last output tokens: a logprob token's text context

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, item: Any) -> Delta:
        """One worker message -> the delta to send; an ApiError if the worker reports a failure."""
        try:
            chunk = msgspec.convert(item, GenerateChunk)
        except msgspec.ValidationError as exc:
            raise internal(f"the worker sent a malformed response message ({exc}): {str(item)[:200]}") from None
        ids = chunk.token_ids
        reason = chunk.finish_reason
        if reason is not None and reason.startswith("error"):
            raise internal(f"the worker failed: {reason.partition(':')[2].strip() or reason}")
        self.completion_tokens += len(ids)
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        logprobs = self._logprobs(chunk) if self.want_logprobs else None
        worker_stop = chunk.stop_reason
        # Ended on a stop token (EOS, or one of stop_token_ids): vLLM leaves that token's text out.
        # Checked against the last id, so a worker that says "eos" on an ordinary token keeps it.
        stop_token = self.eos_token_id if reason == "eos" else worker_stop if reason == "stop" else None
        on_stop_token = type(stop_token) is int and bool(ids) and ids[-1] == stop_token
        shown = ids[:-1] if on_stop_token and not self.stops.include_stop else ids
        # With stop strings, token by token: a match ends the output at the token that completed
        # it, and the tokens after it in the same message are not counted (vLLM's detokenizer
        # drops them: usage, logprobs and token ids stop at the match).
        pieces = [[t] for t in shown] if self.stops.stops and len(shown) > 1 else [list(shown)]
        out, stopped, used = "", False, len(ids)
        for n, piece in enumerate(pieces, 1):
            text = self.detokenizer.add(piece)
            if reason is not None and n == len(pieces):
                text += self.detokenizer.flush()
            got, stopped = self.stops.feed(text)
            out += got
            if stopped:
                used = sum(len(p) for p in pieces[:n])
                break
        if stopped:
            self.completion_tokens -= len(ids) - used
            ids = ids[:used]
            if logprobs is not None:
                logprobs = logprobs[:used]
            self.finish_reason = "stop"
            self.stop_reason = self.stops.matched
        elif reason is not None:
            out += self.stops.flush()
            self.stop_reason = worker_stop if reason == "stop" else None
            self.finish_reason = FINISH_REASONS.get(reason)
            if self.finish_reason is None:
                log.warning("unknown finish reason %r from a worker; reporting 'stop'", reason)
                self.finish_reason = "stop"
            if chunk.completion_usage is not None:
                self._worker_usage = chunk.completion_usage
        return Delta(out, logprobs, self.finish_reason, len(chunk.token_ids), tuple(ids))

    def end_of_stream(self) -> Delta:
        """The worker ended the stream without a finish reason: release what is held, finish."""
        out, stopped = self.stops.feed(self.detokenizer.flush())
        if not stopped:
            out += self.stops.flush()
        self.finish_reason = "stop"
        return Delta(out, None, self.finish_reason, 0)

    def _logprobs(self, chunk: GenerateChunk) -> list[TokenLogprob]:
        values = chunk.log_probs or []
        tops = chunk.top_logprobs or []
        out = []
        for i, token_id in enumerate(chunk.token_ids):
            value = values[i] if i < len(values) else None
            top = sorted(tops[i], key=lambda t: t.rank or 0) if i < len(tops) else []
            out.append(
                TokenLogprob(
                    token_id,
                    float("nan") if value is None else value,
                    tuple((t.token_id, t.logprob) for t in top if t.logprob is not None),
                    tuple(self._recent),
                )
            )
            self._recent = [*self._recent, token_id][-LOGPROB_CONTEXT_TOKENS:]
        return out

    def usage(self) -> dict[str, Any]:
        """Usage as OpenAI reports it: the worker's numbers when it finished the request itself."""
        u = self._worker_usage
        if u is None:
            return usage_body(self.prompt_tokens, self.completion_tokens, None)
        cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details is not None else None
        return usage_body(u.prompt_tokens, u.completion_tokens, cached)


def _prompt_entries(position: list[TopLogprob] | None) -> list[tuple[int, float, int | None]]:
    """One prompt position's ``(token id, logprob, rank)`` in the worker's (vLLM's) order."""
    return [(e.token_id, e.logprob, e.rank) for e in position or () if e.logprob is not None]


def _prompt_contexts(raw: list[list[TopLogprob] | None]) -> list[tuple[int, ...]]:
    """Per prompt position, the prompt tokens before it that vLLM completes a partial character
    with: the first entry (the prompt token) of each earlier position that has logprobs."""
    contexts, recent = [], []
    for position in raw:
        contexts.append(tuple(recent))
        if position:
            recent = [*recent, position[0].token_id][-LOGPROB_CONTEXT_TOKENS:]
    return contexts


def prompt_logprobs_body(raw: list[list[TopLogprob] | None] | None, token_text: Callable[..., str]) -> list[Any] | None:
    """The response's ``prompt_logprobs`` as vllm serve shapes them: ``None`` for the first token,
    then per token ``{"<token id>": {"logprob", "rank", "decoded_token"}}``."""
    if raw is None:
        return None
    return [
        None
        if position is None
        else {
            str(tid): {"logprob": lp, "rank": rank, "decoded_token": token_text(tid, context)}
            for tid, lp, rank in _prompt_entries(position)
        }
        for position, context in zip(raw, _prompt_contexts(raw), strict=True)
    ]


def echo_logprobs(
    raw: list[list[TopLogprob] | None] | None, prompt_ids: Sequence[int], top_n: int
) -> list[TokenLogprob]:
    """The prompt tokens' logprobs that ``echo`` puts before the output's (vLLM's completions):
    none for the first token; each other's own and its first ``top_n + 1`` entries."""
    out = []
    contexts = _prompt_contexts(raw) if raw is not None else []
    for i, token_id in enumerate(prompt_ids):
        entries = _prompt_entries(raw[i]) if raw is not None and i < len(raw) else []
        own = next((lp for tid, lp, _ in entries if tid == token_id), None)
        if i == 0 or own is None:
            out.append(TokenLogprob(token_id, None))
        else:
            top = tuple((tid, lp) for tid, lp, _ in entries[: top_n + 1])
            out.append(TokenLogprob(token_id, own, top, contexts[i] if i < len(contexts) else ()))
    return out
