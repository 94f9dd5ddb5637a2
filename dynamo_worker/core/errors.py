"""Exceptions that carry a user-facing, one-line message."""

from __future__ import annotations


class UsageError(Exception):
    """A user mistake (bad flag, missing file, unknown role).

    The CLI prints ``dynamo-worker: error: <message>`` and exits 2, with no traceback
    unless ``--debug`` is given. The message says what is wrong and how to fix it.
    """

    exit_code = 2


class RoleError(UsageError):
    """A role could not be found, loaded or validated."""


class RuntimeUnavailable(Exception):
    """The NATS server could not be reached (exit 1, one line naming the URL)."""

    exit_code = 1


class EngineDead(Exception):
    """The role's engine is dead; the worker withdraws, shuts down and exits 1.

    Roles translate their engine's own error (vLLM's ``EngineDeadError``) into this, so the
    core needs no engine import.
    """
