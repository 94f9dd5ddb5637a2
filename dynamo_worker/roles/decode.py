"""The ``decode`` role: an aggregated (or decode-side) worker on vLLM's ``AsyncLLM``."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from dynamo_worker.core.errors import EngineDead
from dynamo_worker.core.hookspecs import hookimpl

COMPONENT = "backend"  # Dynamo's component name for LLM workers


class DecodeRole:
    """Aggregated or decode worker on a vLLM AsyncLLM engine."""

    name = "decode"

    def __init__(self) -> None:
        self.engine_args: Any = None
        self.handler: Any = None
        self.facts: Any = None

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group(
            "decode role",
            "Every vLLM engine argument is accepted as well (--model PATH, --max-model-len N, "
            "--enforce-eager, --served-model-name NAME, ...): see --engine-help.",
        )
        g.add_argument("--engine-help", action="store_true",
                       help="list vLLM's engine arguments (imports vLLM) and exit")
        g.add_argument("--is-decode-worker", action="store_true",
                       help="Dynamo compatibility: this worker is the decode half of disaggregated serving")

    @hookimpl
    def dynamo_worker_configure(self, ctx: Any) -> None:
        from dynamo_worker.engine import args as engine_args

        if ctx.options.engine_help:
            print(engine_args.engine_help())
            raise SystemExit(0)
        self.engine_args, applied = engine_args.parse_engine_args(ctx.options.extra_args)
        ctx.options.extra_args = []  # consumed: vLLM's parser accepted all of them
        ctx.state["component"] = COMPONENT
        ctx.state["resolved_config"] = {
            "engine_args": engine_args.resolved(self.engine_args),
            "defaults_applied": {attr: {"value": v, "why": why} for attr, v, why in applied},
        }

    @hookimpl
    async def dynamo_worker_create_engine(self, ctx: Any) -> Any:
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from dynamo_worker.engine.handlers import GenerateHandler, model_facts

        ctx.log.info("starting the vLLM engine for %s (this takes a while on CPU)", self.engine_args.model)
        # Built in a thread so signals and NATS keep being served while the model loads.
        engine = await asyncio.to_thread(
            AsyncLLM.from_engine_args, self.engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        served = (self.engine_args.served_model_name or [self.engine_args.model])
        served_name = served[0] if isinstance(served, list) else served
        self.facts = model_facts(engine, served_name)
        self.handler = GenerateHandler(engine, self.facts)
        ctx.log.info("engine ready: %s (max_model_len %d)", served_name, self.facts.max_model_len)
        return engine

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Any, ctx: Any) -> None:
        dp_rank = self.engine_args.data_parallel_rank
        if dp_rank:
            ctx.log.info("data-parallel rank %d is not the leader: serving no endpoints, waiting for a signal",
                         dp_rank)
            return
        data = self.facts.discovery_data("decode")
        registrar.endpoint("generate", self.handler.generate, **data)
        registrar.endpoint("clear_kv_blocks", self.handler.clear_kv_blocks, model=self.facts.served_name)

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: Any) -> dict[str, Any]:
        bos = self.facts.bos_token_id
        return {
            "token_ids": [bos if bos is not None else 1],
            "sampling_options": {"temperature": 0.0},
            "stop_conditions": {"max_tokens": 1, "ignore_eos": False},
        }

    @hookimpl
    async def dynamo_worker_check_engine(self, ctx: Any) -> bool:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            await ctx.engine.check_health()
        except EngineDeadError as exc:
            raise EngineDead(f"vLLM engine died: {exc}") from exc
        return True

    @hookimpl
    def dynamo_worker_shutdown(self, ctx: Any) -> None:
        if ctx.engine is not None:
            ctx.engine.shutdown()
