"""A tiny random-weight Blip2 vision-language model, built locally, for the multimodal roles.

Blip2 is the vision-language model that works with CPU torch here (docs/multimodal.md, "CPU
limits"): vLLM serves it from pixels *and* from image embeddings, and its EC connector works
with it. :func:`write_demo_vlm` builds one in a few seconds, with no network:

* the text demo model's tokenizer (:mod:`dynamo_worker.demo_model`) plus an ``<image>`` token
  (vLLM's Blip2 looks it up to insert the image's query tokens) and a chat template that takes
  OpenAI content parts (text parts are rendered; image parts render nothing, because Blip2
  puts its image tokens at the start of the prompt itself);
* a Blip2 with a 1-layer vision tower (32x32 pixels, 16 patches), a 1-layer Q-Former with 4
  query tokens, and a 2-layer OPT text model of width 128 (head size 64, which vLLM's CPU
  attention needs); image embeddings are ``[num_images, 4, 128]``;
* a ``Blip2Processor`` (PIL image processor, no torchvision needed) with ``num_query_tokens=4``.

As for the text model, weights are drawn with a large init scale so greedy output depends on
the prompt *and* on the image; tests comparing outputs would prove nothing otherwise.
"""

from __future__ import annotations

import os
import pathlib

from dynamo_worker.demo_model import (
    EOS_TOKEN,
    MAX_POSITIONS,
    TORCH_DTYPE,
    _build_tokenizer,
    _save_quietly,
    write_model_dir,
)

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4
TEXT_HIDDEN = 128
# Large, as for the text model: with small weights the image barely moves the logits and two
# different images give the same greedy answer.
INITIALIZER_RANGE = 0.5

# The text model's role-tagged template, taking content as a string or as OpenAI parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _build(seed: int):  # -> (model, processor)
    import torch
    from transformers import (
        AddedToken,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = _build_tokenizer(seed)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        word_embed_proj_dim=TEXT_HIDDEN,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        init_std=INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "initializer_range": INITIALIZER_RANGE,
        },
        qformer_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "encoder_hidden_size": 64,
            "initializer_range": INITIALIZER_RANGE,
        },
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
        initializer_range=INITIALIZER_RANGE,
    )
    config.dtype = TORCH_DTYPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        # Blip2 initialises its query tokens to zeros-like small values; random ones make each
        # query token see the image differently.
        torch.nn.init.normal_(model.query_tokens, std=1.0)
    model = model.to(getattr(torch, TORCH_DTYPE)).eval()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_query_tokens=NUM_QUERY_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def write_demo_vlm(path: str | os.PathLike[str], *, seed: int = 0, force: bool = False) -> pathlib.Path:
    """Write the tiny Blip2 (model, tokenizer, processor) to ``path``; deterministic per ``seed``.

    Built in a temporary directory beside ``path`` and renamed into place, like
    :func:`dynamo_worker.demo_model.write_demo_model`, with the same rule for what may be at
    ``path`` (missing, empty, or a demo model of ours; anything with ``force``). Returns the
    absolute path.
    """

    def save(tmp: pathlib.Path) -> dict[str, object]:
        model, processor = _build(seed)
        _save_quietly(model, processor, tmp)
        return {
            "kind": "blip2",
            "seed": seed,
            "torch_dtype": TORCH_DTYPE,
            "image_embeds_shape": [NUM_QUERY_TOKENS, TEXT_HIDDEN],
        }

    return write_model_dir(path, save, force=force)
