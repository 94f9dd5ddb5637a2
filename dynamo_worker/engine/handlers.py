"""Request handlers of a vLLM-backed worker: ``generate`` and ``clear_kv_blocks``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import attrs

from dynamo_worker.core.errors import EngineDead
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.engine import protocol

log = logging.getLogger(__name__)


@attrs.define
class ModelFacts:
    """What callers need to know about the served model, published in discovery."""

    served_name: str
    path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None

    def discovery_data(self, kind: str) -> dict[str, Any]:
        return {"model": self.served_name, "model_path": self.path, "max_model_len": self.max_model_len,
                "eos_token_ids": self.eos_token_ids, "kind": kind}


def model_facts(engine: Any, served_name: str) -> ModelFacts:
    model_config = engine.model_config
    tokenizer = engine.tokenizer
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    return ModelFacts(
        served_name=served_name,
        path=str(model_config.model),
        max_model_len=int(model_config.max_model_len),
        vocab_size=int(model_config.get_vocab_size()),
        eos_token_ids=[eos] if eos is not None else [],
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


class GenerateHandler:
    """Streams token-id deltas from a vLLM ``AsyncLLM`` for Dynamo-format requests."""

    def __init__(self, engine: Any, facts: ModelFacts) -> None:
        self.engine = engine
        self.facts = facts
        # The model's generation_config defaults (temperature etc.), as vllm serve applies them.
        self.default_sampling = engine.model_config.get_diff_sampling_param()

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        req = protocol.parse_request(request, vocab_size=self.facts.vocab_size,
                                     max_model_len=self.facts.max_model_len)
        params = protocol.sampling_params(req, self.default_sampling, self.facts.max_model_len)
        want_logprobs = req.output_options.logprobs is not None
        completion_tokens = 0
        try:
            # Cancelling this task (the caller went away) makes vLLM abort the request.
            async for out in self.engine.generate(tokens_input(req.token_ids), params, context.request_id):
                choice = out.outputs[0]
                new_ids = list(choice.token_ids)
                completion_tokens += len(new_ids)
                chunk: dict[str, Any] = {"token_ids": new_ids}
                if want_logprobs:
                    chunk.update(protocol.logprob_fields(new_ids, choice.logprobs))
                reason = protocol.finish_reason(choice.finish_reason, choice.stop_reason)
                if reason is not None:
                    chunk["finish_reason"] = reason
                    prompt_tokens = len(req.token_ids)
                    cached = out.num_cached_tokens
                    chunk["completion_usage"] = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                        "prompt_tokens_details": {"cached_tokens": cached} if cached is not None else None,
                    }
                yield chunk
        except EngineDeadError as exc:
            raise EngineDead(f"vLLM engine died: {exc}") from exc
        except (VLLMClientError, ValueError) as exc:
            raise RequestError("bad_request", f"rejected by the engine: {exc}") from None

    async def clear_kv_blocks(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """Reset the prefix cache (Dynamo's ``clear_kv_blocks``)."""
        try:
            ok = await self.engine.reset_prefix_cache()
        except Exception as exc:  # reported to the caller as Dynamo does, not swallowed
            yield {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
            return
        if ok is False:
            yield {"status": "error", "message": "KV cache reset failed (requests are running)"}
        else:
            yield {"status": "success", "message": "KV cache cleared"}
