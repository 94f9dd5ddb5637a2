"""Role discovery: the entry-point group ``dynamo_worker.roles``, for built-in and third-party roles.

Only the selected role is imported. Listing roles reads entry-point metadata and each role
class's docstring from its source file (with :mod:`ast`), so ``--list-roles`` imports no role.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import attrs

from dynamo_worker.core.errors import RoleError

ROLE_GROUP = "dynamo_worker.roles"


@attrs.frozen
class RoleInfo:
    """One installed role, as its distribution declares it."""

    name: str
    value: str  # "module:Class"
    distribution: str
    version: str

    @property
    def description(self) -> str:
        return _read_description(self.value)

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "description": self.description,
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.value,
        }


def _info(ep: EntryPoint) -> RoleInfo:
    dist = ep.dist
    return RoleInfo(
        name=ep.name,
        value=ep.value,
        distribution=dist.name if dist is not None else "?",
        version=dist.version if dist is not None else "?",
    )


def installed_roles() -> dict[str, list[RoleInfo]]:
    """Every role name with the distributions that declare it (more than one is a conflict)."""
    found: dict[str, list[RoleInfo]] = {}
    for ep in entry_points(group=ROLE_GROUP):
        info = _info(ep)
        claims = found.setdefault(info.name, [])
        # The same distribution seen twice on sys.path (an editable install plus a build dir)
        # is one claim, not a conflict.
        if not any(c.distribution == info.distribution and c.value == info.value for c in claims):
            claims.append(info)
    return dict(sorted(found.items()))


def _describe(infos: list[RoleInfo]) -> str:
    return ", ".join(f"{i.name} ({i.distribution} {i.version})" for i in infos)


def find_role(name: str) -> RoleInfo:
    """The one installed role called ``name``; a :class:`RoleError` listing what exists otherwise."""
    roles = installed_roles()
    claims = roles.get(name)
    if not claims:
        available = _describe([infos[0] for infos in roles.values()]) or "none"
        raise RoleError(f"unknown role {name!r}; installed roles: {available}")
    if len(claims) > 1:
        owners = "; ".join(f"{c.distribution} {c.version} ({c.value})" for c in claims)
        raise RoleError(f"role {name!r} is declared by more than one distribution: {owners}; uninstall all but one")
    return claims[0]


def load_role(info: RoleInfo) -> Any:
    """Import the role's class and return an instance of it.

    An import error names the role, the entry point and the distribution, chained to the cause.
    """
    module_name, _, attr = info.value.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # any import-time failure of third-party code: name its owner
        raise RoleError(
            f"role {info.name!r} failed to import: entry point {info.value!r} from "
            f"{info.distribution} {info.version}: {type(exc).__name__}: {exc}"
        ) from exc
    role = obj() if isinstance(obj, type) else obj
    declared = getattr(role, "name", None)
    if declared != info.name:
        raise RoleError(
            f"role {info.name!r} ({info.value} from {info.distribution}) has name={declared!r}; "
            f"set the class attribute name = {info.name!r} to match its entry point"
        )
    return role


def _read_description(value: str) -> str:
    """First line of the role class's docstring, read from source without importing the role."""
    module_name, _, attr = value.partition(":")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""
    class_name = attr.split(".")[-1]
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            doc = ast.get_docstring(node) or ""
            return doc.strip().splitlines()[0] if doc.strip() else ""
    return ""
