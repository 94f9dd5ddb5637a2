"""The ``generate`` endpoint's messages, defined once: the request, a response chunk, the usage block.

The frontend builds its requests from :class:`GenerateRequest`, the engine roles, the multimodal
processor and the example echo plugin validate theirs with it, and every worker reports
:class:`Usage` the same way. The field names are Dynamo's (``PreprocessedRequest``,
``LLMEngineOutput``), so a Dynamo caller's message is accepted as it is.

Request: ``token_ids``, ``stop_conditions``, ``sampling_options``, ``output_options``, ...
Unknown fields are refused (``forbid_unknown_fields``): a field nobody reads must not look
accepted. A role with fields of its own subclasses :class:`GenerateRequest` (the echo plugin's
``delay``).

Response chunks (:class:`GenerateChunk`): ``token_ids`` (the new ones), ``finish_reason``
(``eos``, ``stop``, ``length``, ``cancelled``, ``error: ...``) on the last, with ``stop``:
``stop_reason``, vLLM's (the stop token id, an int, or the stop string vLLM matched); ``text``
(vLLM's detokenization, shaped by ``skip_special_tokens`` and ``include_stop_str_in_output``)
when the request set ``sampling_options.detokenize``; optional ``log_probs``/``top_logprobs``,
``prompt_logprobs`` on the first chunk when asked for, and ``completion_usage`` on the last chunk
only. A stop on one of the request's ``eos_token_ids`` is ``eos`` (no ``stop_reason``), as on the
model's own EOS.

The context check (:func:`fit_context`) is vllm serve's, in one place for the frontend, the
multimodal processor and the workers.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

# vLLM hands requests to its engine core as msgpack, which has no integer wider than 64 bits: a
# larger one fails there as an internal error. Every integer field is bounded here instead.
Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]

#: The most logprobs (per sampled or prompt token) a request may ask for: vllm serve's default limit.
MAX_LOGPROBS = 20

#: Sampling options that go from the client's request to vLLM's ``SamplingParams`` unchanged,
#: under the same name (the frontend copies them into ``sampling_options``, the engine out of it).
PLAIN_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


class StopConditions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    max_tokens: Int | None = None
    min_tokens: Int | None = None
    stop: list[str] | None = None  # our frontend applies them itself; given here, vLLM applies them
    stop_token_ids: list[Int] | None = None
    stop_token_ids_hidden: list[Int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    max_thinking_tokens: Int | None = None


class GuidedDecoding(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Dynamo's ``GuidedDecodingOptions``: vLLM's ``StructuredOutputsParams`` fields, one constraint."""

    json: Any = None  # a JSON schema, as an object or a string
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    backend: str | None = None  # Dynamo's per-request backend; vLLM fixes it per engine


class SamplingOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    n: Int | None = None
    best_of: Int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    seed: Int | None = None
    include_stop_str_in_output: bool | None = None
    guided_decoding: GuidedDecoding | None = None
    detokenize: bool | None = None
    allowed_token_ids: list[Int] | None = None
    bad_words_token_ids: list[list[Int]] | None = None
    logit_bias: dict[str, float] | None = None  # token id (as JSON object keys are strings) -> bias


class OutputOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    logprobs: Int | None = None
    prompt_logprobs: Int | None = None
    skip_special_tokens: bool | None = None
    formatted_prompt: bool | None = None
    return_tokens_as_token_ids: bool | None = None


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Dynamo's ``PreprocessedRequest``; fields a worker cannot honour are refused by name there."""

    token_ids: list[Int]
    model: str | None = None
    stop_conditions: StopConditions = msgspec.field(default_factory=StopConditions)
    sampling_options: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    output_options: OutputOptions = msgspec.field(default_factory=OutputOptions)
    eos_token_ids: list[Int] | None = None
    mdc_sum: str | None = None
    annotations: list[str] | None = None
    routing: dict[str, Any] | None = None
    router_config_override: dict[str, Any] | None = None
    prefill_result: dict[str, Any] | None = None
    bootstrap_info: dict[str, Any] | None = None
    extra_args: dict[str, Any] | None = None
    prompt_embeds: str | None = None
    multi_modal_data: dict[str, Any] | None = None


#: Dynamo's name for the request.
PreprocessedRequest = GenerateRequest


class PromptTokensDetails(msgspec.Struct, omit_defaults=True):
    cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache


class Usage(msgspec.Struct, omit_defaults=True):
    """``completion_usage`` on a stream's last chunk (OpenAI's usage block, as Dynamo carries it)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Usage:
        details = PromptTokensDetails(cached_tokens) if cached_tokens is not None else None
        return cls(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, details)


class TopLogprob(msgspec.Struct, omit_defaults=True):
    """One alternative at a position: its token, logprob and rank (vLLM's; 1 is the likeliest)."""

    token_id: int
    logprob: float | None  # None: JSON has no -inf (a token the sampler ruled out)
    rank: int | None = None


class GenerateChunk(msgspec.Struct, omit_defaults=True):
    """One response message of ``generate`` (Dynamo's ``LLMEngineOutput``, the fields we use).

    ``log_probs``/``top_logprobs``: per new token, its logprob and the alternatives (when the
    request asked for ``output_options.logprobs``); ``prompt_logprobs`` (first chunk, when asked
    for): ``None`` for the first prompt token, then per token that token and the top ones.
    """

    token_ids: list[int]
    text: str | None = None  # the new tokens' text, vLLM's, when the request asked for it (detokenize)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    log_probs: list[float | None] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    prompt_logprobs: list[list[TopLogprob] | None] | None = None
    completion_usage: Usage | None = None
    disaggregated_params: dict[str, Any] | None = None  # a prefill worker's answer: kv_transfer_params


def cached_tokens(usage: Any) -> int | None:
    """The prompt tokens an engine reported cached in a ``completion_usage`` (as JSON), if it did."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if type(cached) is int else None


class ContextLengthExceeded(ValueError):
    """A prompt that leaves no room for one generated token; vllm serve's message and parameter."""

    parameter = "input_tokens"


def fit_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The ``max_tokens`` a request runs with, as vllm serve computes it (``get_max_tokens``).

    A prompt of ``max_model_len`` tokens or more is refused (:class:`ContextLengthExceeded`);
    otherwise ``max_tokens`` is lowered to the room left, or is that room when not given: vllm
    serve answers a request whose ``max_tokens`` runs past the context, stopping at its end
    (``finish_reason`` ``length``), rather than refusing it.
    """
    room = max_model_len - prompt_tokens
    if room < 1:
        why = "exceeds this limit even without any output tokens" if room < 0 else "leaves no room for output tokens"
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{prompt_tokens} input tokens, which {why}. Please reduce the length of the input prompt."
        )
    return room if max_tokens is None else min(max_tokens, room)
