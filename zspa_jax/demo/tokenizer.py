"""Word-level tokenizer and HF `LlavaProcessor` for the demo task (built offline).

The vocabulary is every word the scene generator can produce (`scenes.vocabulary()`),
plus the specials `<pad>` (0), `<s>` (1), `</s>` (2), `<unk>` (3) and `<image>` (4).
Normalisation lower-cases; pre-tokenisation splits on whitespace and isolates `? : , .`
so "What colour is the circle?" tokenises like the training text. The post-processor
prepends `<s>` (like LLaMA's tokenizer), so processor prompts never spell it out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zspa_jax.demo import scenes

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIALS))
# CLIP's normalisation constants (what LLaVA-1.5's processor uses).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tokenizer():
    """A `transformers.PreTrainedTokenizerFast` over the task vocabulary."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in scenes.vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[?:,.]"), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=1024,
    )
    return fast


def build_processor(tokenizer=None):
    """`LlavaProcessor` that expands `<image>` into 576 placeholders and normalises like CLIP."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    size = scenes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
        resample=3,  # bicubic; a no-op at the native 96 px
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=scenes.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        image_token="<image>",
    )


def save(processor, out_dir: str | Path) -> None:
    processor.save_pretrained(str(out_dir))


class FastEncoder:
    """Host-side encoding for training and evaluation without the HF processor overhead.

    `prompt_ids(question)` equals `processor(text=chat_prompt(question), images=img).input_ids`
    (tested); pixels are normalised exactly like the CLIP processor at native size.
    """

    def __init__(self, tokenizer=None):
        tokenizer = build_tokenizer() if tokenizer is None else tokenizer
        self.vocab = tokenizer.get_vocab()
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}
        self.image_tokens = scenes.GRID * scenes.GRID
        head, tail = scenes.chat_prompt("\x00").split(scenes.IMAGE_TOKEN)
        self.head = [BOS_ID] + self.words(head)
        self.tail_template = tail  # " \x00 assistant :"

    def words(self, text: str) -> list[int]:
        """Token ids of generator text (already lower-case, punctuation spaced): a plain
        word lookup, identical to the tokenizer on such text and much faster."""
        cached = self._cache.get(text)
        if cached is None:
            cached = [self.vocab.get(w, UNK_ID) for w in text.split()]
            if len(self._cache) < 100_000:
                self._cache[text] = cached
        return list(cached)

    def prefix_ids(self) -> list[int]:
        """`<s>` + system line + `user :` + 576 image placeholders."""
        return self.head + [IMAGE_ID] * self.image_tokens

    def question_ids(self, question: str) -> list[int]:
        """The text after the image: question + `assistant :`."""
        return self.words(self.tail_template.replace("\x00", question))

    def prompt_ids(self, question: str) -> list[int]:
        return self.prefix_ids() + self.question_ids(question)

    @staticmethod
    def pixels(image) -> np.ndarray:
        x = np.asarray(image.convert("RGB"), np.float32) / 255.0
        x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # CHW
