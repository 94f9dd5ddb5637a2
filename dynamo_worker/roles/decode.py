"""The ``decode`` role: an aggregated (or decode-side) worker on vLLM's ``AsyncLLM``.

Serves ``generate``, ``clear_kv_blocks``, ``load_lora``, ``unload_lora`` and ``list_loras`` on the
request plane, ``/engine/sleep``, ``/engine/wake_up`` and ``/engine/is_sleeping`` on its system
port, publishes per-engine load (``load_metrics``) and relays vLLM's KV-cache events
(``kv_events``) on the event plane. The engine-side pieces live in :mod:`dynamo_worker.engine`;
docs/operations.md describes them for operators.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from dynamo_worker.core.errors import EngineDead, UsageError
from dynamo_worker.core.hookspecs import hookimpl

COMPONENT = "backend"  # Dynamo's component name for LLM workers


class DecodeRole:
    """Aggregated or decode worker on a vLLM AsyncLLM engine."""

    name = "decode"

    def __init__(self) -> None:
        self.engine_args: Any = None
        self.handler: Any = None
        self.facts: Any = None
        self.lora_dirs: list[Any] = []
        self.kv_events: Any = None  # kv_events.KvEventsPlan, or None when events are off
        self.kv_relay: Any = None
        self.child_metrics: Any = None
        self.load: Any = None
        self.dp_rank: int | None = None  # this process's data-parallel rank, with --data-parallel-rank

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
        g.add_argument("--lora-dirs", metavar="DIR[,DIR]", default=None,
                       help="directories load_lora may load adapters from (with --enable-lora); "
                            "none by default, so load_lora refuses every path until this is given")

    @hookimpl
    def dynamo_worker_configure(self, ctx: Any) -> None:
        from dynamo_worker.engine import args as engine_args

        if ctx.options.engine_help:
            print(engine_args.engine_help())
            raise SystemExit(0)
        from dynamo_worker.engine import kv_events, lora

        from dynamo_worker.engine import data_parallel

        self.engine_args, applied = engine_args.parse_engine_args(ctx.options.extra_args)
        ctx.options.extra_args = []  # consumed: vLLM's parser accepted all of them
        self.dp_rank = data_parallel.assign_rank(self.engine_args)
        self.lora_dirs = lora.parse_lora_dirs(ctx.options.lora_dirs)
        if self.lora_dirs and not self.engine_args.enable_lora:
            raise UsageError("--lora-dirs needs --enable-lora (vLLM's flag that turns LoRA support on)")
        self.kv_events = kv_events.configure(self.engine_args)
        ctx.state["component"] = COMPONENT
        ctx.state["resolved_config"] = {
            "engine_args": engine_args.resolved(self.engine_args),
            "defaults_applied": {attr: {"value": v, "why": why} for attr, v, why in applied},
            "kv_event_ports": self.kv_events.ports if self.kv_events else None,
            "lora_dirs": [str(d) for d in self.lora_dirs],
        }

    @hookimpl
    async def dynamo_worker_create_engine(self, ctx: Any) -> Any:
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from dynamo_worker.engine.handlers import GenerateHandler, model_facts
        from dynamo_worker.engine.load import LoadPublisher
        from dynamo_worker.engine.metrics import ChildProcessMetrics

        if not self._leads():
            from dynamo_worker.engine.data_parallel import HeadlessEngines

            ctx.log.info("starting the engine core of data-parallel rank %d (headless)", self.dp_rank)
            return await asyncio.to_thread(HeadlessEngines, self.engine_args)
        ctx.log.info("starting the vLLM engine for %s (this takes a while on CPU)", self.engine_args.model)
        self.load = LoadPublisher(ctx.instance_id, ctx.runtime.publish_event)
        self.child_metrics = ChildProcessMetrics()
        if self.kv_events is not None and self._leads():
            from dynamo_worker.engine.kv_events import KvEventRelay

            # Ports are taken before the engine starts, so a port in use is an error now, not
            # an engine dying 20 s later.
            self.kv_relay = KvEventRelay(self.kv_events)
            self.kv_relay.open(self.engine_args)
        if self.engine_args.disable_log_stats:
            ctx.log.warning("--disable-log-stats: no vllm: metrics and no load_metrics events")
        # Built in a thread so signals and NATS keep being served while the model loads. The
        # engine's processes are spawned meanwhile: they get their own metrics directory.
        with self.child_metrics.spawning():
            engine = await asyncio.to_thread(
                AsyncLLM.from_engine_args, self.engine_args, usage_context=UsageContext.OPENAI_API_SERVER,
                stat_loggers=[self.load.stat_logger_factory()])
        served = (self.engine_args.served_model_name or [self.engine_args.model])
        served_name = served[0] if isinstance(served, list) else served
        self.facts = model_facts(engine, served_name)
        self.handler = GenerateHandler(engine, self.facts)
        config = engine.vllm_config
        ctx.log.info("engine ready: %s (max_model_len %d, %d KV blocks of %d tokens)", served_name,
                     self.facts.max_model_len, config.cache_config.num_gpu_blocks or 0,
                     config.cache_config.block_size)
        return engine

    def _leads(self) -> bool:
        """Whether this process serves (data-parallel rank 0, or no data parallelism): the leader
        relays every rank's KV events; other ranks' engines send theirs to it."""
        return not self.dp_rank

    @hookimpl
    def dynamo_worker_register_metrics(self, registry: Any, ctx: Any) -> None:
        from dynamo_worker.engine.metrics import EngineMetrics

        if self.handler is None:  # no AsyncLLM in this process (a data-parallel follower)
            return

        metrics = EngineMetrics(registry, ctx.namespace, COMPONENT)
        self.handler.metrics = metrics
        self.load.metrics = metrics
        self.child_metrics.register(registry)
        self.load.attach(ctx.engine)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Any, ctx: Any) -> None:
        if not self._leads():
            ctx.log.info("data-parallel rank %d is not the leader: serving no endpoints, waiting for a signal "
                         "(rank 0 serves this rank's engine)", self.dp_rank)
            return
        from dynamo_worker.engine.lora import LoraManager
        from dynamo_worker.engine.publication import GenerateRecord
        from dynamo_worker.engine.sleep import SleepControl

        engine = ctx.engine
        data = self.facts.discovery_data("decode")
        if self.engine_args.enable_lora:
            data["loras"] = []
        record = GenerateRecord(ctx, COMPONENT, "generate", dict(data))
        served = self.engine_args.served_model_name or []
        base_names = {self.facts.served_name, self.facts.path, str(self.engine_args.model),
                      *([served] if isinstance(served, str) else served)}
        adapters = LoraManager(engine, enabled=bool(self.engine_args.enable_lora), allowed_dirs=self.lora_dirs,
                               capacity=LoraManager.capacity_for(self.engine_args), base_names=base_names,
                               record=record)
        if adapters.enabled and adapters.capacity == 0:
            ctx.log.warning("--enable-lora with --max-loras %d leaves no adapter slot on CPU (one stays free): "
                            "load_lora will refuse every adapter; use --max-loras 2 or more",
                            self.engine_args.max_loras)
        sleep = SleepControl(engine, record, ctx.health, frees_memory=bool(engine.vllm_config.model_config.enable_sleep_mode))
        self.handler.adapters = adapters
        self.handler.sleep = sleep

        registrar.endpoint("generate", self.handler.generate, **data)
        registrar.endpoint("clear_kv_blocks", self.handler.clear_kv_blocks, model=self.facts.served_name)
        for name in ("load_lora", "unload_lora", "list_loras"):
            registrar.endpoint(name, getattr(adapters, name), model=self.facts.served_name)
        registrar.route("POST", "/engine/sleep", sleep.sleep)
        registrar.route("POST", "/engine/wake_up", sleep.wake_up)
        registrar.route("GET", "/engine/is_sleeping", sleep.is_sleeping)
        if not self.engine_args.disable_log_stats:
            registrar.background("load-metrics", self.load.run)
        if self.kv_relay is not None:
            self.kv_relay.instance_id = ctx.instance_id
            self.kv_relay.publish = ctx.runtime.publish_event
            registrar.background("kv-events", self.kv_relay.run)

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: Any) -> dict[str, Any] | None:
        if self.facts is None:  # a data-parallel follower serves nothing to probe
            return None
        bos = self.facts.bos_token_id
        return {
            "token_ids": [bos if bos is not None else 1],
            "sampling_options": {"temperature": 0.0},
            "stop_conditions": {"max_tokens": 1, "ignore_eos": False},
        }

    @hookimpl
    async def dynamo_worker_check_engine(self, ctx: Any) -> bool:
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self._leads():
            ctx.engine.check()  # EngineDead when a headless engine core exited
            return True
        try:
            await ctx.engine.check_health()
        except EngineDeadError as exc:
            raise EngineDead(f"vLLM engine died: {exc}") from exc
        return True

    @hookimpl
    def dynamo_worker_shutdown(self, ctx: Any) -> None:
        try:
            if ctx.engine is not None:
                ctx.engine.shutdown()
        finally:
            if self.kv_relay is not None:
                self.kv_relay.close()
            if self.child_metrics is not None:
                self.child_metrics.cleanup()
