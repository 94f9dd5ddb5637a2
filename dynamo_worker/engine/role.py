"""The shared hooks of the roles that serve a vLLM ``AsyncLLM``: decode and prefill.

Engine arguments (vLLM's flags plus our defaults and the KV connector), engine creation in a
thread, data-parallel followers, metrics, load publishing, the KV-event relay, ``generate``,
``clear_kv_blocks`` and ``kv_blocks``, the health canary, engine checks and shutdown. The role
modules in ``dynamo_worker.roles`` subclass :class:`VllmRole` and only add what differs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any, ClassVar

from dynamo_worker.core import dynamo_flags
from dynamo_worker.plugin import EngineDead, Registrar, UsageError, WorkerContext, hookimpl

COMPONENT = "backend"  # Dynamo's component name for LLM workers


class VllmRole:
    """Base of the roles serving a vLLM ``AsyncLLM`` (decode, prefill): every hook they share.

    Subclasses set ``name``, ``component`` and ``needs_connector``, add their flags in
    ``dynamo_worker_add_arguments`` (starting from :meth:`_engine_arguments`) and may register
    more endpoints and routes in :meth:`_register_controls`.
    """

    name: ClassVar[str] = ""
    component: str = COMPONENT
    needs_connector: ClassVar[bool] = False  # a prefill engine is pointless without a KV connector
    uses_kv_cache: ClassVar[bool] = True  # False for an encoder-only engine: no KV connector, no KV events
    takes_image_embeds: ClassVar[bool] = False  # the LLM worker of the multimodal chain (decode)
    produces_encoder_cache: ClassVar[bool] = False  # the ec-encoder: the EC connector's producer side

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
        self.kv_transfer: dict[str, Any] | None = None  # the KV connector decided at configure
        self.ec_transfer: dict[str, Any] | None = None  # the EC connector decided at configure
        self.kv_eviction = "lru"  # the engine's eviction policy (kv_eviction), decided at configure

    def _engine_arguments(self, parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        g = parser.add_argument_group(
            f"{self.name} role",
            "Every vLLM engine argument is accepted as well (--model PATH, --max-model-len N, "
            "--enforce-eager, --served-model-name NAME, ...): see --engine-help.",
        )
        g.add_argument(
            "--engine-help", action="store_true", help="list vLLM's engine arguments (imports vLLM) and exit"
        )
        from dynamo_worker.engine.kv_eviction import POLICIES

        g.add_argument(
            "--kv-eviction",
            choices=POLICIES,
            default="lru",
            help="which cached KV blocks the engine evicts first: lru (vLLM's: the least recently "
            "freed) or active-inactive (blocks no request has hit before blocks requests reused, "
            "such as a shared system prompt: docs/routing.md); needs prefix caching",
        )
        dynamo_flags.add_worker_arguments(g)  # Dynamo's worker flags, accepted for its launch scripts
        return g

    @hookimpl
    def dynamo_worker_configure(self, ctx: WorkerContext) -> None:
        from dynamo_worker.engine import args as engine_args

        if ctx.options.engine_help:
            print(engine_args.engine_help())
            raise SystemExit(0)
        from dynamo_worker.engine import data_parallel, ec_transfer, executor, kv_events, kv_eviction, kv_transfer, lora

        for line in dynamo_flags.worker_warnings(ctx.options):
            ctx.log.warning("%s", line)
        self.engine_args, applied = engine_args.parse_engine_args(ctx.options.extra_args)
        ctx.options.extra_args = []  # consumed: vLLM's parser accepted all of them
        self.dp_rank = data_parallel.assign_rank(self.engine_args)
        if self.uses_kv_cache:
            self.kv_transfer = kv_transfer.configure(
                ctx.options, self.engine_args, role=self.name, required=self.needs_connector
            )
        chosen = executor.configure(self.engine_args)  # after the connector, which may need mp
        if chosen is not None:
            applied.append(chosen)
        if getattr(ctx.options, "enable_multimodal", False):
            from dynamo_worker.multimodal import models

            # A model the multimodal roles do not serve is a one-line error now, not after the engine.
            model = str(self.engine_args.model)
            models.vision_model(models.read_config(model), model)
            if self.takes_image_embeds:  # the LLM worker takes image embeddings from encode workers
                self.engine_args.enable_mm_embeds = True
                applied.append(("enable_mm_embeds", True, "--enable-multimodal: encode workers send image embeddings"))
        self.ec_transfer = ec_transfer.configure(
            ctx.options, self.engine_args, role=self.name, producer=self.produces_encoder_cache
        )
        self.lora_dirs = lora.parse_lora_dirs(getattr(ctx.options, "lora_dirs", None))
        if self.lora_dirs and not self.engine_args.enable_lora:
            raise UsageError("--lora-dirs needs --enable-lora (vLLM's flag that turns LoRA support on)")
        self.kv_events = kv_events.configure(self.engine_args) if self.uses_kv_cache else None
        if self.uses_kv_cache:
            self.kv_eviction = kv_eviction.configure(ctx.options.kv_eviction, self.engine_args)
        elif ctx.options.kv_eviction != "lru":  # `up` hands the workers' flags to an ec-encoder too
            ctx.log.warning("--kv-eviction: the %s role's engine keeps no KV cache; ignored", self.name)
        ctx.resolved_config = {
            "kv_transfer": self.kv_transfer,
            "ec_transfer": self.ec_transfer,
            "engine_args": engine_args.resolved(self.engine_args),
            "defaults_applied": {attr: {"value": v, "why": why} for attr, v, why in applied},
            "kv_event_ports": self.kv_events.ports if self.kv_events else None,
            "lora_dirs": [str(d) for d in self.lora_dirs],
            "kv_eviction": self.kv_eviction,
        }

    @hookimpl
    async def dynamo_worker_create_engine(self, ctx: WorkerContext) -> Any:
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
                AsyncLLM.from_engine_args,
                self.engine_args,
                usage_context=UsageContext.OPENAI_API_SERVER,
                stat_loggers=[self.load.stat_logger_factory()],
            )
        served = self.engine_args.served_model_name or [self.engine_args.model]
        served_name = served[0] if isinstance(served, list) else served
        self.facts = model_facts(engine, served_name)
        self.handler = GenerateHandler(engine, self.facts, prefill_only=self.needs_connector)
        config = engine.vllm_config
        ctx.log.info(
            "engine ready: %s (max_model_len %d, %d KV blocks of %d tokens)",
            served_name,
            self.facts.max_model_len,
            config.cache_config.num_gpu_blocks or 0,
            config.cache_config.block_size,
        )
        if self.kv_relay is not None:
            self.kv_relay.set_engine(int(config.cache_config.block_size), self._kv_capacity_per_rank(engine))
        return engine

    @staticmethod
    def _kv_capacity_per_rank(engine: Any) -> int:
        """KV blocks of one data-parallel rank's engine: vLLM's front end sums num_gpu_blocks over
        every engine it manages (as :class:`dynamo_worker.engine.load.LoadPublisher` reads it)."""
        ranks = list(getattr(engine.engine_core, "engine_ranks_managed", None) or [0])
        return int(engine.vllm_config.cache_config.num_gpu_blocks or 0) // max(1, len(ranks))

    def _kv_discovery(self, engine: Any) -> dict[str, Any]:
        """What a KV-aware router needs in the generate record: block size, capacity per rank,
        and whether this worker's KV events (and ``kv_blocks``) describe its cache."""
        cache = engine.vllm_config.cache_config
        return {
            "kv_block_size": int(cache.block_size),
            "kv_capacity_blocks": self._kv_capacity_per_rank(engine),
            "kv_events": self.kv_relay is not None and bool(cache.enable_prefix_caching),
            "kv_eviction": self.kv_eviction,  # for the router's eviction forecast (kv_forecast)
        }

    def _leads(self) -> bool:
        """Whether this process serves (data-parallel rank 0, or no data parallelism): the leader
        relays every rank's KV events; other ranks' engines send theirs to it."""
        return not self.dp_rank

    @hookimpl
    def dynamo_worker_register_metrics(self, registry: Any, ctx: WorkerContext) -> None:
        from dynamo_worker.engine.metrics import EngineMetrics

        if self.handler is None:  # no AsyncLLM in this process (a data-parallel follower)
            return

        metrics = EngineMetrics(registry, ctx.namespace, self.component)
        self.handler.metrics = metrics
        self.load.metrics = metrics
        self.child_metrics.register(registry)
        self.load.attach(ctx.engine)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        if not self._leads():
            ctx.log.info(
                "data-parallel rank %d is not the leader: serving no endpoints, waiting for a signal "
                "(rank 0 serves this rank's engine)",
                self.dp_rank,
            )
            return
        data = self.facts.discovery_data(self.name, **self._kv_discovery(ctx.engine))
        self._register_controls(registrar, ctx, data)
        registrar.endpoint("generate", self.handler.generate, **data)
        registrar.endpoint("clear_kv_blocks", self.handler.clear_kv_blocks, model=self.facts.served_name)
        if not self.engine_args.disable_log_stats:
            registrar.background("load-metrics", self.load.run)
        if self.kv_relay is not None:
            self.kv_relay.instance_id = ctx.instance_id
            self.kv_relay.publish = ctx.runtime.publish_event
            self.kv_relay.max_message_bytes = ctx.runtime.max_message_bytes
            registrar.endpoint("kv_blocks", self.kv_relay.kv_blocks, model=self.facts.served_name)
            registrar.background("kv-events", self.kv_relay.run)
        else:
            from dynamo_worker.engine.kv_events import no_kv_blocks

            registrar.endpoint("kv_blocks", no_kv_blocks, model=self.facts.served_name)

    def _register_controls(self, registrar: Registrar, ctx: WorkerContext, data: dict[str, Any]) -> None:
        """More endpoints and routes of the role (``data``: the generate record); none by default."""

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: WorkerContext) -> dict[str, Any] | None:
        if self.facts is None:  # a data-parallel follower serves nothing to probe
            return None
        return self.facts.health_payload()

    @hookimpl
    async def dynamo_worker_check_engine(self, ctx: WorkerContext) -> bool:
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
    def dynamo_worker_shutdown(self, ctx: WorkerContext) -> None:
        try:
            if ctx.engine is not None:
                ctx.engine.shutdown()
        finally:
            if self.kv_relay is not None:
                self.kv_relay.close()
            if self.child_metrics is not None:
                self.child_metrics.cleanup()
