"""Structured outputs: the request fields that constrain decoding, as one ``guided_decoding``.

Clients ask for constrained output in several ways, all mapped to vLLM's
``StructuredOutputsParams`` fields (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``)
and carried to the worker once, in Dynamo's ``sampling_options.guided_decoding``:

* ``response_format`` ``{"type": "json_object"}`` / ``{"type": "json_schema", "json_schema": {...}}``
  (chat and, as vLLM takes it, completions);
* vLLM's ``structured_outputs`` object;
* the older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (vLLM 0.32
  dropped them and ignores them with a warning; we honour them: an ignored constraint yields
  unconstrained text that looks valid, which is the bug issue 19 is about).

Whether a schema, regex or grammar compiles is decided by vLLM on the worker (its backends);
the worker answers a bad one with ``bad_request`` and :func:`name_param` names the client's field.
"""

from __future__ import annotations

from typing import Any

from dynamo_worker.frontend.protocol import ApiError, ResponseFormat, bad_request

# vLLM's constraint kinds; exactly one per request.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Options of StructuredOutputsParams that go with a constraint.
OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# The marker the worker puts in its message for a constraint vLLM rejects.
WORKER_FIELD = "guided_decoding"


def guided_decoding(req: Any, response_format: ResponseFormat | None) -> tuple[dict[str, Any] | None, str | None]:
    """The ``guided_decoding`` to send and the client field it came from; (None, None) if unconstrained."""
    found: list[tuple[str, dict[str, Any]]] = []
    so = req.structured_outputs
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("structured_outputs must be an object", param="structured_outputs")
        unknown = sorted(set(so) - set(KINDS) - set(OPTIONS))
        if unknown:
            raise bad_request(
                f"structured_outputs has unknown field(s) {', '.join(unknown)}; known: {', '.join(KINDS + OPTIONS)}",
                param="structured_outputs",
            )
        spec = {k: v for k, v in so.items() if v is not None}
        if spec:
            found.append(("structured_outputs", spec))
    for legacy, kind in LEGACY.items():
        value = getattr(req, legacy)
        if value is not None:
            found.append((legacy, {kind: value}))
    if response_format is not None and response_format.type != "text":
        found.append(("response_format", _from_response_format(response_format)))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        # vLLM lets response_format override structured_outputs; two different requests for one
        # constraint are more likely a client mistake, and a silent choice would hide it.
        raise bad_request(f"use one way to constrain the output, not several ({names})", param=found[-1][0])
    param, spec = found[0]
    kinds = [k for k in KINDS if spec.get(k) is not None]
    if len(kinds) != 1:
        raise bad_request(
            f"{param} must set exactly one of {', '.join(KINDS)} (got {', '.join(kinds) or 'none'})", param=param
        )
    kind = kinds[0]
    _check(param, kind, spec[kind])
    return spec, param


def _from_response_format(rf: ResponseFormat) -> dict[str, Any]:
    if rf.type == "json_object":
        return {"json_object": True}
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise bad_request("response_format of type 'json_schema' needs json_schema.schema", param="response_format")
        return {"json": rf.json_schema.json_schema}
    raise bad_request(
        f"response_format type {rf.type!r} is not supported; use 'text', 'json_object' or 'json_schema'",
        param="response_format.type",  # vllm serve's param, without the "body." of its request validation
    )


def _check(param: str, kind: str, value: Any) -> None:
    """Shapes only; whether a schema, regex or grammar compiles is for vLLM's backends."""
    ok = {
        "json": isinstance(value, (dict, str)) and value != "",
        "regex": isinstance(value, str),
        "choice": isinstance(value, list) and bool(value) and all(isinstance(c, str) for c in value),
        "grammar": isinstance(value, str) and bool(value.strip()),
        "json_object": value is True,
        "structural_tag": isinstance(value, str) and bool(value.strip()),
    }[kind]
    if not ok:
        want = {
            "json": "a JSON schema (object or string)",
            "regex": "a string",
            "choice": "a non-empty list of strings",
            "grammar": "a non-empty grammar string",
            "json_object": "true",
            "structural_tag": "a non-empty string",
        }[kind]
        raise bad_request(f"{param} {kind} must be {want}", param=param)


def name_param(exc: ApiError, param: str | None) -> ApiError:
    """A worker's 400 about the constraint, with the client's field named as ``param``."""
    if param is not None and exc.status == 400 and exc.param is None and WORKER_FIELD in exc.message:
        exc.param = param
        exc.message = exc.message.replace(f"sampling_options.{WORKER_FIELD}", param)
    return exc
