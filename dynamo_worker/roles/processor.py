"""The ``processor`` role: the multimodal entry point between the frontend and the workers.

Serves ``processor.generate``: takes chat messages with ``image_url`` parts (data: URLs, files
below ``--allowed-local-media-path``, remote URLs with a size limit and a timeout, from public
addresses only or from ``--allowed-media-domains``), renders the
chat template and tokenizes, sends the images to an ``encode`` worker (or an ``ec-encoder`` with
``--encoder ec-encoder``), then the token ids with the embeddings (or the images) to the LLM
worker, and streams its answer back. The frontend routes chat requests with media parts here
(:mod:`dynamo_worker.frontend.multimodal`). The flow is :mod:`dynamo_worker.multimodal.processor`;
needs ``--enable-multimodal`` (Dynamo's rule); docs/multimodal.md describes the chain.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
from typing import Any

from dynamo_worker.plugin import Registrar, UsageError, WorkerContext, hookimpl


class ProcessorRole:
    """Multimodal entry point: takes chat requests with images, calls encode, then the LLM worker."""

    name = "processor"

    def __init__(self) -> None:
        self.path = ""
        self.served = ""
        self.model: Any = None
        self.loader: Any = None
        self.processor: Any = None

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dynamo_worker.multimodal import media, models

        g = parser.add_argument_group("processor role")
        models.add_model_arguments(g)
        g.add_argument(
            "--encoder",
            choices=("encode", "ec-encoder"),
            default="encode",
            help="where images are encoded: encode workers (embeddings sent to the LLM worker) "
            "or ec-encoder workers (outputs stored through the EC connector); default %(default)s",
        )
        g.add_argument(
            "--allowed-local-media-path",
            metavar="DIR",
            action="append",
            default=[],
            help="file:// image URLs may name files below DIR (repeatable); without it every file:// URL is refused",
        )
        g.add_argument(
            "--no-remote-media",
            dest="remote_media",
            action="store_false",
            help="refuse http(s):// image URLs (they are fetched by default, from public addresses only)",
        )
        g.add_argument(
            "--allowed-media-domains",
            metavar="HOST",
            nargs="+",
            action="extend",
            default=[],
            help="fetch http(s):// images only from these host names (vLLM's flag); they may "
            "resolve to private addresses, e.g. an internal image store. Without it any "
            "host is fetched from, but only from public addresses",
        )
        g.add_argument(
            "--media-fetch-timeout",
            type=float,
            default=media.DEFAULT_FETCH_TIMEOUT,
            metavar="SECONDS",
            help="give up fetching a remote image after this long (default %(default)s)",
        )
        media.add_limit_arguments(g)

    @hookimpl
    def dynamo_worker_configure(self, ctx: WorkerContext) -> None:
        from dynamo_worker.core.options import check_positive
        from dynamo_worker.multimodal import media, models

        o = ctx.options
        try:
            domains = media.parse_media_domains(o.allowed_media_domains)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if domains and not o.remote_media:
            raise UsageError(
                "--allowed-media-domains allows remote images that --no-remote-media refuses; pass only one of them"
            )
        self.path, self.served, self.model = models.configured_model(o)
        check_positive("--media-fetch-timeout", o.media_fetch_timeout)
        dirs = []
        for d in o.allowed_local_media_path:
            path = pathlib.Path(d).expanduser().resolve()
            if not path.is_dir():
                raise UsageError(f"--allowed-local-media-path {d}: no such directory")
            dirs.append(path)
        self.loader = media.MediaLoader(
            media.limits_from(o), tuple(dirs), o.remote_media, o.media_fetch_timeout, domains
        )

    @hookimpl
    async def dynamo_worker_create_engine(self, ctx: WorkerContext) -> Any:
        from transformers import AutoTokenizer

        from dynamo_worker.multimodal.processor import (
            BACKEND,
            ENCODER_COMPONENTS,
            Processor,
        )

        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.path)
        o = ctx.options
        self.processor = Processor(
            tokenizer=tokenizer,
            model=self.model,
            served=self.served,
            loader=self.loader,
            backend=ctx.runtime.client(BACKEND, "generate"),
            encoder=ctx.runtime.client(ENCODER_COMPONENTS[o.encoder], "generate"),
            encoder_kind=o.encoder,
        )
        return self.processor

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        registrar.endpoint(
            "generate",
            self.processor.generate,
            model=self.served,
            model_path=self.path,
            kind="processor",
            encoder=ctx.options.encoder,
        )

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: WorkerContext) -> dict[str, Any]:
        # A text-only request through the chain (processor -> LLM worker), one token.
        return {
            "messages": [{"role": "user", "content": "Hi"}],
            "sampling_options": {"temperature": 0.0},
            "stop_conditions": {"max_tokens": 1},
        }
