"""The ceiling: the offline engine (``vllm.LLM``) on the same prompts, without HTTP or NATS.

Run in a child process (``python -m benchmarks.offline SPEC OUT``) with the same environment as
the servers, so its engine processes die with it and leave the next side a clean machine. For
each concurrency level C the level's prompts go through ``LLM.generate`` in batches of C: every
request has the same length (32 in, 32 out, ``ignore_eos``), so a batch of C is what a server
holding C requests in flight could at best do. One extra level, ``0``, sends every prompt in one
call (the engine's own batch limit applies): the machine's ceiling on this work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.config import ENGINE_FLAGS, python, side_env

ALL_AT_ONCE = 0  # the concurrency label of the one-call level


def run_offline(
    model: str,
    prompts: list[list[int]],
    levels: list[tuple[int, int]],
    repeats: int,
    max_tokens: int,
    work_root: Path,
    timeout: float,
    log: Any,
) -> dict[str, Any]:
    """Start the child, wait (bounded by ``timeout``), return its JSON result.

    ``levels``: ``(concurrency, requests)`` pairs; the result has one sample per level per repeat.
    """
    tmpdir = tempfile.mkdtemp(prefix="bench-offline-tmp-")
    run_dir = Path(tempfile.mkdtemp(prefix="offline-", dir=work_root))
    spec_path, out_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "offline.log"
    spec_path.write_text(
        json.dumps(
            {
                "model": model,
                "prompts": prompts,
                "levels": levels,
                "repeats": repeats,
                "max_tokens": max_tokens,
                "engine_flags": list(ENGINE_FLAGS),
            }
        )
    )
    started = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [python(), "-m", "benchmarks.offline", str(spec_path), str(out_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=side_env(tmpdir),
            start_new_session=True,
        )
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"  offline run exceeded {timeout:.0f}s: killing it")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its engine processes too
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
    if not out_path.exists():
        raise RuntimeError(f"the offline run failed (status {proc.returncode}); see {log_path}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    result["total_s"] = round(time.monotonic() - started, 1)
    result["log"] = str(log_path)
    return result


def _engine(model: str, flags: list[str]) -> Any:
    """``vllm.LLM`` built from the same command-line flags the servers get (vLLM's parser)."""
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    return LLM.from_engine_args(EngineArgs.from_cli_args(parser.parse_args(["--model", model, *flags])))


def _child(spec_path: str, out_path: str) -> None:
    from vllm import SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.monotonic()
    llm = _engine(spec["model"], spec["engine_flags"])
    ready = time.monotonic() - t0
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    llm.generate(prompts[:16], params, use_tqdm=False)  # warm-up
    samples = []
    for repeat in range(spec["repeats"]):
        for concurrency, requests in spec["levels"]:
            work = [prompts[i % len(prompts)] for i in range(requests)]
            batch = len(work) if concurrency == ALL_AT_ONCE else concurrency
            tokens = 0
            start = time.monotonic()
            for i in range(0, len(work), batch):
                for out in llm.generate(work[i : i + batch], params, use_tqdm=False):
                    tokens += len(out.outputs[0].token_ids)
            wall = time.monotonic() - start
            samples.append(
                {
                    "concurrency": concurrency,
                    "repeat": repeat,
                    "requests": len(work),
                    "output_tokens": tokens,
                    "wall_s": wall,
                }
            )
            print(f"offline c={concurrency}: {tokens / wall:.0f} tok/s", flush=True)
    Path(out_path).write_text(json.dumps({"ready_s": round(ready, 1), "samples": samples}))


if __name__ == "__mp_main__":  # a vLLM engine process spawned by the child: die with it
    from dynamo_worker.core.child_processes import die_with_parent

    die_with_parent()

if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
