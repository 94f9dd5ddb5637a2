"""The engine side of ``generate``: a request checked against this worker's model, then vLLM's
``SamplingParams``; vLLM's outputs in the response chunk's fields.

The messages themselves (:class:`~dynamo_worker.core.generate.GenerateRequest`, the response
chunk, the usage block) are defined once in :mod:`dynamo_worker.core.generate`. With ``eos`` and
``stop`` on a stop token that token is the chunk's last id, and vllm serve leaves its text out of
the output unless ``include_stop_str_in_output``. ``prompt_logprobs`` (first chunk): ``None`` for
the first prompt token, then per token a list of ``{"token_id", "logprob", "rank"}``: the prompt
token, then the top ones.

Requests are validated here, before they reach vLLM: malformed input gets a ``bad_request``
error and never touches the engine.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from dynamo_worker.core.generate import (
    MAX_LOGPROBS,
    PLAIN_SAMPLING_FIELDS,
    ContextLengthExceeded,
    GenerateRequest,
    GuidedDecoding,
    TopLogprob,
    fit_context,
)
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.engine import kv_transfer


def parse_request(
    payload: Any,
    *,
    vocab_size: int,
    max_model_len: int,
    min_prompt_tokens: int = 1,
    multimodal: bool = False,
    kv_connector: bool = False,
) -> GenerateRequest:
    """Validate a ``generate`` payload; a ``bad_request`` :class:`RequestError` naming the field otherwise.

    ``multi_modal_data`` is only accepted with ``multimodal`` (a worker started with
    ``--enable-multimodal``), which validates it itself (:mod:`dynamo_worker.multimodal.llm_inputs`);
    ``prefill_result`` only with ``kv_connector`` (an engine with a KV connector to hand it to).
    """
    try:
        req = msgspec.convert(payload, GenerateRequest)
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
    bad = next((t for t in req.eos_token_ids or [] if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError("bad_request", f"eos_token_ids: {bad} is outside the vocabulary (0..{vocab_size - 1})")
    _check_prefill_result(req, kv_connector)
    sc = req.stop_conditions
    if sc.max_tokens is not None and sc.max_tokens < 1:
        raise RequestError("bad_request", f"stop_conditions.max_tokens must be at least 1 (got {sc.max_tokens})")
    try:
        sc.max_tokens = fit_context(len(req.token_ids), sc.max_tokens, max_model_len)
    except ContextLengthExceeded as exc:
        raise RequestError("bad_request", str(exc)) from None
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


def _refuse_unsupported(req: GenerateRequest) -> None:
    """Fields of Dynamo's message this worker cannot honour: a ``bad_request`` naming each, never dropped.

    ``n`` > 1 is for the caller to fan out (our frontend sends n requests, seeds ``seed + i`` as
    vLLM's children have); vLLM 0.32 has no ``best_of``, and ``length_penalty`` only in beam search.
    """
    so, sc, oo = req.sampling_options, req.stop_conditions, req.output_options
    # Text-shaping options shape the text a worker returns only when asked for text (``detokenize``).
    no_text = "it shapes text, and this request asks for token ids only (set sampling_options.detokenize)"
    refused = [
        ("sampling_options.n", so.n not in (None, 1), "one sequence per request: send n requests"),
        ("sampling_options.best_of", so.best_of not in (None, 1), "vLLM 0.32 has no best_of"),
        ("sampling_options.use_beam_search", bool(so.use_beam_search), "beam search is not supported"),
        ("sampling_options.length_penalty", so.length_penalty is not None, "it applies to beam search only"),
        (
            "stop_conditions.max_thinking_tokens",
            sc.max_thinking_tokens is not None,
            "this worker has no reasoning parser to count thinking tokens with",
        ),
        (
            "stop_conditions.include_stop_str_in_output",
            bool(sc.include_stop_str_in_output) and not so.detokenize,
            no_text,
        ),
        (
            "sampling_options.include_stop_str_in_output",
            bool(so.include_stop_str_in_output) and not so.detokenize,
            no_text,
        ),
        ("output_options.skip_special_tokens", oo.skip_special_tokens is False and not so.detokenize, no_text),
        (
            "output_options.formatted_prompt",
            bool(oo.formatted_prompt),
            "a worker gets token ids, not the formatted prompt: the caller that rendered it has it",
        ),
        (
            "output_options.return_tokens_as_token_ids",
            oo.return_tokens_as_token_ids is not None,
            "a worker reports every token (and logprob token) by id; rendering them is the caller's choice",
        ),
        ("mdc_sum", req.mdc_sum is not None, "this worker has no Dynamo model card to check a checksum against"),
        ("annotations", bool(req.annotations), "annotations are answered by the frontend's preprocessor"),
        (
            "router_config_override",
            req.router_config_override is not None,
            "it is a router's setting: send it to the frontend",
        ),
        (
            "bootstrap_info",
            req.bootstrap_info is not None,
            "bootstrap-server disaggregation is not supported: a decode request carries its prefill_result",
        ),
        ("extra_args", bool(req.extra_args), "this worker runs no custom sampler or logits processor to read them"),
    ]
    guided = so.guided_decoding
    if guided is not None:
        refused.append(
            (
                "sampling_options.guided_decoding.whitespace_pattern",
                guided.whitespace_pattern is not None,
                "vLLM 0.32's structured-output backends do not read it",
            )
        )
    for name, bad, why in refused:
        if bad:
            raise RequestError("bad_request", f"{name} is not supported: {why}")


def _check_prefill_result(req: GenerateRequest, kv_connector: bool) -> None:
    """``prefill_result``: a prefill worker's answer, whose KV blocks this worker's connector loads."""
    if req.prefill_result is None:
        return
    if not kv_connector:
        raise RequestError(
            "bad_request",
            "prefill_result is not supported: this worker has no KV connector to load the prefilled "
            "blocks with (start it with --connector or --kv-transfer-config, as its prefill workers)",
        )
    disaggregated = req.prefill_result.get("disaggregated_params")
    # A connector that finds blocks by prompt (vLLM's ExampleConnector) answers null parameters.
    if not isinstance(disaggregated, dict) or not isinstance(disaggregated.get("kv_transfer_params", {}), dict | None):
        raise RequestError(
            "bad_request",
            "prefill_result must be a prefill worker's answer: "
            "{disaggregated_params: {kv_transfer_params: object|null}}",
        )


def check_engine_wide_options(guided: GuidedDecoding | None, config: Any) -> None:
    """vLLM 0.32 reads ``disable_any_whitespace`` and ``disable_additional_properties`` from the
    engine's ``--structured-outputs-config`` only: a request may repeat the engine's value, not change it."""
    if guided is None:
        return
    for name in ("disable_any_whitespace", "disable_additional_properties"):
        asked, engine_wide = getattr(guided, name), getattr(config, name)
        if asked is not None and asked != engine_wide:
            raise RequestError(
                "bad_request",
                f"sampling_options.guided_decoding.{name} is {str(engine_wide).lower()} for every request "
                f'on this worker: vLLM sets it per engine (--structured-outputs-config \'{{"{name}": '
                f"{str(asked).lower()}}}')",
            )


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
    req: GenerateRequest,
    defaults: dict[str, Any],
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
    for name in (*PLAIN_SAMPLING_FIELDS, "allowed_token_ids"):
        value = getattr(so, name, None)
        if value is not None:
            kwargs[name] = value
    stop_ids = (sc.stop_token_ids or []) + (sc.stop_token_ids_hidden or [])
    if not sc.ignore_eos:
        # The caller's EOS ids (Dynamo's frontend sends the model's): vLLM stops on its own EOS
        # only, so the others stop as stop tokens, and finish_reason reports them as eos.
        stop_ids += [t for t in req.eos_token_ids or [] if t not in stop_ids]
    if stop_ids:
        kwargs["stop_token_ids"] = stop_ids
    if sc.min_tokens is not None:
        kwargs["min_tokens"] = sc.min_tokens
    if sc.ignore_eos is not None:
        kwargs["ignore_eos"] = sc.ignore_eos
    # Both shape the text of a detokenizing request (checked in parse_request).
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
    # Stop strings need text: vLLM detokenizes requests that have them (our frontend applies its
    # own and never sends any) and those that ask for text.
    if sc.stop:
        kwargs["stop"] = sc.stop
    kwargs["max_tokens"] = sc.max_tokens
    if kv_transfer_params is None:
        kv_transfer_params = kv_transfer.decode_params(req.prefill_result)
    if kv_transfer_params is not None:
        kwargs["extra_args"] = {"kv_transfer_params": kv_transfer_params}
    try:
        params = SamplingParams(
            **kwargs, n=1, detokenize=bool(sc.stop or so.detokenize), output_kind=RequestOutputKind.DELTA
        )
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise RequestError("bad_request", f"invalid sampling options: {exc}") from None
    if so.bad_words_token_ids:
        # Where vLLM keeps the token ids of its bad_words strings (update_from_tokenizer fills it
        # from text, and leaves it alone when there is no text); the sampler reads it from there.
        params._bad_words_token_ids = [list(word) for word in so.bad_words_token_ids]
    return params


def finish_reason(
    vllm_reason: str | None, stop_reason: int | str | None, eos_token_ids: tuple[int, ...] | list[int] = ()
) -> str | None:
    """vLLM's finish reason in Dynamo's words; a stop on one of the request's ``eos_token_ids`` is ``eos``."""
    if vllm_reason is None:
        return None
    if vllm_reason == "stop":
        return "eos" if stop_reason is None or stop_reason in eos_token_ids else "stop"
    if vllm_reason == "abort":
        return "cancelled"
    return vllm_reason  # "length", or "error" variants


def prompt_logprob_fields(prompt_logprobs: Any) -> list[list[TopLogprob] | None]:
    """vLLM's prompt logprobs (``None`` for the first token, then one dict per prompt token of
    that token and the top ones), in vLLM's order."""
    return [
        None
        if position is None
        # -inf (a token the sampler ruled out) is not JSON: -9999.0, as vllm serve reports it
        else [TopLogprob(tid, max(lp.logprob, -9999.0), lp.rank) for tid, lp in position.items()]
        for position in prompt_logprobs
    ]


def logprob_fields(token_ids: list[int], logprobs: Any) -> tuple[list[float | None], list[list[TopLogprob]]]:
    """``log_probs`` (of each sampled token) and ``top_logprobs`` from vLLM's per-token dicts."""
    sampled: list[float | None] = []
    tops: list[list[TopLogprob]] = []
    for token_id, alternatives in zip(token_ids, logprobs or [], strict=False):
        sampled.append(alternatives[token_id].logprob)
        tops.append(
            sorted(
                (TopLogprob(tid, lp.logprob, lp.rank) for tid, lp in alternatives.items()),
                key=lambda t: t.rank or 0,
            )
        )
    return sampled, tops
