"""A validated request to token ids, then to Dynamo's ``PreprocessedRequest`` for ``generate``.

Chat prompts are rendered with the tokenizer's chat template and encoded *without* adding
special tokens: templates (the demo model's, Llama's) emit BOS themselves, and encoding with
special tokens would put a second BOS in front. Completion prompts given as text are encoded
with special tokens (BOS), as vLLM does; prompts given as token ids are sent as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from dynamo_worker.core.generate import (
    ContextLengthExceeded,
    GenerateRequest,
    OutputOptions,
    SamplingOptions,
    StopConditions,
    fit_context,
)
from dynamo_worker.frontend.models import ServedModel
from dynamo_worker.frontend.protocol import ApiError, GenerationParams, bad_request

#: ``tokenizer.apply_chat_template``'s arguments for tokenizing, which the frontend does itself:
#: refused in ``chat_template_kwargs`` rather than passed to a call that only renders text.
TOKENIZER_ARGUMENTS = frozenset(
    {"conversation", "padding", "truncation", "max_length", "return_tensors", "return_dict"}
    | {"return_assistant_tokens_mask", "tokenizer_kwargs"}
)


def encode_completion_prompt(tokenizer: Any, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
    """A text prompt encoded (with special tokens unless ``add_special_tokens`` is false, as vLLM);
    token ids checked against the vocabulary and sent as they are."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    vocab = len(tokenizer)
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return prompt


def encode_chat_prompt(
    tokenizer: Any,
    model: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Chat messages to token ids; the keywords are ``/tokenize``'s and the chat request's (vLLM's defaults).

    ``tools`` go to the template as vllm serve passes them (``tools=``; None without tools).
    ``chat_template_kwargs`` are more variables for the template, merged as vLLM merges them: the
    request's own ``add_generation_prompt``/``continue_final_message``/``tools`` win over the same
    keys there; ``chat_template`` is refused (vllm serve refuses it without
    --trust-request-chat-template), and so are the tokenizer's arguments
    (:data:`TOKENIZER_ARGUMENTS`), which are not template variables. ``tokenize`` is accepted and
    changes nothing, as with vllm serve, which decides itself how the prompt is tokenized."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(f"model {model!r} has no chat template; use /v1/completions", param="messages")
    extra = dict(chat_template_kwargs or {})
    refused = sorted(extra.keys() & {"chat_template", *TOKENIZER_ARGUMENTS})
    if refused:
        raise bad_request(
            f"chat_template_kwargs must not set {', '.join(refused)}: only variables of the chat template",
            param="chat_template_kwargs",
        )
    extra.pop("tokenize", None)
    extra.pop("add_generation_prompt", None)
    extra.pop("continue_final_message", None)
    given_tools = extra.pop("tools", None)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools if tools is not None else given_tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **extra,
        )
    except ApiError:
        raise
    except Exception as exc:  # a template's raise_exception(), or messages it cannot render
        raise bad_request(
            f"the chat template of model {model!r} rejected the messages: {exc}", param="messages"
        ) from None
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_stop_token_ids(
    tokenizer: Any, ids: Sequence[int], logit_bias: Sequence[int] = (), allowed: Sequence[int] = ()
) -> None:
    """Token ids a request names (``stop_token_ids``, ``logit_bias`` keys, ``allowed_token_ids``)
    are in the vocabulary."""
    vocab = len(tokenizer)
    for param, given in (("stop_token_ids", ids), ("logit_bias", logit_bias), ("allowed_token_ids", allowed)):
        bad = next((t for t in given if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} in {param} is outside the vocabulary (0..{vocab - 1})", param=param)


def resolve_max_tokens(model: ServedModel, prompt_len: int, params: GenerationParams) -> int | None:
    """The max_tokens to send: vllm serve's (:func:`fit_context`, lowered to the room the context
    leaves, the rest of it when not given); a 400 for a prompt that leaves no room."""
    if model.max_model_len is None:
        return params.max_tokens
    try:
        return fit_context(prompt_len, params.max_tokens, model.max_model_len)
    except ContextLengthExceeded as exc:
        raise bad_request(str(exc), param=exc.parameter, code="context_length_exceeded") from None


def preprocessed_request(
    model: ServedModel, token_ids: list[int], params: GenerationParams, max_tokens: int | None
) -> dict[str, Any]:
    """Dynamo's ``PreprocessedRequest`` (:class:`GenerateRequest`, as JSON), the payload of ``backend.generate``."""
    sampling: dict[str, Any] = dict(params.sampling)
    if params.guided:
        sampling["guided_decoding"] = params.guided
    if params.logit_bias:
        sampling["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    if params.allowed_token_ids is not None:
        sampling["allowed_token_ids"] = list(params.allowed_token_ids)
    request = GenerateRequest(
        model=model.name,
        token_ids=token_ids,
        stop_conditions=StopConditions(
            max_tokens=max_tokens,
            min_tokens=params.min_tokens,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
        ),  # include_stop_str_in_output: applied here, to the text the frontend makes
        sampling_options=msgspec.convert(sampling, SamplingOptions),
        output_options=OutputOptions(logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs),
        eos_token_ids=model.eos_token_ids,
    )
    return msgspec.to_builtins(request)
