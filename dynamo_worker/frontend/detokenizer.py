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


class TokenStrings:
    """The text of single tokens (for logprobs), cached: the vocabulary bounds the cache."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = str(self.tokenizer.decode([token_id]))
        return text
