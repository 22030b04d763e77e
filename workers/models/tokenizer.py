"""A small byte-level BPE tokenizer trained locally for the built-in presets.

No machine here reaches a model hub, so presets ship their own tokenizer: a
byte-level BPE trained on a built-in English text (any UTF-8 input encodes),
with the family's special tokens and a chat template, saved in Hugging Face
format so it loads exactly like a real model's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe the image in detail. What is shown in this photo? How many objects are there?
The cat sat on the mat while the dog slept near the door. Red, green, blue, yellow, white, black.
Encode, prefill and decode run on separate workers so each stage can be batched and scaled.
Multimodal models read text and images; the vision tower turns pixels into tokens for the language model.
Hello, world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions? Answers! Lists: one, two, three.
The weather today is sunny with a light breeze; tomorrow it may rain in the afternoon.
Kubernetes schedules pods onto nodes; an operator reconciles custom resources into deployments.
A large language model predicts the next token given the previous tokens and the image features.
Please summarise the following text in one sentence and explain your reasoning step by step.
"""


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens and chat template of one model family."""

    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str
    chat_template: str
    vocab_size: int = 1024


def build_tokenizer(spec: TokenizerSpec, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train the BPE on the built-in corpus and save it (HF format) into `out_dir`."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        additional_special_tokens=[t for t in spec.special_tokens if t not in (spec.bos_token, spec.eos_token, spec.pad_token)],
    )
    tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# Templates take content as a string or as a list of {"type": "text"|"image"} parts.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string else message['content'] | map(attribute='text') | join('') }}{{ '\\n' }}"
    "{% else %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

LLAVA_TOKENS = TokenizerSpec(
    special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    chat_template=LLAVA_CHAT_TEMPLATE,
)

QWEN_TOKENS = TokenizerSpec(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"),
    bos_token=None,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    chat_template=QWEN_CHAT_TEMPLATE,
)
