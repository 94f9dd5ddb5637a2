"""The ``dynamo-worker`` command.

``dynamo-worker [--role ROLE] [options]`` runs one role process; ``--list-roles [--json]`` lists
installed roles; ``up`` starts a whole local stack; ``demo-model PATH`` writes the tiny model.
``--help`` and ``--list-roles`` import no role, and nothing here imports vLLM or torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from dynamo_worker import __version__
from dynamo_worker.core.errors import RuntimeUnavailable, UsageError

PROG = "dynamo-worker"
DEFAULT_ROLE = "decode"

# Dynamo's role flags, accepted so existing launch scripts keep working.
ROLE_ALIASES = {
    "--is-prefill-worker": "prefill",
    "--multimodal-processor": "processor",
    "--multimodal-encode-worker": "encode",
    "--vllm-native-encoder-worker": "ec-encoder",
    "--multimodal-worker": "decode",  # the LLM worker of the multimodal chain
}

# Dynamo's newest worker selects its role with --disaggregation-mode (env DYN_VLLM_DISAGGREGATION_MODE):
# agg and decode both start its decode worker (decode = the decode half of disaggregated serving,
# which publishes no KV events, as --is-decode-worker), encode its multimodal encode worker.
DISAGGREGATION_MODES = {"agg": "decode", "prefill": "prefill", "decode": "decode", "encode": "encode"}
DISAGGREGATION_MODE_ENV = "DYN_VLLM_DISAGGREGATION_MODE"

# Dynamo's rules: the multimodal roles need --enable-multimodal, which the language-model
# (decode) worker takes too, to accept images and image embeddings.
MULTIMODAL_ROLES = ("processor", "encode", "ec-encoder")
ENABLE_MULTIMODAL_ROLES = ("decode", *MULTIMODAL_ROLES)
MULTIMODAL_FLAGS = ("--multimodal-worker",)  # selects decode, but only as a multimodal worker

DESCRIPTION = """\
Serve LLMs with vLLM as cooperating worker roles over NATS.

commands:
  dynamo-worker [--role ROLE] [options]   run one process of one role (default role: decode)
  dynamo-worker --list-roles [--json]     list installed roles
  dynamo-worker --role ROLE --help        core options plus that role's options
  dynamo-worker up [--help]               start NATS, a frontend and workers on this machine
  dynamo-worker demo-model PATH [--force] write a tiny random-weight Llama to PATH
  dynamo-worker demo-model PATH --multimodal   write a tiny random-weight Blip2 instead
"""


def _selector_parser(add_help: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("role selection")
    g.add_argument("--role", help=f"the role this process runs (default {DEFAULT_ROLE}); see --list-roles")
    for flag, role in ROLE_ALIASES.items():
        g.add_argument(flag, action="store_true", help=f"Dynamo alias for --role {role}")
    g.add_argument(
        "--disaggregation-mode",
        choices=tuple(DISAGGREGATION_MODES),
        default=None,
        help="Dynamo's role selection: agg and decode run the decode role (decode publishes no KV "
        "events, as --is-decode-worker), prefill the prefill role, encode the encode role "
        f"(env {DISAGGREGATION_MODE_ENV})",
    )
    g.add_argument(
        "--enable-multimodal",
        action="store_true",
        help="accept images: needed by the multimodal roles (processor, encode, ec-encoder) "
        "and by the decode worker that serves them (docs/multimodal.md)",
    )
    g.add_argument("--list-roles", action="store_true", help="list installed roles and exit")
    g.add_argument("--json", action="store_true", help="with --list-roles: print JSON")
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    g.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def select_role(ns: argparse.Namespace, *, check: bool = True) -> str:
    """The role named by ``--role`` or one alias flag; conflicting flags are an error naming both.

    With ``check``, Dynamo's ``--enable-multimodal`` rule is enforced too (:func:`check_multimodal`).
    """
    chosen: list[tuple[str, str]] = []
    if ns.role:
        chosen.append(("--role " + ns.role, ns.role))
    for flag, role in ROLE_ALIASES.items():
        if getattr(ns, flag.lstrip("-").replace("-", "_")):
            chosen.append((flag, role))
    # Dynamo's environment variable is for its vLLM worker: a role it cannot select ignores it.
    if ns.disaggregation_mode is not None or not ns.role or ns.role in DISAGGREGATION_MODES.values():
        mode, label = disaggregation_mode(ns)
        if mode is not None:
            _check_dynamo_mode_rules(ns, mode, label)
            chosen.append((label, DISAGGREGATION_MODES[mode]))
    roles = {role for _, role in chosen}
    if len(roles) > 1:
        flags = " and ".join(flag for flag, _ in chosen)
        raise UsageError(f"{flags} select different roles; pass only one of them")
    role = chosen[0][1] if chosen else DEFAULT_ROLE
    if check:
        multimodal_flag = next((f for f, _ in chosen if f in MULTIMODAL_FLAGS), None)
        check_multimodal(ns, role, multimodal_flag or (chosen[0][0] if chosen else f"--role {role}"))
    return role


def disaggregation_mode(ns: argparse.Namespace) -> tuple[str | None, str]:
    """Dynamo's ``--disaggregation-mode``, else its environment variable, and how it was given (for errors)."""
    mode = getattr(ns, "disaggregation_mode", None)
    if mode is not None:
        return mode, f"--disaggregation-mode {mode}"
    raw = os.environ.get(DISAGGREGATION_MODE_ENV, "").strip()
    if not raw:
        return None, ""
    if raw not in DISAGGREGATION_MODES:
        raise UsageError(
            f"--disaggregation-mode / {DISAGGREGATION_MODE_ENV} {raw!r} is invalid; "
            f"use one of {', '.join(DISAGGREGATION_MODES)}"
        )
    return raw, f"{DISAGGREGATION_MODE_ENV}={raw}"


def _check_dynamo_mode_rules(ns: argparse.Namespace, mode: str, label: str) -> None:
    """Combinations Dynamo's worker refuses with ``--disaggregation-mode`` (its legacy role flags)."""
    if ns.is_prefill_worker:
        raise UsageError(
            f"--is-prefill-worker and {label} cannot be combined (Dynamo refuses it too); "
            "use only --disaggregation-mode"
        )
    if ns.multimodal_worker and mode == "prefill":
        raise UsageError(
            f"--multimodal-worker with {label} (Dynamo's multimodal prefill worker) is not implemented here: "
            "the prefill role takes no images; use --multimodal-worker alone (an agg worker) for the chain's LLM"
        )
    if ns.multimodal_worker and mode == "decode":
        raise UsageError(
            f"--multimodal-worker and {label} cannot be combined: Dynamo's multimodal worker is agg (or prefill); "
            "for a multimodal decode worker use --disaggregation-mode decode --enable-multimodal"
        )


def check_multimodal(ns: argparse.Namespace, role: str, flag: str) -> None:
    """Dynamo's rules: a multimodal role needs ``--enable-multimodal``, which only decode shares."""
    enabled = getattr(ns, "enable_multimodal", False)
    if (role in MULTIMODAL_ROLES or flag in MULTIMODAL_FLAGS) and not enabled:
        raise UsageError(
            f"{flag} needs --enable-multimodal; add --enable-multimodal (and give it to the decode worker too)"
        )
    if enabled and role not in ENABLE_MULTIMODAL_ROLES:
        raise UsageError(
            f"--enable-multimodal does not apply to {flag}; it is for "
            f"{', '.join(ENABLE_MULTIMODAL_ROLES)}: drop it or choose one of those roles"
        )


def list_roles(as_json: bool) -> str:
    from dynamo_worker.core.roles import installed_roles

    rows = [info for infos in installed_roles().values() for info in infos]
    if as_json:
        return json.dumps([r.as_dict() for r in rows], indent=2)
    width = max((len(r.name) for r in rows), default=4)
    lines = [f"{r.name:<{width}}  {r.description}  ({r.distribution} {r.version})" for r in rows]
    return "\n".join(lines) if lines else "no roles installed"


def build_parser(hooks: Any) -> argparse.ArgumentParser:
    parser = _selector_parser(add_help=True)
    hooks.add_arguments(parser)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # Windows, or a minimal install: the default loop works, only slower
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_role(argv: Sequence[str]) -> int:
    from dynamo_worker.core.plugins import HookRelay
    from dynamo_worker.core.roles import find_role, load_role
    from dynamo_worker.core.worker import Worker

    pre, _ = _selector_parser(add_help=False).parse_known_args(argv)
    if pre.list_roles:
        print(list_roles(pre.json))
        return 0
    wants_help = any(a in ("-h", "--help") for a in argv)
    # --help describes a role; the --enable-multimodal rule is for running one.
    role_name = select_role(pre, check=not wants_help)
    aliased = pre.disaggregation_mode is not None or any(
        getattr(pre, flag.lstrip("-").replace("-", "_")) for flag in ROLE_ALIASES
    )
    if wants_help and not pre.role and not aliased:
        # Plain --help: describe the command without importing any role.
        build_parser(HookRelay(role_name, None)).print_help()
        return 0
    info = find_role(role_name)
    hooks = HookRelay(role_name, load_role(info))
    parser = build_parser(hooks)
    options, extra = parser.parse_known_args(argv)
    options.extra_args = list(extra)
    _setup_logging(options.log_level)
    return _run_loop(Worker(info, hooks, options).run())


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "up":
            from dynamo_worker.core.launcher import main as up_main

            status = up_main(argv[1:])
        elif argv and argv[0] == "demo-model":
            status = demo_model_main(argv[1:])
        else:
            status = run_role(argv)
    except (UsageError, RuntimeUnavailable) as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        status = exc.exit_code
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


def demo_model_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} demo-model",
        description="Write a tiny random-weight Llama with its tokenizer (no network). PATH may be missing, an "
        "empty directory, or a demo model this command wrote earlier (recognised by the marker file "
        "dynamo_demo_model.json, written last), which is replaced; anything else at PATH is refused "
        "unless --force.",
    )
    parser.add_argument("path", help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0, help="weights and tokenizer seed (default %(default)s)")
    parser.add_argument(
        "--multimodal",
        action="store_true",
        help="write a tiny Blip2 vision-language model instead (for the multimodal roles)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace whatever is at PATH (a file, or a directory with someone else's files: they are deleted)",
    )
    from dynamo_worker import demo_model  # cheap: its heavy imports are inside its functions

    size = parser.add_argument_group("size of the Llama (defaults: the tiny demo model)")
    size.add_argument("--layers", type=int, default=demo_model.LAYERS, help="decoder layers (default %(default)s)")
    size.add_argument(
        "--hidden",
        type=int,
        default=demo_model.HIDDEN,
        help="hidden size, a multiple of 64 (the head size); the MLP is twice as wide (default %(default)s)",
    )
    size.add_argument(
        "--max-positions", type=int, default=demo_model.MAX_POSITIONS, help="context length (default %(default)s)"
    )
    args = parser.parse_args(argv)
    default_shape = (demo_model.LAYERS, demo_model.HIDDEN, demo_model.MAX_POSITIONS)
    if args.multimodal and (args.layers, args.hidden, args.max_positions) != default_shape:
        raise UsageError("demo-model --layers, --hidden and --max-positions apply to the Llama, not --multimodal")
    if args.multimodal:
        from dynamo_worker.demo_vlm import write_demo_vlm

        print(write_demo_vlm(args.path, seed=args.seed, force=args.force))
        return 0
    print(
        demo_model.write_demo_model(
            args.path,
            seed=args.seed,
            force=args.force,
            layers=args.layers,
            hidden=args.hidden,
            max_positions=args.max_positions,
        )
    )
    return 0
