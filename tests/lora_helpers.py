"""A tiny LoRA adapter for the demo Llama, written the way PEFT's ``save_pretrained`` writes one.

PEFT's layout: ``adapter_config.json`` plus ``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight`` (A: ``[r, in]``,
B: ``[out, r]``). PEFT itself starts B at zero (an adapter that changes nothing); here B is
random and large enough that the adapter's greedy output differs from the base model's.
Written with numpy, so the tests need neither torch in-process nor the ``peft`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_demo_lora(path: Path, model_dir: str, *, rank: int = 8, seed: int = 1, scale: float = 0.5) -> Path:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv_out = config["num_key_value_heads"] * head_dim
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in (("q_proj", hidden), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, hidden)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, rank)) * scale).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": str(model_dir),
                "r": rank,
                "lora_alpha": rank * 2,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": ["q_proj", "v_proj"],
                "fan_in_fan_out": False,
                "inference_mode": True,
                "modules_to_save": None,
                "use_rslora": False,
                "use_dora": False,
            },
            indent=2,
        )
    )
    return path


def write_adapter_files(path: Path) -> Path:
    """An adapter directory's files with placeholder contents (for the path checks, which read no
    tensor; no model needed): ``adapter_config.json`` and ``adapter_model.safetensors``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"placeholder")
    return path
