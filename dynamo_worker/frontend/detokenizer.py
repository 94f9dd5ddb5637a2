"""Token ids back to text, one response message at a time, and stop strings.

Workers stream token ids; text is made here. Two things make this more than ``decode``:

* A token may hold part of a UTF-8 character (byte-level BPE splits "日" over several tokens),
  and SentencePiece tokenizers print a token's leading space depending on what precedes it.
  :class:`IncrementalDetokenizer` uses the standard offset method (as vLLM and TGI do): decode
  a short window of previous tokens with and without the new ones, emit the difference, and
  hold it back while it ends in U+FFFD (an incomplete character).
* Stop strings are applied here (workers never see them). A stop string can span messages, so
  :class:`StopStrings` holds back a tail of the text only while it could be the start of a stop
  string (at most ``len(longest stop) - 1`` characters).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens give the first output token its context (vLLM uses the same 5): enough
# for a SentencePiece leading space or a character split across the prompt/output boundary.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns token ids, fed a few at a time, into text deltas that never split a character.

    ``"".join(deltas) + flush()`` equals ``tokenizer.decode(prompt_context + ids)`` minus the
    decoded prompt context (for byte-level tokenizers, ``tokenizer.decode(ids)``), less the
    bytes of a character the output stops inside.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # ids[prefix_offset:read_offset] is the window already turned into emitted text.
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def add(self, new_ids: Sequence[int]) -> str:
        """Take the next token ids; return the text they complete (possibly "")."""
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of the output: whatever is held back, less a trailing incomplete character.

        Generation can stop inside a multi-byte character; vLLM's detokenizer then never emits
        those bytes (it waits for a completion that does not come), so its text ends before them
        rather than in U+FFFD. The complete characters held with them are released.
        """
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)


class StopStrings:
    """Finds the first stop string in streamed text; releases only text that cannot start one.

    :meth:`feed` returns ``(text safe to emit, stopped)``. Once stopped, the emitted text ends
    just before the stop string (the stop string itself is not returned, as in OpenAI's API).
    """

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop  # include_stop_str_in_output: keep the stop string
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string found (vLLM's stop_reason)

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self.pending += text
        # A match must end inside the new text, so it starts within the held-back tail. The one
        # that ends first wins, ties by list order: vLLM's check_stop_strings (token by token).
        first, first_stop = -1, ""
        for stop in self.stops:
            at = self.pending.find(stop)
            if at != -1 and (first == -1 or at + len(stop) < first + len(first_stop)):
                first, first_stop = at, stop
        if first != -1:
            end = first + len(first_stop) if self.include_stop else first
            out, self.pending, self.stopped, self.matched = self.pending[:end], "", True, first_stop
            return out, True
        held = self._partial_match()
        cut = len(self.pending) - held
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _partial_match(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        for k in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """At the end of the output: release what was held back (it started no stop string)."""
        out, self.pending = self.pending, ""
        return "" if self.stopped else out


# The preceding tokens a logprob token's text is completed with (vLLM's LogprobsProcessor: 4,
# enough for any UTF-8 character).
LOGPROB_CONTEXT_TOKENS = 4


def _leading_space_marker(tokenizer: Any) -> str | None:
    """The SentencePiece space marker of a Metaspace pre-tokenizer (vLLM's
    ``get_leading_space_marker``), whose leading instance ``decode`` strips; None for others."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        config = json.loads(backend.to_str())
    except (ValueError, TypeError, AttributeError):  # not a tokenizers-library backend
        return None
    pre = config.get("pre_tokenizer") or {}
    subs = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    for sub in subs:
        if sub.get("type") == "Metaspace":
            return str(sub.get("replacement", "\u2581"))
    return None


class TokenStrings:
    """The text of single tokens (for logprobs), cached: the vocabulary bounds the cache.

    Given ``context`` (the up to :data:`LOGPROB_CONTEXT_TOKENS` tokens before it in the sequence,
    oldest first), a token's text is vLLM's for a logprob (its ``LogprobsProcessor``):
    ``convert_ids_list_to_tokens``'s, which gives back the leading spaces ``decode`` strips from a
    SentencePiece piece (``▁the`` is ``" the"``), and for a token that decodes to an incomplete
    character (ends in U+FFFD) ``_correct_decoded_token``'s: the character it completes with the
    context's byte tokens, or ``""`` while the character is still incomplete. Without ``context``
    (None): ``decode([id])``, as vLLM decodes a token that has no logprob (echo's first).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._spaced: dict[int, str] = {}
        self._marker: str | None = _leading_space_marker(tokenizer)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)) or "")

    def __call__(self, token_id: int, context: Sequence[int] | None = None) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode([token_id])
        if context is None:
            return text
        if self._marker is not None:
            text = self._with_leading_spaces(token_id, text, self._marker)
        if not text.endswith(REPLACEMENT_CHAR):
            return text
        return self._completed(token_id, list(context)[-LOGPROB_CONTEXT_TOKENS:])

    def _with_leading_spaces(self, token_id: int, text: str, marker: str) -> str:
        """vLLM's ``_restore_leading_spaces``: as many spaces as the piece has leading markers."""
        spaced = self._spaced.get(token_id)
        if spaced is None:
            piece = self.tokenizer.convert_ids_to_tokens([token_id])[0] or ""
            markers = len(piece) - len(piece.lstrip(marker))
            missing = markers - (len(text) - len(text.lstrip(" ")))
            spaced = self._spaced[token_id] = " " * missing + text if markers and missing > 0 else text
        return spaced

    def _completed(self, token_id: int, context: list[int]) -> str:
        for n in range(1, len(context) + 1):
            window = context[-n:]
            full = self._decode([*window, token_id])
            if full.endswith(REPLACEMENT_CHAR):
                continue
            # The context tokens that were themselves part of the character (their own text "")
            # belong to this token's text; the ones before them are the prefix to take off.
            clean_end = len(window)
            while clean_end > 0 and self(window[clean_end - 1]).endswith(REPLACEMENT_CHAR):
                clean_end -= 1
            prefix = self._decode(window[:clean_end]) if clean_end else ""
            if full.startswith(prefix):
                return full[len(prefix) :]
            common = 0  # a tokenizer that normalises the text: the longest common prefix
            for a, b in zip(prefix, full):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""
