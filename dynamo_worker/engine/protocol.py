"""The token-level ``generate`` wire format, with Dynamo's field names.

Request: Dynamo's ``PreprocessedRequest`` (``token_ids``, ``stop_conditions``,
``sampling_options``, ``output_options``, ...). Response chunks: ``token_ids`` (the new ones),
``finish_reason`` (``eos``, ``stop``, ``length``, ``cancelled``, ``error: ...``), with
``stop``: ``stop_reason``, vLLM's (the stop token id, an int, or the stop string vLLM matched);
with ``eos`` and ``stop`` on a stop token that token is the chunk's last id, and vllm serve leaves
its text out of the output unless ``include_stop_str_in_output``. Optional
``log_probs``/``top_logprobs``, ``prompt_logprobs`` on the first chunk when asked for (``None``
for the first prompt token, then per token a list of ``{"token_id", "logprob", "rank"}``: the
prompt token, then the top ones), and ``completion_usage`` on the last chunk only.

Requests are validated here, before they reach vLLM: malformed input gets a ``bad_request``
error and never touches the engine.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.engine import kv_transfer

MAX_LOGPROBS = 20
# vLLM hands requests to its engine core as msgpack, which has no integer wider than 64 bits: a
# larger one fails there as an internal error. Every integer field is bounded here instead.
Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


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


class PreprocessedRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Dynamo's ``PreprocessedRequest``; fields we accept but do not use are kept for compatibility."""

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


def parse_request(
    payload: Any, *, vocab_size: int, max_model_len: int, min_prompt_tokens: int = 1, multimodal: bool = False
) -> PreprocessedRequest:
    """Validate a ``generate`` payload; a ``bad_request`` :class:`RequestError` naming the field otherwise.

    ``multi_modal_data`` is only accepted with ``multimodal`` (a worker started with
    ``--enable-multimodal``), which validates it itself (:mod:`dynamo_worker.multimodal.llm_inputs`).
    """
    try:
        req = msgspec.convert(payload, PreprocessedRequest)
    except msgspec.ValidationError as exc:
        raise RequestError("bad_request", f"invalid generate request: {exc}") from None
    if req.prompt_embeds is not None:
        raise RequestError("bad_request", "prompt_embeds are not supported; send token_ids")
    if req.multi_modal_data is not None and not multimodal:
        raise RequestError("bad_request", "multi_modal_data needs a worker started with --enable-multimodal")
    if not req.token_ids:
        raise RequestError("bad_request", "token_ids must not be empty")
    if len(req.token_ids) < min_prompt_tokens:
        raise RequestError(
            "bad_request",
            f"this worker's KV connector (vLLM's ExampleConnector) needs a prompt of "
            f"at least {min_prompt_tokens} tokens; a shorter one would fail its engine",
        )
    bad = next((t for t in req.token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError("bad_request", f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    if len(req.token_ids) >= max_model_len:
        raise RequestError(
            "bad_request",
            f"prompt has {len(req.token_ids)} tokens; this model's context is {max_model_len} "
            "(it must leave room for at least one generated token)",
        )
    sc = req.stop_conditions
    if sc.max_tokens is not None and sc.max_tokens < 1:
        raise RequestError("bad_request", f"stop_conditions.max_tokens must be at least 1 (got {sc.max_tokens})")
    if sc.min_tokens is not None and sc.min_tokens < 0:
        raise RequestError("bad_request", f"stop_conditions.min_tokens must be 0 or more (got {sc.min_tokens})")
    lp = req.output_options.logprobs
    if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
        raise RequestError("bad_request", f"output_options.logprobs must be between 0 and {MAX_LOGPROBS}")
    plp = req.output_options.prompt_logprobs
    if plp is not None and not 0 <= plp <= MAX_LOGPROBS:
        raise RequestError("bad_request", f"output_options.prompt_logprobs must be between 0 and {MAX_LOGPROBS}")
    _refuse_unsupported(req)
    for key in req.sampling_options.logit_bias or {}:
        if not re.fullmatch(r"[0-9]+", key) or int(key) >= vocab_size:
            raise RequestError(
                "bad_request",
                f"sampling_options.logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1})",
            )
    for word in req.sampling_options.bad_words_token_ids or []:
        if not word or any(not 0 <= t < vocab_size for t in word):
            raise RequestError(
                "bad_request",
                "sampling_options.bad_words_token_ids: each entry must be a non-empty "
                f"list of token ids of this model (0..{vocab_size - 1})",
            )
    guided = req.sampling_options.guided_decoding
    if guided is not None and guided.backend is not None:
        raise RequestError(
            "bad_request",
            "sampling_options.guided_decoding.backend: the structured-output backend "
            "is chosen per worker (--structured-outputs-config.backend), not per request",
        )
    return req


def _refuse_unsupported(req: PreprocessedRequest) -> None:
    """Fields of Dynamo's message this worker cannot honour: a ``bad_request`` naming each, never dropped.

    ``n`` > 1 is for the caller to fan out (our frontend sends n requests, seeds ``seed + i`` as
    vLLM's children have); vLLM 0.32 has no ``best_of``, and ``length_penalty`` only in beam search.
    """
    so, sc = req.sampling_options, req.stop_conditions
    refused = [
        ("sampling_options.n", so.n not in (None, 1), "one sequence per request: send n requests"),
        ("sampling_options.best_of", so.best_of not in (None, 1), "vLLM 0.32 has no best_of"),
        ("sampling_options.use_beam_search", bool(so.use_beam_search), "beam search is not supported"),
        ("sampling_options.length_penalty", so.length_penalty is not None, "it applies to beam search only"),
        ("sampling_options.detokenize", bool(so.detokenize), "this worker returns token ids, not text"),
        (
            "stop_conditions.max_thinking_tokens",
            sc.max_thinking_tokens is not None,
            "this worker has no reasoning parser to count thinking tokens with",
        ),
    ]
    for name, bad, why in refused:
        if bad:
            raise RequestError("bad_request", f"{name} is not supported: {why}")


def structured_outputs(guided: GuidedDecoding) -> Any:
    """vLLM's ``StructuredOutputsParams`` for Dynamo's ``guided_decoding``; ``bad_request`` if malformed."""
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import StructuredOutputsParams

    fields = {f: v for f in guided.__struct_fields__ if f != "backend" and (v := getattr(guided, f)) is not None}
    try:
        return StructuredOutputsParams(**fields)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise RequestError("bad_request", f"invalid sampling_options.guided_decoding: {exc}") from None


def check_structured_outputs(params: Any, engine: Any) -> None:
    """Compile-check a request's constraint with vLLM's own validator before the engine gets it.

    vLLM runs the same check inside ``generate`` (``SamplingParams.verify``); running it here
    first is what tells a bad schema, regex or grammar (a 400 naming ``guided_decoding``) from
    other rejections. It also picks the backend in ``auto`` mode, exactly as ``verify`` would.
    """
    if params.structured_outputs is None:
        return
    from vllm.exceptions import VLLMClientError

    try:
        params._validate_structured_outputs(
            engine.model_config, engine.vllm_config.structured_outputs_config, engine.tokenizer
        )
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise RequestError("bad_request", f"invalid sampling_options.guided_decoding: {exc}") from None


def sampling_params(
    req: PreprocessedRequest,
    defaults: dict[str, Any],
    max_model_len: int,
    kv_transfer_params: dict[str, Any] | None = None,
) -> Any:
    """vLLM ``SamplingParams`` for a validated request: token ids in, token-id deltas out.

    ``kv_transfer_params`` go to the KV connector (``extra_args``, where vLLM's connectors look):
    a prefill worker's own, or, on a decode worker, those in the request's ``prefill_result``.
    """
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = dict(defaults)
    so, sc = req.sampling_options, req.stop_conditions
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "allowed_token_ids",
    ):
        value = getattr(so, name, None)
        if value is not None:
            kwargs[name] = value
    stop_ids = (sc.stop_token_ids or []) + (sc.stop_token_ids_hidden or [])
    if stop_ids:
        kwargs["stop_token_ids"] = stop_ids
    if sc.min_tokens is not None:
        kwargs["min_tokens"] = sc.min_tokens
    if sc.ignore_eos is not None:
        kwargs["ignore_eos"] = sc.ignore_eos
    # Stop strings are the frontend's; vLLM applies this to stop token ids' text, which a
    # detokenize=False engine does not produce, so passing it on only keeps it from being lost.
    if sc.include_stop_str_in_output or so.include_stop_str_in_output:
        kwargs["include_stop_str_in_output"] = True
    if so.guided_decoding is not None:
        kwargs["structured_outputs"] = structured_outputs(so.guided_decoding)
    if so.logit_bias:
        kwargs["logit_bias"] = {int(k): min(100.0, max(-100.0, v)) for k, v in so.logit_bias.items()}
    if req.output_options.logprobs is not None:
        kwargs["logprobs"] = req.output_options.logprobs
    if req.output_options.prompt_logprobs is not None:
        kwargs["prompt_logprobs"] = req.output_options.prompt_logprobs
    if req.output_options.skip_special_tokens is not None:
        kwargs["skip_special_tokens"] = req.output_options.skip_special_tokens
    # Stop strings need text: vLLM detokenizes only requests that have them (our frontend
    # applies its own and never sends any).
    if sc.stop:
        kwargs["stop"] = sc.stop
    kwargs["max_tokens"] = sc.max_tokens or max(1, max_model_len - len(req.token_ids))
    if kv_transfer_params is None:
        kv_transfer_params = kv_transfer.decode_params(req.prefill_result)
    if kv_transfer_params is not None:
        kwargs["extra_args"] = {"kv_transfer_params": kv_transfer_params}
    try:
        params = SamplingParams(**kwargs, n=1, detokenize=bool(sc.stop), output_kind=RequestOutputKind.DELTA)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise RequestError("bad_request", f"invalid sampling options: {exc}") from None
    if so.bad_words_token_ids:
        # Where vLLM keeps the token ids of its bad_words strings (update_from_tokenizer fills it
        # from text, and leaves it alone when there is no text); the sampler reads it from there.
        params._bad_words_token_ids = [list(word) for word in so.bad_words_token_ids]
    return params


def finish_reason(vllm_reason: str | None, stop_reason: int | str | None) -> str | None:
    """vLLM's finish reason in Dynamo's words."""
    if vllm_reason is None:
        return None
    if vllm_reason == "stop":
        return "eos" if stop_reason is None else "stop"
    if vllm_reason == "abort":
        return "cancelled"
    return vllm_reason  # "length", or "error" variants


def prompt_logprob_fields(prompt_logprobs: Any) -> list[list[dict[str, Any]] | None]:
    """vLLM's prompt logprobs (``None`` for the first token, then one dict per prompt token of
    that token and the top ones) as lists of ``{"token_id", "logprob", "rank"}``, in vLLM's order."""
    return [
        None
        if position is None
        # -inf (a token the sampler ruled out) is not JSON: -9999.0, as vllm serve reports it
        else [{"token_id": tid, "logprob": max(lp.logprob, -9999.0), "rank": lp.rank} for tid, lp in position.items()]
        for position in prompt_logprobs
    ]


def logprob_fields(token_ids: list[int], logprobs: Any) -> dict[str, Any]:
    """``log_probs`` (of each sampled token) and ``top_logprobs`` from vLLM's per-token dicts."""
    sampled: list[float] = []
    tops: list[list[dict[str, Any]]] = []
    for token_id, alternatives in zip(token_ids, logprobs or [], strict=False):
        sampled.append(alternatives[token_id].logprob)
        tops.append(
            sorted(
                ({"rank": lp.rank, "token_id": tid, "logprob": lp.logprob} for tid, lp in alternatives.items()),
                key=lambda d: d["rank"] or 0,
            )
        )
    return {"log_probs": sampled, "top_logprobs": tops}
