"""The ``decode`` role: an aggregated (or decode-side) worker on vLLM's ``AsyncLLM``.

Serves ``generate``, ``clear_kv_blocks``, ``kv_blocks``, ``load_lora``, ``unload_lora`` and
``list_loras`` on the request plane, ``/engine/sleep``, ``/engine/wake_up`` and
``/engine/is_sleeping`` on its system port, publishes per-engine load (``load_metrics``) and
relays vLLM's KV-cache events (``kv_events``) on the event plane; ``kv_blocks`` answers the
blocks those events say are cached (for a KV-aware router that lost events or just started).
With a KV connector (``--connector``) it is the decode half of disaggregated serving: a request
carrying a ``prefill_result`` loads its prompt's KV through the connector. With
``--enable-multimodal`` it is the language-model worker of the multimodal chain: ``generate``
also takes ``multi_modal_data`` (image embeddings from an ``encode`` worker, or images whose
encoder output an ``ec-encoder`` stored, with ``--ec-storage-path``), checked before vLLM sees it
(docs/multimodal.md). The hooks it shares with the prefill role are in
:class:`dynamo_worker.engine.role.VllmRole`; docs/operations.md describes them for operators.
"""

from __future__ import annotations

import argparse
from typing import Any

from dynamo_worker.engine.role import COMPONENT, VllmRole
from dynamo_worker.plugin import Registrar, UsageError, WorkerContext, hookimpl


class DecodeRole(VllmRole):
    """Aggregated or decode worker on a vLLM AsyncLLM engine."""

    name = "decode"
    component = COMPONENT
    takes_image_embeds = True  # with --enable-multimodal: embeddings from encode workers

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dynamo_worker.engine import ec_transfer, kv_transfer

        g = self._engine_arguments(parser)
        g.add_argument(
            "--is-decode-worker",
            action="store_true",
            help="Dynamo's decode worker: publishes no KV events (a decode worker's cache holds "
            "what prefill workers computed, so routers choose by the prefill workers' events)",
        )
        g.add_argument(
            "--lora-dirs",
            metavar="DIR[,DIR]",
            default=None,
            help="directories load_lora may load adapters from (with --enable-lora); "
            "none by default, so load_lora refuses every path until this is given",
        )
        kv_transfer.add_arguments(g)
        ec_transfer.add_arguments(g)

    @hookimpl
    def dynamo_worker_configure(self, ctx: WorkerContext) -> None:
        from dynamo_worker.cli import disaggregation_mode

        mode, label = disaggregation_mode(ctx.options)
        if ctx.options.is_decode_worker and mode is not None:
            raise UsageError(
                f"--is-decode-worker and {label} cannot be combined (Dynamo refuses it too); "
                "use only --disaggregation-mode"
            )
        super().dynamo_worker_configure(ctx)
        if ctx.options.is_decode_worker or mode == "decode":
            # Dynamo's decode worker differs from agg only here: no KV-event publisher (kv_blocks answers none).
            self.kv_events = None
            self.engine_args.kv_events_config = None
            ctx.resolved_config["kv_event_ports"] = None
            ctx.resolved_config["engine_args"]["kv_events_config"] = None
            flag = "--is-decode-worker" if ctx.options.is_decode_worker else label
            ctx.log.info("%s: no KV events are published (as Dynamo's decode workers)", flag)

    def _register_controls(self, registrar: Registrar, ctx: WorkerContext, data: dict[str, Any]) -> None:
        """LoRA endpoints and sleep/wake routes (``data``: the generate record, changed by them)."""
        from dynamo_worker.engine.lora import LoraManager
        from dynamo_worker.engine.publication import GenerateRecord
        from dynamo_worker.engine.sleep import SleepControl

        engine = ctx.engine
        if ctx.options.enable_multimodal:
            from dynamo_worker.multimodal.llm_inputs import ImageInputs
            from dynamo_worker.multimodal.models import vision_model

            config = engine.model_config.hf_config.to_dict()
            self.handler.images = ImageInputs.for_engine(engine, vision_model(config, self.facts.path))
            data["multimodal"] = True
        if self.engine_args.enable_lora:
            data["loras"] = []
        record = GenerateRecord(ctx, self.component, "generate", dict(data))
        served = self.engine_args.served_model_name or []
        base_names = {
            self.facts.served_name,
            self.facts.path,
            str(self.engine_args.model),
            *([served] if isinstance(served, str) else served),
        }
        adapters = LoraManager(
            engine,
            enabled=bool(self.engine_args.enable_lora),
            allowed_dirs=self.lora_dirs,
            capacity=LoraManager.capacity_for(self.engine_args),
            base_names=base_names,
            record=record,
        )
        if adapters.enabled and adapters.capacity == 0:
            ctx.log.warning(
                "--enable-lora with --max-loras %d leaves no adapter slot on CPU (one stays free): "
                "load_lora will refuse every adapter; use --max-loras 2 or more",
                self.engine_args.max_loras,
            )
        sleep = SleepControl(
            engine, record, ctx.health, frees_memory=bool(engine.vllm_config.model_config.enable_sleep_mode)
        )
        self.handler.adapters = adapters
        self.handler.sleep = sleep
        for name in ("load_lora", "unload_lora", "list_loras"):
            registrar.endpoint(name, getattr(adapters, name), model=self.facts.served_name)
        registrar.route("POST", "/engine/sleep", sleep.sleep)
        registrar.route("POST", "/engine/wake_up", sleep.wake_up)
        registrar.route("GET", "/engine/is_sleeping", sleep.is_sleeping)
