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
from dynamo_worker.core.dynamo_flags import DynamoRuntimeFlags
from dynamo_worker.core.errors import RoleError
from dynamo_worker.core.options import CoreOptions

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dynamo_worker.core.context import WorkerContext
    from dynamo_worker.core.health import HealthCheck
    from dynamo_worker.core.registrar import Registrar

REQUIRED_ROLE_HOOKS = ("dynamo_worker_register_endpoints",)

#: The core plugins (classes, one instance each per process), registered first, in this order.
CORE_PLUGINS: tuple[type, ...] = (CoreOptions, DynamoRuntimeFlags)


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
        for plugin in CORE_PLUGINS:
            self.pm.register(plugin(), name=f"core.{plugin.__name__}")
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
        callers = self.pm.get_hookcallers(role) or []
        wrappers = sorted(
            caller.name
            for caller in callers
            for impl in caller.get_hookimpls()
            if impl.plugin is role and (impl.hookwrapper or impl.wrapper)
        )
        if wrappers:
            self.pm.unregister(role)
            raise RoleError(
                f"role {self.role_name!r} declares hook wrapper(s) {', '.join(wrappers)}: dynamo-worker hooks "
                "may return awaitables that the core awaits after pluggy returns, so a wrapper would see "
                "un-awaited coroutines; implement the hook itself (drop hookwrapper=/wrapper=) and use "
                "tryfirst=/trylast= to order it"
            )
        implemented = {caller.name for caller in callers}
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
        if getattr(self.role, "serves_endpoints", True):
            # Only a role that serves endpoints publishes a TCP address (the frontend calls, never serves).
            from dynamo_worker.core.options import check_advertise

            check_advertise(ctx.options)

    async def create_engine(self, ctx: WorkerContext) -> Any:
        return await _resolve(self.pm.hook.dynamo_worker_create_engine(ctx=ctx))

    async def register_metrics(self, registry: CollectorRegistry, ctx: WorkerContext) -> None:
        await _resolve_all(self.pm.hook.dynamo_worker_register_metrics(registry=registry, ctx=ctx))

    async def register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        await _resolve_all(self.pm.hook.dynamo_worker_register_endpoints(registrar=registrar, ctx=ctx))

    async def health_payload(self, ctx: WorkerContext) -> HealthCheck | None:
        # Imported here: the canary module needs the runtime, which --help does not.
        from dynamo_worker.core.health import HealthCheck

        return HealthCheck.of(await _resolve(self.pm.hook.dynamo_worker_health_payload(ctx=ctx)))

    async def check_engine(self, ctx: WorkerContext) -> bool | None:
        return await _resolve(self.pm.hook.dynamo_worker_check_engine(ctx=ctx))

    async def shutdown(self, ctx: WorkerContext) -> list[BaseException]:
        """Run every shutdown implementation; return the errors instead of stopping at the first."""
        errors: list[BaseException] = []
        arguments = {"ctx": ctx}
        for impl in self.pm.hook.dynamo_worker_shutdown.get_hookimpls()[::-1]:
            try:
                # Called one by one (not through pm.hook) so one failing role hook cannot
                # stop the core's from running; same last-in first-out order as pluggy, and by
                # argument name as pluggy does, so an implementation takes what it needs.
                await _resolve(impl.function(**{name: arguments[name] for name in impl.argnames}))
            except Exception as exc:  # collected and reported by the caller, never swallowed
                errors.append(exc)
        return errors
