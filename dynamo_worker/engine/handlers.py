"""Request handlers of a vLLM-backed worker: ``generate`` and ``clear_kv_blocks``."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs

from dynamo_worker.core.errors import EngineDead
from dynamo_worker.core.generate import GenerateChunk, GenerateRequest, Usage
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.engine import kv_transfer, protocol

if TYPE_CHECKING:
    from dynamo_worker.engine.lora import LoraManager
    from dynamo_worker.engine.metrics import EngineMetrics, RequestTimer
    from dynamo_worker.engine.sleep import SleepControl
    from dynamo_worker.multimodal.llm_inputs import ImageInputs

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
    data_parallel_size: int = 1
    # vLLM's ExampleConnector fails the engine (IndexError in the model runner) on a one-token
    # prompt: a prefill worker at once, a decode worker once any prefill wrote the empty prefix.
    min_prompt_tokens: int = 1
    kv_connector: bool = False  # the engine has a KV connector: a request's prefill_result can be loaded

    def health_payload(self) -> dict[str, Any]:
        """A one-token greedy ``generate`` request of the BOS token (Dynamo's canary).

        Our ``generate`` takes token ids only, so without a tokenizer (``--skip-tokenizer-init``:
        no BOS known) the canary sends token id 1 rather than Dynamo's text prompt.
        """
        bos = self.bos_token_id
        return {
            "token_ids": [bos if bos is not None else 1] * self.min_prompt_tokens,
            "sampling_options": {"temperature": 0.0},
            "stop_conditions": {"max_tokens": 1, "ignore_eos": False},
        }

    def discovery_data(
        self,
        kind: str,
        *,
        kv_block_size: int | None = None,
        kv_capacity_blocks: int | None = None,
        kv_events: bool = False,
        kv_eviction: str = "lru",
    ) -> dict[str, Any]:
        """The ``generate`` record. For KV-aware routers: the engine's block size (tokens), its KV
        capacity in blocks per data-parallel rank, ``kv_events``: whether this worker relays
        KV events and serves its block set (``kv_blocks``; false: it is routed by load alone),
        and ``kv_eviction``: which cached blocks its engine evicts first (``--kv-eviction``)."""
        return {
            "model": self.served_name,
            "model_path": self.path,
            "max_model_len": self.max_model_len,
            "eos_token_ids": self.eos_token_ids,
            "kind": kind,
            "data_parallel_size": self.data_parallel_size,
            "kv_block_size": kv_block_size,
            "kv_capacity_blocks": kv_capacity_blocks,
            "kv_events": kv_events,
            "kv_eviction": kv_eviction,
        }


def model_facts(engine: Any, served_name: str) -> ModelFacts:
    model_config = engine.model_config
    tokenizer = engine.tokenizer
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    kv_transfer = engine.vllm_config.kv_transfer_config
    example_connector = kv_transfer is not None and kv_transfer.kv_connector == "ExampleConnector"
    return ModelFacts(
        served_name=served_name,
        path=str(model_config.model),
        max_model_len=int(model_config.max_model_len),
        vocab_size=int(model_config.get_vocab_size()),
        eos_token_ids=[eos] if eos is not None else [],
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        data_parallel_size=int(engine.vllm_config.parallel_config.data_parallel_size),
        min_prompt_tokens=2 if example_connector else 1,
        kv_connector=kv_transfer is not None and kv_transfer.kv_connector is not None,
    )


class GenerateHandler:
    """Streams token-id deltas from a vLLM ``AsyncLLM`` for Dynamo-format requests.

    With ``prefill_only`` (the prefill role) a request runs its prompt with one output token and
    the connector's ``do_remote_decode`` parameters, and the answer is one chunk
    ``{"token_ids", "disaggregated_params": {"kv_transfer_params": ...}, "completion_usage"}``:
    the decode worker is then sent the request with that chunk as its ``prefill_result``.
    """

    def __init__(self, engine: Any, facts: ModelFacts, *, prefill_only: bool = False) -> None:
        self.engine = engine
        self.facts = facts
        self.prefill_only = prefill_only
        # The model's generation_config defaults (temperature etc.), as vllm serve applies them.
        self.default_sampling = engine.model_config.get_diff_sampling_param()
        # Set by the role once they exist (metrics are registered after the engine is built).
        self.metrics: EngineMetrics | None = None
        self.adapters: LoraManager | None = None
        self.sleep: SleepControl | None = None
        self.images: ImageInputs | None = None  # set with --enable-multimodal: takes multi_modal_data

    def _dp_rank(self, req: GenerateRequest) -> int | None:
        """The data-parallel rank a request is pinned to (``routing.dp_rank``), checked."""
        rank = (req.routing or {}).get("dp_rank")
        if rank is None:
            return None
        size = self.facts.data_parallel_size
        if type(rank) is not int or not 0 <= rank < size:
            raise RequestError("bad_request", f"routing.dp_rank must be an integer in 0..{size - 1} (got {rank!r})")
        return rank

    def _adapter(self, model: str | None) -> Any:
        """The LoRA adapter a request names through ``model``, held while the request runs."""
        if self.adapters is not None:
            return self.adapters.use(model)
        if model is not None and model not in (self.facts.served_name, self.facts.path):
            raise RequestError(
                "not_found", f"model {model!r} is not served by this worker (it serves {self.facts.served_name!r})"
            )
        return contextlib.nullcontext()

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[GenerateChunk]:
        req = protocol.parse_request(
            request,
            vocab_size=self.facts.vocab_size,
            max_model_len=self.facts.max_model_len,
            min_prompt_tokens=self.facts.min_prompt_tokens,
            multimodal=self.images is not None,
            kv_connector=self.facts.kv_connector,
        )
        # Checked here, before the engine: bad multimodal input can kill vLLM's engine.
        mm_data = (
            self.images.engine_data(req.multi_modal_data)
            if self.images is not None and req.multi_modal_data is not None
            else None
        )
        transfer = None
        if self.prefill_only:  # one token: the KV cache is the product; decode samples for real
            req.stop_conditions.max_tokens = req.stop_conditions.min_tokens = 1
            req.output_options.logprobs = req.output_options.prompt_logprobs = None
            req.sampling_options.guided_decoding = None  # the decode worker samples under the constraint
            req.prefill_result = None
            transfer = kv_transfer.prefill_params()
        params = protocol.sampling_params(req, self.default_sampling, transfer)
        protocol.check_engine_wide_options(
            req.sampling_options.guided_decoding, self.engine.vllm_config.structured_outputs_config
        )
        protocol.check_structured_outputs(params, self.engine)
        if self.sleep is not None and self.sleep.asleep:
            raise RequestError(
                "unavailable", "the engine is asleep (POST /engine/wake_up on its system port)", retryable=True
            )
        want_logprobs = req.output_options.logprobs is not None
        with self._adapter(req.model) as lora_request:  # not_found for a name this worker lacks
            # Labelled after validation: a request cannot mint a series with a name of its choosing.
            model = lora_request.lora_name if lora_request is not None else self.facts.served_name
            timer = self.metrics.request(context.endpoint, model) if self.metrics is not None else None
            async for chunk in self._stream(req, params, context, lora_request, want_logprobs, timer, mm_data):
                yield chunk

    async def _stream(
        self,
        req: GenerateRequest,
        params: Any,
        context: RequestContext,
        lora_request: Any,
        want_logprobs: bool,
        timer: RequestTimer | None,
        mm_data: dict[str, Any] | None = None,
    ) -> AsyncIterator[GenerateChunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        completion_tokens = 0
        text = bool(req.sampling_options.detokenize)
        eos_ids = () if req.stop_conditions.ignore_eos else tuple(req.eos_token_ids or ())
        # Token ids plus images go through vLLM's input processor (it inserts the image tokens).
        prompt: Any = (
            tokens_input(req.token_ids)
            if mm_data is None
            else {"prompt_token_ids": req.token_ids, "multi_modal_data": mm_data}
        )
        try:
            # Cancelling this task (the caller went away) makes vLLM abort the request.
            async for out in self.engine.generate(
                prompt, params, context.request_id, lora_request=lora_request, data_parallel_rank=self._dp_rank(req)
            ):
                choice = out.outputs[0]
                new_ids = list(choice.token_ids)
                completion_tokens += len(new_ids)
                if timer is not None:
                    timer.tokens(len(new_ids), context.started, time.monotonic())
                chunk = GenerateChunk(new_ids)
                if want_logprobs:
                    chunk.log_probs, chunk.top_logprobs = protocol.logprob_fields(new_ids, choice.logprobs)
                if out.prompt_logprobs:  # all at once, with the first output (DELTA mode)
                    chunk.prompt_logprobs = protocol.prompt_logprob_fields(out.prompt_logprobs)
                if text:
                    chunk.text = choice.text
                chunk.finish_reason = protocol.finish_reason(choice.finish_reason, choice.stop_reason, eos_ids)
                if chunk.finish_reason is not None:
                    if chunk.finish_reason == "stop":  # the frontend leaves a stop token's text out
                        chunk.stop_reason = choice.stop_reason
                    chunk.completion_usage = Usage.of(len(req.token_ids), completion_tokens, out.num_cached_tokens)
                    if self.prefill_only:
                        chunk.disaggregated_params = {"kv_transfer_params": out.kv_transfer_params}
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
