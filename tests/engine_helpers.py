"""Helpers for tests that run the real vLLM engine on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# Small and fast on a 2-core CPU machine; every engine in the tests uses the same settings.
ENGINE_FLAGS = ["--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "16"]
MAX_MODEL_LEN = 256


def _run_offline(script_text: str, name: str, args: list[str], tmp: Path) -> Any:
    """Run one of this module's offline-engine scripts in a subprocess; what it printed after ``@@``."""
    script = tmp / name
    script.write_text(script_text)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    line = next((line for line in out.stdout.splitlines() if line.startswith("@@")), None)
    assert line, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(line[2:])


OFFLINE_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    model, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, enforce_eager=True, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("@@" + json.dumps([{"ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text}
                             for o in outs]))
"""


def offline_greedy_outputs(model: str, prompts: list[list[int]], max_tokens: int, tmp: Path) -> list[dict]:
    """vLLM's offline engine (``vllm.LLM``) greedy output for token-id prompts, in a subprocess:
    per prompt ``{"ids": [...], "text": "..."}``, the text as vLLM's own detokenizer made it
    (which drops a character the output stops inside, where ``tokenizer.decode`` gives U+FFFD)."""
    return _run_offline(OFFLINE_SCRIPT, "offline.py", [model, json.dumps(prompts), str(max_tokens)], tmp)


OFFLINE_SAMPLING_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    model, requests = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, enforce_eager=True, max_model_len=256)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"]) for r in requests],
                        [SamplingParams(**r["params"]) for r in requests])
    print("@@" + json.dumps([{
        "choices": [{"ids": list(c.token_ids), "text": c.text} for c in o.outputs],
        "prompt_logprobs": None if o.prompt_logprobs is None else [
            None if p is None else {str(t): [lp.logprob, lp.rank] for t, lp in p.items()}
            for p in o.prompt_logprobs],
    } for o in outs]))
"""


def offline_outputs(model: str, requests: list[dict], tmp: Path) -> list[dict]:
    """vLLM's offline engine's answer to ``[{"prompt": token ids, "params": SamplingParams kwargs}]``,
    in a subprocess: per request ``{"choices": [{"ids", "text"}], "prompt_logprobs": [None |
    {"<token id>": [logprob, rank]}] | None}``."""
    return _run_offline(OFFLINE_SAMPLING_SCRIPT, "offline_sampling.py", [model, json.dumps(requests)], tmp)


def offline_greedy(model: str, prompts: list[list[int]], max_tokens: int, tmp: Path) -> list[list[int]]:
    """The token ids of :func:`offline_greedy_outputs`."""
    return [out["ids"] for out in offline_greedy_outputs(model, prompts, max_tokens, tmp)]


OFFLINE_IMAGES_SCRIPT = r"""
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    model, prompt, images, max_tokens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=model, enforce_eager=True, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": prompt, "multi_modal_data": {"image": Image.open(p).convert("RGB")}}
               for p in images]
    outs = llm.generate(prompts, params)
    print("@@" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def offline_greedy_images(
    model: str, prompt: list[int], images: list[str], max_tokens: int, tmp: Path
) -> list[list[int]]:
    """vLLM's offline greedy output for one token-id prompt with each image given as pixels."""
    args = [model, json.dumps(prompt), json.dumps(images), str(max_tokens)]
    return _run_offline(OFFLINE_IMAGES_SCRIPT, "offline_images.py", args, tmp)
