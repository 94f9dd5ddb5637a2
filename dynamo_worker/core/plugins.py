"""The plugin manager and the one typed facade the core calls hooks through.

Registration order, in one place:

1. :data:`CORE_PLUGINS`, in tuple order. They cannot be disabled.
2. The selected role, last.

pluggy calls implementations last-in, first-out, so the role's implementation of a hook runs
before the core's. Nothing outside this module touches ``pm.hook``.
"""

from __future__ import annotations

import argparse
import inspect
from typing import TYPE_CHECKING, Any

import pluggy

from dynamo_worker.core import hookspecs
from dynamo_worker.core.errors import RoleError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dynamo_worker.core.context import WorkerContext
    from dynamo_worker.core.registrar import Registrar

REQUIRED_ROLE_HOOKS = ("dynamo_worker_register_endpoints",)


def _core_plugins() -> tuple[object, ...]:
    # Imported here so that building the manager for `--help` pulls in only what it needs.
    from dynamo_worker.core import options

    return (options.CoreOptions(),)


async def _resolve(value: Any) -> Any:
    """Hooks may return a value or an awaitable: await in one place."""
    if inspect.isawaitable(value):
        return await value
    return value


async def _resolve_all(values: list[Any]) -> list[Any]:
    return [await _resolve(v) for v in values]


class HookRelay:
    """One typed method per hook. Core code calls hooks only through this class."""

    def __init__(self, role_name: str, role: object | None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        for plugin in CORE_PLUGINS():
            self.pm.register(plugin, name=f"core.{type(plugin).__name__}")
        self.role_name = role_name
        self.role = role
        if role is not None:
            self._register_role(role)

    def _register_role(self, role: object) -> None:
        try:
            self.pm.register(role, name=f"role.{self.role_name}")
            # A misspelled hook (dynamo_worker_regster_endpoints) must fail loudly.
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise RoleError(f"role {self.role_name!r} is invalid: {exc}") from exc
        implemented = {caller.name for caller in self.pm.get_hookcallers(role) or []}
        missing = [h for h in REQUIRED_ROLE_HOOKS if h not in implemented]
        if missing:
            raise RoleError(
                f"role {self.role_name!r} does not implement required hook(s) {', '.join(missing)}; "
                "decorate a method of that name with @hookimpl"
            )

    # ---- one method per hook ---------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        self.pm.hook.dynamo_worker_add_arguments(parser=parser)

    async def configure(self, ctx: WorkerContext) -> None:
        await _resolve_all(self.pm.hook.dynamo_worker_configure(ctx=ctx))

    async def create_engine(self, ctx: WorkerContext) -> Any:
        return await _resolve(self.pm.hook.dynamo_worker_create_engine(ctx=ctx))

    async def register_metrics(self, registry: CollectorRegistry, ctx: WorkerContext) -> None:
        await _resolve_all(self.pm.hook.dynamo_worker_register_metrics(registry=registry, ctx=ctx))

    async def register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        await _resolve_all(
            self.pm.hook.dynamo_worker_register_endpoints(registrar=registrar, ctx=ctx)
        )

    async def health_payload(self, ctx: WorkerContext) -> dict[str, Any] | None:
        return await _resolve(self.pm.hook.dynamo_worker_health_payload(ctx=ctx))

    async def check_engine(self, ctx: WorkerContext) -> bool | None:
        return await _resolve(self.pm.hook.dynamo_worker_check_engine(ctx=ctx))

    async def shutdown(self, ctx: WorkerContext) -> list[BaseException]:
        """Run every shutdown implementation; return the errors instead of stopping at the first."""
        errors: list[BaseException] = []
        for impl in self.pm.hook.dynamo_worker_shutdown.get_hookimpls()[::-1]:
            try:
                # Called one by one (not through pm.hook) so one failing role hook cannot
                # stop the core's from running; same last-in first-out order as pluggy.
                await _resolve(impl.function(*[ctx for _ in impl.argnames]))
            except Exception as exc:  # collected and reported by the caller, never swallowed
                errors.append(exc)
        return errors


def CORE_PLUGINS() -> tuple[object, ...]:  # noqa: N802 - reads as the constant it documents
    """The core plugins, registered first and in this order."""
    return _core_plugins()
