"""The tiny byte-level BPE tokenizer and LLaVA processor the tiny LLaVA models use."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

IMAGE_TOKEN = "<image>"
_TOKENIZER_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A small cat is sitting on a red mat.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
    "Describe the picture in detail. There are two people walking along a sandy beach.",
    "How many birds are on the wire? Three birds, one of them is looking at the camera.",
    "A photo of a kitchen with a wooden table, white chairs and a bowl of green apples.",
]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@functools.cache
def _tiny_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE trained in-process (deterministic); serialized so callers get fresh copies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 300):
    """PreTrainedTokenizerFast with BOS `<s>`, EOS `</s>`, pad `<pad>` (left padding) and
    `<image>` appended as the last id (= vocab_size), like llava-hf's id 32000."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def save_tiny_processor(
    directory,
    image_size: int,
    patch_size: int,
    vision_feature_select_strategy: str = "default",
    tokenizer=None,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
):
    """Write a LlavaProcessor (tiny BPE tokenizer + PIL CLIPImageProcessor) to `directory`.

    Returns the processor as reloaded by `AutoProcessor.from_pretrained(directory)` (proves
    the files round-trip). Its `image_token_id` is what the model config must use.
    """
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer() if tokenizer is None else tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS
            chat_template=chat_template,
            image_token=IMAGE_TOKEN,
        )
        processor.save_pretrained(directory)
        return AutoProcessor.from_pretrained(directory)
