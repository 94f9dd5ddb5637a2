"""A tiny random-weight Llama model, built locally, for tests and demos.

There is no model hub on the machines this project runs on, so tests need a model
that can be produced offline. :func:`write_demo_model` builds one in a few seconds:

* a byte-level BPE tokenizer (vocabulary 512) trained on English-like text that is
  generated deterministically from the seed, wrapped in
  :class:`transformers.PreTrainedTokenizerFast` with BOS/EOS/PAD tokens and a simple
  role-tagged chat template;
* a 2-layer :class:`transformers.LlamaForCausalLM` (hidden 128, head size 64) with
  random weights, saved in float32. ``layers``, ``hidden`` and ``max_positions`` build a
  larger one (benchmarks that need prefill to cost something); the defaults write the same
  bytes as before the options existed.

The weights are random but drawn with a large ``initializer_range`` (0.5) so that
greedy output depends strongly on the prompt and does not settle into one repeated
token; with the default 0.02 continuations degenerate into such runs, and tests that
compare outputs would prove little.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions
that need them so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import tempfile
from collections.abc import Callable

from dynamo_worker.core.errors import UsageError

__all__ = [
    "DEMO_MODEL_VERSION",
    "default_demo_model_dir",
    "ensure_demo_model",
    "write_demo_model",
]

#: Bump when the recipe changes so that cached models are rebuilt by
#: :func:`ensure_demo_model`.
DEMO_MODEL_VERSION = 2  # 2: the chat template renders tools and tool calls

#: Written last into a finished model directory; records how it was built. Its presence is how
#: a directory is recognised as a completed demo model of ours (one we may replace).
_MARKER = "dynamo_demo_model.json"

# Files a loadable model directory must contain (besides the marker).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

VOCAB_SIZE = 512
MAX_POSITIONS = 512
LAYERS = 2
HIDDEN = 128
HEAD_SIZE = 64  # vLLM's CPU attention needs it
# A large init scale makes the random network's logits vary strongly with the input;
# 0.5 was checked to give prompt-dependent, non-repeating greedy continuations.
INITIALIZER_RANGE = 0.5
# float32 on disk: vLLM's greedy output then equals Hugging Face's token for token,
# which equality tests rely on. On this tiny model bfloat16 was not reliably faster in
# vLLM on CPU (offline 64x64 tokens: 8.8k-12.3k tok/s float32, 8.6k-14.9k bfloat16,
# within the run-to-run noise) and its greedy output diverged on 4 of 6 prompts.
# A float32 checkpoint can still be served as bfloat16 (vLLM dtype="bfloat16").
TORCH_DTYPE = "float32"

# Role-tagged turns, each closed by EOS so that a trained model would stop after its
# turn; BOS is emitted by the template because chat prompts are tokenized without
# special tokens. Tools (``tools=`` of apply_chat_template, as vLLM passes them) are listed
# as JSON in a ``<|tools|>`` turn, an assistant's earlier calls as JSON after its content, and
# tool results are ``<|tool|>`` turns; a request without tools renders exactly as before.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|tools|>\\n' + (tools | tojson) + eos_token + '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') }}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ message['tool_calls'] | tojson }}{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_DETERMINERS = ["the", "a", "this", "that", "every", "some", "one", "my", "our", "their"]
_ADJECTIVES = [
    "small",
    "large",
    "quick",
    "quiet",
    "bright",
    "dark",
    "old",
    "new",
    "green",
    "red",
    "blue",
    "happy",
    "tired",
    "clever",
    "strange",
    "gentle",
    "heavy",
    "light",
    "warm",
    "cold",
    "early",
    "late",
    "simple",
    "careful",
    "busy",
    "empty",
    "full",
    "round",
]
_NOUNS = [
    "cat",
    "dog",
    "bird",
    "river",
    "mountain",
    "city",
    "house",
    "garden",
    "teacher",
    "student",
    "machine",
    "engine",
    "server",
    "model",
    "token",
    "request",
    "worker",
    "window",
    "road",
    "tree",
    "book",
    "letter",
    "friend",
    "child",
    "market",
    "ship",
    "island",
    "forest",
    "question",
    "answer",
    "story",
    "song",
    "morning",
    "evening",
    "winter",
    "summer",
    "computer",
    "network",
    "message",
    "system",
    "user",
    "assistant",
]
_VERBS = [  # base forms; see _third_person
    "see",
    "find",
    "build",
    "read",
    "write",
    "send",
    "open",
    "close",
    "move",
    "carry",
    "follow",
    "answer",
    "ask",
    "like",
    "help",
    "watch",
    "hold",
    "visit",
    "remember",
    "start",
    "stop",
    "serve",
    "count",
    "paint",
    "make",
    "fix",
    "wash",
    "try",
]
_ADVERBS = [
    "slowly",
    "quickly",
    "quietly",
    "often",
    "never",
    "always",
    "today",
    "again",
    "carefully",
    "gladly",
    "soon",
    "later",
    "almost",
    "still",
    "together",
]
_PREPOSITIONS = ["in", "on", "near", "under", "over", "with", "behind", "across", "into", "from"]
_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]


def _third_person(verb: str) -> str:
    """``"watch"`` -> ``"watches"``, ``"carry"`` -> ``"carries"``, ``"see"`` -> ``"sees"``."""
    if verb.endswith(("s", "sh", "ch", "x")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.6:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    """One English-like sentence built from a few templates."""
    kind = rng.random()
    subject = rng.choice(_NAMES) if rng.random() < 0.3 else _noun_phrase(rng)
    if kind < 0.5:
        text = f"{subject} {_third_person(rng.choice(_VERBS))} {_noun_phrase(rng)}"
        if rng.random() < 0.5:
            text += f" {rng.choice(_PREPOSITIONS)} {_noun_phrase(rng)}"
        if rng.random() < 0.3:
            text += f" {rng.choice(_ADVERBS)}"
        end = "."
    elif kind < 0.7:
        text = f"does {subject} {rng.choice(_VERBS)} {_noun_phrase(rng)}"
        end = "?"
    elif kind < 0.85:
        verb = _third_person(rng.choice(_VERBS))
        count = rng.randint(0, 999)  # digits, so numbers get tokens too
        text = f"{subject} {verb} {count} {rng.choice(_NOUNS)}s"
        end = "."
    else:
        text = (
            f"{subject} {_third_person(rng.choice(_VERBS))} {_noun_phrase(rng)}, "
            f"and {_noun_phrase(rng)} {_third_person(rng.choice(_VERBS))} {_noun_phrase(rng)}"
        )
        end = "!" if rng.random() < 0.3 else "."
    return text[0].upper() + text[1:] + end


def _training_text(seed: int, num_lines: int = 4000) -> list[str]:
    """Deterministic English-like corpus (a list of short paragraphs)."""
    # A private Random instance: reproducible and leaves the global RNG alone.
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(num_lines)]


def _build_tokenizer(seed: int, max_positions: int = MAX_POSITIONS):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]  # ids 0, 1, 2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        # All 256 bytes up front, so any text (any language, emoji) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(seed), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        # The corpus is rich enough to reach the size; if not, the model's embedding
        # table would not match the tokenizer.
        raise RuntimeError(f"tokenizer vocabulary is {tok.get_vocab_size()}, expected {VOCAB_SIZE}")
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Prepend BOS to plain prompts like Llama tokenizers do (chat prompts get it from
    # the template and are encoded without special tokens).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
    )


def _build_model(
    tokenizer, seed: int, layers: int = LAYERS, hidden: int = HIDDEN, max_positions: int = MAX_POSITIONS
):  # -> transformers.LlamaForCausalLM
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_SIZE,  # head size 64: vLLM's CPU attention needs it
        num_key_value_heads=1,  # grouped-query attention, like real Llamas
        max_position_embeddings=max_positions,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=TORCH_DTYPE,  # saved as config.json "dtype" ("torch_dtype" before transformers 5)
    )
    # fork_rng: seed the weights without disturbing the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, TORCH_DTYPE)).eval()


def _save_quietly(model, tokenizer, target: pathlib.Path) -> None:
    """``save_pretrained`` both, without transformers' progress bar on stderr."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    finally:
        if enabled:  # the switch is process-global: restore the caller's setting
            hf_logging.enable_progress_bar()


def _is_complete(path: pathlib.Path) -> bool:
    """True if ``path`` holds a finished demo model of the current recipe version."""
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == DEMO_MODEL_VERSION and all((path / name).is_file() for name in _REQUIRED_FILES)


def _relax_permissions(tmp: pathlib.Path) -> None:
    """Give ``tmp`` and its files the modes a plain mkdir/open would (umask applied).

    mkdtemp creates 0700 and some writers 0600 files; the model should be as readable
    as any other directory the user creates.
    """
    umask = os.umask(0)
    os.umask(umask)  # os.umask is the only way to read it
    os.chmod(tmp, 0o777 & ~umask)
    for child in tmp.iterdir():
        os.chmod(child, 0o666 & ~umask)


def _is_ours(path: pathlib.Path) -> bool:
    """True if ``path`` is a completed demo model written by us (any recipe version or kind)."""
    marker = path / _MARKER
    try:
        return (
            not path.is_symlink()
            and path.is_dir()
            and not marker.is_symlink()
            and isinstance(json.loads(marker.read_text()), dict)
        )
    except (OSError, ValueError):
        return False


def check_target(path: pathlib.Path) -> None:
    """Refuse (:class:`UsageError`) a ``path`` whose content we did not write.

    Writable: a missing path, an empty directory, or a completed demo model of ours (its marker
    file, written last). Anything else is the user's and is never replaced without ``--force``.
    """
    if not os.path.lexists(path):
        return
    fix = "pick a new or empty directory, or pass --force to replace it"
    if path.is_symlink():
        raise UsageError(f"demo-model {path}: is a symbolic link; {fix}")
    if not path.is_dir():
        raise UsageError(f"demo-model {path}: is a file, not a directory; {fix}")
    if any(path.iterdir()) and not _is_ours(path):
        raise UsageError(
            f"demo-model {path}: the directory is not empty and holds no demo model written by "
            f"dynamo-worker (no {_MARKER}); {fix}"
        )


def _install_dir(tmp: pathlib.Path, path: pathlib.Path, force: bool) -> None:
    """Move the finished ``tmp`` directory to ``path``, replacing a model of ours (anything
    with ``force``) that is there."""
    try:
        # Atomic when ``path`` is missing or an empty directory.
        os.rename(tmp, path)
        return
    except OSError:
        if not os.path.lexists(path):
            raise
    if not force:
        check_target(path)  # again: something may have appeared there while we built
    # ``path`` is in the way: move it aside first. A crash between the two renames
    # leaves no model at ``path`` (never a half one); the old one sits in ``trash``.
    trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, trash / path.name)
    os.rename(tmp, path)
    shutil.rmtree(trash, ignore_errors=True)


def check_size(layers: int, hidden: int, max_positions: int) -> None:
    """Refuse (:class:`UsageError`) a model shape vLLM's CPU backend cannot serve."""
    if layers < 1:
        raise UsageError(f"demo-model --layers must be at least 1 (got {layers})")
    if hidden < HEAD_SIZE or hidden % HEAD_SIZE:
        raise UsageError(f"demo-model --hidden must be a multiple of {HEAD_SIZE} (the head size; got {hidden})")
    if max_positions < 16:
        raise UsageError(f"demo-model --max-positions must be at least 16 (got {max_positions})")


def write_demo_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    force: bool = False,
    layers: int = LAYERS,
    hidden: int = HIDDEN,
    max_positions: int = MAX_POSITIONS,
) -> pathlib.Path:
    """Write the tiny demo Llama model and its tokenizer to ``path``.

    Needs no network. The result is deterministic for a given ``seed`` (same corpus,
    same tokenizer, same weights). The model is built in a temporary directory beside
    ``path`` and renamed into place, so a crash never leaves a half-written model at
    ``path``.

    Args:
        path: Target directory: missing, empty, or a demo model written earlier (replaced).
            Anything else raises :class:`UsageError` unless ``force``.
        seed: Seed for the training corpus and the random weights.
        force: Replace whatever is at ``path``.
        layers, hidden, max_positions: The model's depth, width (a multiple of 64; the MLP is
            twice as wide) and context length; recorded in the marker when not the defaults.

    Returns:
        The absolute path of the model directory, loadable with
        ``vllm.LLM(model=...)`` or ``transformers.AutoModelForCausalLM.from_pretrained``.
    """
    check_size(layers, hidden, max_positions)
    shape = {"layers": layers, "hidden": hidden, "max_positions": max_positions}
    # Only a non-default shape is recorded: the default model's files stay what they always were.
    extra = {} if shape == {"layers": LAYERS, "hidden": HIDDEN, "max_positions": MAX_POSITIONS} else shape

    def save(tmp: pathlib.Path) -> dict[str, object]:
        tokenizer = _build_tokenizer(seed, max_positions)
        _save_quietly(_build_model(tokenizer, seed, layers, hidden, max_positions), tokenizer, tmp)
        return {"version": DEMO_MODEL_VERSION, "seed": seed, "torch_dtype": TORCH_DTYPE, **extra}

    return write_model_dir(path, save, force=force)


def write_model_dir(
    path: str | os.PathLike[str], save: Callable[[pathlib.Path], dict[str, object]], *, force: bool = False
) -> pathlib.Path:
    """Build a model directory with ``save(tmp)`` beside ``path``, then rename it into place.

    ``save`` writes the files and returns the marker's content, written last: its presence
    means every other file is complete. A crash never leaves a half-written model at ``path``.
    Without ``force``, a ``path`` that is not missing, empty or a model of ours is refused
    (:func:`check_target`) before anything is built.
    """
    path = pathlib.Path(path).expanduser().absolute()
    if not force:
        check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as ``path``, so the final rename is atomic.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        marker = save(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _relax_permissions(tmp)
        _install_dir(tmp, path, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def default_demo_model_dir() -> pathlib.Path:
    """Where :func:`ensure_demo_model` keeps the model.

    ``$XDG_CACHE_HOME/dynamo-worker/demo-model``, or ``~/.cache/dynamo-worker/demo-model``
    when ``XDG_CACHE_HOME`` is unset or empty.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache).absolute() / "dynamo-worker" / "demo-model"


def ensure_demo_model() -> pathlib.Path:
    """Return :func:`default_demo_model_dir`, writing the model there first if needed.

    The model (seed 0) is written only when no completed model of the current recipe
    version is present. A file lock beside the directory makes concurrent callers
    (e.g. parallel test workers) build it once instead of replacing each other's copy.
    """
    import fcntl  # POSIX only, like vLLM on CPU

    path = default_demo_model_dir()
    if _is_complete(path):
        return path
    try:
        check_target(path)
    except UsageError:
        raise UsageError(
            f"the demo model's cache directory {path} holds files that are not a demo model; "
            "move them away (or set XDG_CACHE_HOME to another directory)"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_complete(path):  # another process may have built it meanwhile
                # Leftovers of a writer that was killed (SIGKILL skips its clean-up);
                # safe to delete while we hold the lock.
                for kind in ("tmp", "old"):
                    for stale in path.parent.glob(f".{path.name}.{kind}-*"):
                        shutil.rmtree(stale, ignore_errors=True)
                write_demo_model(path, seed=0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
