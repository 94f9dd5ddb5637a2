"""vllm serve's request fields this frontend does not implement: refused by name, never dropped.

The frontend ignores fields it does not know, as OpenAI's server does, so a client's typo does no
harm; but a field ``vllm serve`` would honour (``truncate_prompt_tokens``, ``return_token_ids``,
``priority``, ...) silently ignored here would change the answer without telling anyone. Each is
accepted only at vLLM's default (what the request gets here anyway) and otherwise refused with a
400 naming it. The lists are vLLM 0.32's ``ChatCompletionRequest`` / ``CompletionRequest`` fields
that the frontend's own request structs lack: tests/test_frontend.py's
``test_every_vllm_serve_field_is_honoured_or_refused_by_name`` checks that every vLLM field is
either a field of ``protocol.ChatRequest``/``CompletionRequest`` or listed here, and that vLLM's
default is among the values accepted here.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dynamo_worker.frontend.protocol import bad_request

# field -> the values that mean "not used" (vLLM's default; None: not sent).
_BOTH: dict[str, tuple[Any, ...]] = {
    "bad_words": (None, []),
    "cache_salt": (None,),
    "ec_transfer_params": (None,),
    "kv_transfer_params": (None,),
    "length_penalty": (None, 1.0),
    "logprob_token_ids": (None,),
    "mm_payload": (None, "tensors"),
    "priority": (None, 0),
    "repetition_detection": (None,),
    "request_id": (None,),
    "return_mm_kwargs": (None, False),
    "return_token_ids": (None, False),
    "return_token_offsets": (None, False),
    "return_tokens_as_token_ids": (None, False),
    "routed_experts_prompt_start": (None, 0),
    "session_id": (None,),
    "spaces_between_special_tokens": (None, True),
    "stream_interval": (None,),
    "thinking_token_budget": (None,),
    "truncate_prompt_tokens": (None,),
    "truncation_side": (None,),
    "use_beam_search": (None, False),
    "vllm_xargs": (None,),
    "watermarking": (None, False),
}
CHAT: dict[str, tuple[Any, ...]] = {
    **_BOTH,
    "chat_template": (None,),
    "documents": (None,),
    "echo": (None, False),
    "include_reasoning": (None, True),
    "media_io_kwargs": (None,),
    "mm_processor_kwargs": (None,),
    "reasoning_effort": (None,),
    "return_prompt_text": (None, False),
}
COMPLETIONS: dict[str, tuple[Any, ...]] = {**_BOTH, "prompt_embeds": (None,)}


def _decoder(fields: dict[str, tuple[Any, ...]]) -> msgspec.json.Decoder[Any]:
    # Only these fields are read; the rest of the body is skipped by msgspec's scanner.
    struct = msgspec.defstruct("Unimplemented", [(name, Any, None) for name in fields], kw_only=True)
    return msgspec.json.Decoder(struct)


_DECODERS = {"chat_completions": (_decoder(CHAT), CHAT), "completions": (_decoder(COMPLETIONS), COMPLETIONS)}


def refuse_unimplemented(body: bytes, endpoint: str) -> None:
    """A 400 naming the first vllm serve field ``body`` sets to something other than its default.

    ``body`` has already been decoded as the endpoint's request, so it is a valid JSON object.
    """
    decoder, fields = _DECODERS[endpoint]
    got = decoder.decode(body)
    for name, unused in fields.items():
        value = getattr(got, name)
        if not any(_same(value, u) for u in unused):
            default = f" (or send its default, {msgspec.json.encode(unused[-1]).decode()})" if len(unused) > 1 else ""
            raise bad_request(
                f"`{name}` is a vllm serve field this frontend does not implement; leave it out{default}",
                param=name,
            )


def _same(value: Any, unused: Any) -> bool:
    # True == 1 and 0 == False in Python; a client's `priority: false` is not vLLM's default.
    return value == unused and isinstance(value, bool) == isinstance(unused, bool)
