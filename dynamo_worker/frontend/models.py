"""The live model table: which models are served now, by which instances, with which tokenizer.

Decode workers publish their ``backend.generate`` endpoint in discovery with
``{"model", "model_path", "max_model_len", "eos_token_ids", "kind"}``, plus ``"loras"``: the LoRA
adapters loaded on that worker right now. Each adapter is listed as a model of its own, served
by exactly the workers that hold it, with its base model's tokenizer. The table is computed
from the client's live instance list on every lookup (so a model appears and disappears with
its workers), and a discovery listener starts loading a model's tokenizer in a thread as soon
as its first worker appears, so the first request does not pay for it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import threading
import time
from typing import Any

import attrs

from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.runtime import Client
from dynamo_worker.frontend.protocol import ApiError, bad_request, model_not_found, unavailable

log = logging.getLogger(__name__)

REAPPEAR_WAIT = 2.0  # seconds a request for a known model waits for one of its workers to reappear


#: transformers' lazy module is not safe to import from two threads at once (a half-initialised
#: module answers "cannot import name 'AutoTokenizer'"): the warm-up and the loads take turns.
_IMPORTING = threading.Lock()


def _import_transformers() -> None:
    with _IMPORTING:
        # AutoTokenizer, not just the package: transformers is a lazy module, and most of the
        # time (2.6 of 3.7 s here) is the tokenizer machinery AutoTokenizer pulls in on first use.
        importlib.import_module("transformers").AutoTokenizer  # noqa: B018


def _load_tokenizer(path: str) -> Any:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory on this host")
    # Imported here: transformers takes seconds to import and only a serving frontend needs it.
    with _IMPORTING:
        from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _warmed(task: asyncio.Task[Any]) -> None:
    # A failed import is reported by the tokenizer load that needs it, with the model's path.
    if not task.cancelled() and task.exception() is not None:
        log.debug("importing transformers ahead of time failed: %s", task.exception())


class TokenizerCache:
    """Tokenizers by model directory, each loaded once in a worker thread.

    A failed load is remembered for :data:`RETRY_FAILED_AFTER` seconds (requests meanwhile fail
    fast, and lease refreshes do not retry it every second), then tried again: fixing the
    directory on this host needs no frontend restart.
    """

    RETRY_FAILED_AFTER = 10.0

    def __init__(self) -> None:
        self._loading: dict[str, asyncio.Task[Any]] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # path -> (when, why)
        self._warming: asyncio.Task[Any] | None = None

    def warm_up(self) -> None:
        """Import the tokenizer library in a thread now, while workers are still loading their
        engines, rather than when the first model appears: it takes seconds, and until it is
        done that model's first request waits (about 3 s of the time to the first answer)."""
        if self._warming is None:
            self._warming = asyncio.create_task(asyncio.to_thread(_import_transformers), name="import transformers")
            self._warming.add_done_callback(_warmed)

    def prefetch(self, path: str) -> None:
        if path in self._loading:
            return
        failed = self._failed.get(path)
        if failed is not None and time.monotonic() - failed[0] < self.RETRY_FAILED_AFTER:
            return
        task = asyncio.create_task(asyncio.to_thread(_load_tokenizer, path), name=f"tokenizer {path}")
        task.add_done_callback(functools.partial(self._loaded, path))
        self._loading[path] = task

    def _loaded(self, path: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._loading.pop(path, None)
            return
        exc = task.exception()
        if exc is not None:
            self._loading.pop(path, None)
            self._failed[path] = (time.monotonic(), f"{type(exc).__name__}: {exc}")
            log.error("cannot load the tokenizer from %s: %s: %s", path, type(exc).__name__, exc)
        else:
            self._failed.pop(path, None)
            log.info("loaded the tokenizer from %s", path)

    async def get(self, path: str) -> Any:
        self.prefetch(path)
        task = self._loading.get(path)
        if task is None:
            when, why = self._failed[path]
            raise RuntimeError(
                f"{why} (failed {time.monotonic() - when:.0f}s ago; retried "
                f"{self.RETRY_FAILED_AFTER:.0f}s after a failure)"
            )
        # shield: a client going away must not cancel a load other requests wait for.
        return await asyncio.shield(task)

    def close(self) -> None:
        for task in [*self._loading.values(), *([self._warming] if self._warming else [])]:
            task.cancel()


@attrs.frozen
class ServedModel:
    """One model name and the instances serving it right now."""

    name: str
    instances: tuple[InstanceRecord, ...]
    parent: str | None = None  # the base model, for a LoRA adapter

    @property
    def model_paths(self) -> list[str]:
        return list(dict.fromkeys(str(r.data["model_path"]) for r in self.instances))

    @property
    def max_model_len(self) -> int | None:
        # Instances may differ; the smallest limit is the one every instance can honour.
        lens = [
            r.data["max_model_len"]
            for r in self.instances
            if isinstance(r.data.get("max_model_len"), int) and r.data["max_model_len"] > 0
        ]
        return min(lens) if lens else None

    @property
    def eos_token_ids(self) -> list[int]:
        for r in self.instances:
            ids = r.data.get("eos_token_ids")
            if isinstance(ids, list) and all(type(t) is int for t in ids):
                return list(ids)
        return []


def _serves_model(record: InstanceRecord) -> bool:
    data = record.data
    return isinstance(data.get("model"), str) and isinstance(data.get("model_path"), str)


def adapters_of(record: InstanceRecord) -> list[str]:
    """The LoRA adapters an instance holds now (its record's ``loras``), other than its base name."""
    loras = record.data.get("loras")
    if not isinstance(loras, list):
        return []
    return [name for name in loras if isinstance(name, str) and name != record.data.get("model")]


def serves(record: InstanceRecord, model: str) -> bool:
    """Whether a request naming ``model`` may go to this instance: its base model or a loaded adapter."""
    return record.data.get("model") == model or model in adapters_of(record)


class ModelTable:
    """Models served now (from discovery), models seen before, and their tokenizers."""

    def __init__(self, client: Client, tokenizers: TokenizerCache | None = None) -> None:
        self.client = client
        self.tokenizers = tokenizers or TokenizerCache()
        self.seen: dict[str, int] = {}  # model name -> when it first appeared (Unix seconds)
        self._ignored: set[str] = set()
        self._live: dict[str, ServedModel] = {}
        self._live_key: tuple[int, frozenset[str] | None] | None = None

    def start(self) -> None:
        """Follow discovery: remember each model and start loading its tokenizer on arrival."""
        self.tokenizers.warm_up()
        self.client.watcher.add_listener(self._on_change)
        for record in self.client.instances():
            self._on_change(record.key, record, False)

    def _on_change(self, key: str, record: InstanceRecord | None, *_: Any) -> None:
        # Called for every lease refresh too (about once a second per instance): stay cheap.
        # *_: the watcher also says whether a departure was a lease expiry; the table does not care.
        # It must never raise: an exception in a listener restarts the whole discovery watch.
        try:
            self._follow(key, record)
        except Exception:  # a bug here must not blind the process to discovery
            log.exception("model table: cannot apply the discovery change of %s", key)

    def _follow(self, key: str, record: InstanceRecord | None) -> None:
        if record is None or record.component != self.client.component or record.endpoint != self.client.endpoint:
            return
        if not _serves_model(record):
            if key not in self._ignored:
                self._ignored.add(key)
                log.warning(
                    "ignoring instance %s of %s.%s: its discovery record has no model/model_path",
                    record.instance_id,
                    record.component,
                    record.endpoint,
                )
            return
        name = record.data["model"]
        if name not in self.seen:
            self.seen[name] = int(time.time())
            log.info("model %r is now served (instance %s, %s)", name, record.instance_id, record.data["model_path"])
        self.tokenizers.prefetch(record.data["model_path"])

    def instances(self) -> list[InstanceRecord]:
        return [r for r in self.client.instances() if _serves_model(r)]

    def live(self) -> dict[str, ServedModel]:
        """Every model (and LoRA adapter) with at least one instance now, by name.

        Asked on every request: computed again only when discovery or the set of unreachable
        instances changed (it was 8% of the frontend's CPU at concurrency 64 when computed each time).
        """
        unreachable = self.client.runtime.unreachable
        key = (self.client.watcher.version, frozenset(unreachable) if unreachable else None)
        if key != self._live_key:
            self._live, self._live_key = self._compute_live(), key
        return self._live

    def _compute_live(self) -> dict[str, ServedModel]:
        by_name: dict[str, list[InstanceRecord]] = {}
        parents: dict[str, str] = {}
        records = self.instances()
        bases = {r.data["model"] for r in records}
        for record in records:
            by_name.setdefault(record.data["model"], []).append(record)
            for adapter in adapters_of(record):
                if adapter not in bases:  # a base model's name always means the base model
                    by_name.setdefault(adapter, []).append(record)
                    parents[adapter] = record.data["model"]
        return {name: ServedModel(name, tuple(records), parents.get(name)) for name, records in sorted(by_name.items())}

    def resolve(self, name: str) -> ServedModel:
        """The model a request names: 404 if never seen, 503 if seen but no instance serves it now."""
        live = self.live()
        model = live.get(name)
        if model is not None:
            return model
        if name in self.seen:
            raise unavailable(f"no worker serves the model {name!r} right now; retry later")
        raise model_not_found(name, list(live))

    async def resolve_soon(self, name: str, timeout: float = REAPPEAR_WAIT) -> ServedModel:
        """:meth:`resolve`, but a model seen before whose instances are all gone gets ``timeout``
        seconds to come back (after a NATS restart its workers take a moment to register again)."""
        if name in self.seen and name not in self.live():
            await self.client.watcher.wait_for(lambda: name in self.live(), timeout)
        return self.resolve(name)

    async def resolve_request(self, name: str | None, timeout: float = REAPPEAR_WAIT) -> ServedModel:
        """The model a request names (:meth:`resolve_soon`), or, with ``model`` left out (or ""), the one
        model served, as vllm serve answers with its model then (LoRA adapters do not count: vllm
        serve uses its base model). Several models: a 400 naming ``model``; none: a 503."""
        if name:  # "" too, as vllm serve
            return await self.resolve_soon(name, timeout)

        def bases() -> list[ServedModel]:
            return [m for m in self.live().values() if m.parent is None]

        if not bases() and self.seen:  # served before: give its workers a moment to come back
            await self.client.watcher.wait_for(lambda: bool(bases()), timeout)
        found = bases()
        if not found:
            raise unavailable("no worker serves any model right now, so `model` cannot be left out; retry later")
        if len(found) > 1:
            names = ", ".join(m.name for m in found)
            raise bad_request(f"`model` is required: this frontend serves {len(found)} models ({names})", param="model")
        return found[0]

    async def tokenizer(self, model: ServedModel) -> Any:
        """The model's tokenizer, from the first of its instances' directories that loads here."""
        errors: list[str] = []
        for path in model.model_paths:
            try:
                return await self.tokenizers.get(path)
            except Exception as exc:  # reported to the client below, with every path tried
                errors.append(f"{path}: {exc}")
        raise ApiError(
            503,
            f"cannot load the tokenizer of model {model.name!r} on the frontend host ({'; '.join(errors)})",
            code="tokenizer_unavailable",
        )
