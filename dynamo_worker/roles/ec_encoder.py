"""The ``ec-encoder`` role: vLLM's native encoder-only instance, storing outputs through an EC connector.

A vLLM ``AsyncLLM`` with ``ec_role="ec_producer"`` (:mod:`dynamo_worker.engine.ec_transfer`;
``--ec-storage-path DIR`` for vLLM's file-based ``ECExampleConnector``). It serves
``ec_encoder.generate``: ``{"images": [PNG bytes]}`` makes vLLM run the vision encoder and store
its outputs (:mod:`dynamo_worker.multimodal.ec_encoder`). The LLM worker, started with
``--enable-multimodal --ec-storage-path DIR``, is the consumer: given the same images by the
processor (``--encoder ec-encoder``) it loads their outputs instead of encoding. Engine
creation, metrics, engine checks and shutdown are the decode role's
(:class:`dynamo_worker.engine.role.VllmRole`); there is no KV cache, KV connector or KV events.
Needs ``--enable-multimodal`` (Dynamo's rule); docs/multimodal.md describes the chain.
"""

from __future__ import annotations

import argparse
from typing import Any

from dynamo_worker.engine.role import VllmRole
from dynamo_worker.plugin import Registrar, WorkerContext, hookimpl


class EcEncoderRole(VllmRole):
    """vLLM-native encoder-only instance storing encoder outputs through an EC connector."""

    name = "ec-encoder"
    component = "ec_encoder"
    uses_kv_cache = False
    produces_encoder_cache = True

    def __init__(self) -> None:
        super().__init__()
        self.ec_handler: Any = None

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dynamo_worker.engine import ec_transfer
        from dynamo_worker.multimodal import media

        g = self._engine_arguments(parser)
        ec_transfer.add_arguments(g)
        media.add_limit_arguments(g)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        from dynamo_worker.multimodal import media
        from dynamo_worker.multimodal.ec_encoder import EcEncodeHandler
        from dynamo_worker.multimodal.models import vision_model

        engine = ctx.engine
        model = vision_model(engine.model_config.hf_config.to_dict(), self.facts.path)
        paths = {self.facts.served_name, self.facts.path, str(self.engine_args.model)}
        bos = self.facts.bos_token_id
        self.ec_handler = EcEncodeHandler(
            engine, model, self.facts.served_name, paths, bos if bos is not None else 0, media.limits_from(ctx.options)
        )
        registrar.endpoint(
            "generate",
            self.ec_handler.generate,
            model=self.facts.served_name,
            model_path=self.facts.path,
            kind="ec-encoder",
        )

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: WorkerContext) -> dict[str, Any]:
        from dynamo_worker.multimodal.media import sample_png
        from dynamo_worker.multimodal.wire import EncodeRequest, to_builtins

        return to_builtins(EncodeRequest(images=[sample_png()]))
