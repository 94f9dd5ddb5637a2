"""What a declared-but-not-yet-built role says when selected: plainly that it does not serve."""

from __future__ import annotations

from typing import Any

from dynamo_worker.core.errors import RoleError
from dynamo_worker.core.hookspecs import hookimpl


class PlannedRole:
    """Base of a built-in role whose body is still to come; selecting it fails at configure."""

    name = ""
    issue = ""
    instead = "decode"

    def _refuse(self) -> RoleError:
        return RoleError(
            f"role {self.name!r} is declared but not implemented yet ({self.issue}); "
            f"use --role {self.instead} meanwhile"
        )

    @hookimpl
    def dynamo_worker_configure(self, ctx: Any) -> None:
        raise self._refuse()

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Any, ctx: Any) -> None:
        raise self._refuse()
