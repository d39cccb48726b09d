"""The prepared GPU check: parity against a carried CPU reference, then absolute timings.

    python benchmarks/gpu.py                     # on a CUDA GPU -> benchmarks/results/gpu.md (< 8 min)
    python benchmarks/gpu.py --cpu               # smoke run on the CPU -> benchmarks/results/gpu_cpu_smoke.md
    python benchmarks/gpu.py --cpu --out X.md    # ... written to X.md instead
    python benchmarks/gpu.py --write-reference   # (on a CPU) rewrite benchmarks/gpu_reference.npz

1. Parity. Two small random checkpoints, LLaVA (CLIP tower + LLaMA decoder, 64 visual
   tokens) and Qwen2.5-VL (windowed tower + M-RoPE decoder, two images of 64 and 48
   merged tokens), are written as Hugging Face directories (transformers' configs and
   parameter names; uniform weights from NumPy's legacy `RandomState`, whose stream NumPy
   keeps fixed, seeded per tensor name) and converted with the real converters
   (`convert.llava`, `convert.qwen2_5_vl`). So the same bytes come out on any machine; a
   SHA-256 of the loaded float32 parameters and of the inputs is carried in the reference
   and checked first. For float32 and bfloat16 (`zspa_jax.load(path, dtype=...)`) the
   script runs `zspa_jax.forward` unpruned and pruned (zspaprune, keep=8) and greedy
   `zspa_jax.generate_tokens` (pruned, 12 tokens, EOS off) on B = 2 left-padded rows, and
   compares with `benchmarks/gpu_reference.npz`, written by `--write-reference` (this
   script on a CPU, every model built twice to prove the build deterministic):
     float32, under jax_default_matmul_precision="highest": logits at the last 8 real
       positions of each row within F32_LOGIT_BOUND x max|reference logit| (1e-4 on an
       accelerator, 1e-5 on a CPU); kept indices and greedy tokens equal.
     bfloat16, against the CPU's bfloat16 run: greedy-token agreement, kept-index overlap
       and logit differences are reported; asserted are only finite logits and, unpruned,
       a sanity bound (<= BF16_LOGIT_SANITY x max|reference logit|: catches a broken
       path, nothing finer). Pruned bf16 logits are not bounded: bf16 scores can break a
       near-tie the other way, and other kept tokens change the logits by O(1).
2. Timings (bfloat16, default matmul precision; medians of --repeats calls after one
   warm-up call, each ended by `block_until_ready`): `zspa_jax.select_tokens` (zspaprune)
   at B=8, N=576, D=4096, K=64 (T=32 prompt tokens, f32 inputs); `zspa_jax.generate` on
   a LLaVA-1.5-7B-shaped checkpoint (the CLIP ViT-L/14-336 tower, 576 visual tokens;
   LLaMA-2-7B widths with --llm-layers of its 32 decoder layers; random weights, converted
   with convert.llava to bfloat16), B = 1, at keep 64 and 576 (unpruned): prefill (tower
   + pruning + LLM prefill, one program) and decode tokens/s from its stats, the first
   call (compile) separately, and peak device memory (`jax.devices()[0].memory_stats()`,
   "n/a" where the backend has none).
3. Writes a markdown report (device, versions, parity table, timings); exits 1 when a
   parity check fails, naming it on stderr.

`--cpu` forces JAX's CPU platform (JAX_PLATFORMS=cpu, set before jax is imported) and
LLVM optimisation level 0 (the run compiles ~20 small programs and runs each a few times),
uses the smallest shapes (the parity LLaVA, N = 64 and keep 8, for the generate timings;
select_tokens at B=2, N=64, D=64, K=8) and one repeat, runs every parity check, and
writes to --out (default benchmarks/results/gpu_cpu_smoke.md), never to the GPU results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Keep the repo's `models` package importable when this runs as a script (benchmarks/models.py
# would otherwise shadow it).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

if __name__ == "__main__" and {"--cpu", "--write-reference"} & set(sys.argv[1:]):
    os.environ["JAX_PLATFORMS"] = "cpu"  # must precede the first `import jax`
if (
    __name__ == "__main__"
    and "--cpu" in sys.argv[1:]
    and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
):
    # The smoke run compiles ~20 small programs and runs each once: LLVM's optimisations
    # would double its time. Results differ from the reference by float rounding only.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import zspa_jax  # noqa: E402
from zspa_jax.generation import prompt_bucket  # noqa: E402

REFERENCE = HERE / "gpu_reference.npz"
GPU_RESULTS = HERE / "results" / "gpu.md"
CPU_SMOKE_RESULTS = HERE / "results" / "gpu_cpu_smoke.md"

# Parity bounds: max|diff| / max|reference logit| over the compared positions.
F32_LOGIT_BOUND = {"cpu": 1e-5, "accelerator": 1e-4}
BF16_LOGIT_SANITY = 0.25  # catches a broken bf16 path (random logits differ by O(1)), nothing finer
LOGIT_POSITIONS = 8  # last real positions of each row whose full-vocabulary logits are kept
NEW_TOKENS = 12  # greedy tokens per row in the parity run
PARITY_KEEP = 8
SEED = 20260


def platform_kind() -> str:
    """ "cpu" or "accelerator": which parity bounds apply to this process's default device."""
    return "cpu" if jax.default_backend() == "cpu" else "accelerator"


# ----------------------------------------------------------------------------- weights


def uniform_tensor(
    seed: int, name: str, shape: tuple[int, ...], mean: float, std: float, dtype
) -> np.ndarray:
    """A tensor of uniform values with `mean` and `std`, from a `RandomState` seeded by
    (seed, crc32(name)): the same bytes on every machine and NumPy version (the legacy
    generator's stream is frozen; a uniform draw involves no transcendental function)."""
    rs = np.random.RandomState([seed, zlib.crc32(name.encode())])
    u = rs.random_sample(shape)
    return (mean + (2.0 * u - 1.0) * (math.sqrt(3.0) * std)).astype(dtype)


def init_tensor(seed: int, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The tests' initialisation rules (tests/support/random_weights.randomize_weights_,
    tests/support/tiny_qwen2_5_vl.randomize_), as uniform draws: norm scales ~ [0.5, 1.5],
    biases std 0.1, token embeddings std 1, CLIP class/position embeddings std 0.5, every
    other matrix std 1/sqrt(fan_in), so activations stay O(1) at any width."""
    n = name.lower()
    if re.search(r"norm|ln_q", n) and n.endswith("weight"):
        return uniform_tensor(seed, name, shape, 1.0, 0.5 / math.sqrt(3.0), dtype)
    if n.endswith("bias"):
        return uniform_tensor(seed, name, shape, 0.0, 0.1, dtype)
    if "embed_tokens" in n:
        return uniform_tensor(seed, name, shape, 0.0, 1.0, dtype)
    if "class_embedding" in n or "position_embedding" in n:
        return uniform_tensor(seed, name, shape, 0.0, 0.5, dtype)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    return uniform_tensor(seed, name, shape, 0.0, 1.0 / math.sqrt(fan_in), dtype)


def write_hf_checkpoint(directory: Path, hf_config, seed: int, dtype=np.float32) -> None:
    """config.json + model.safetensors with transformers' parameter names and shapes (read
    from the model class built on the meta device, so nothing is allocated by torch)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForImageTextToText.from_config(hf_config)
    tensors = {
        name: init_tensor(seed, name, tuple(p.shape), dtype) for name, p in model.named_parameters()
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(directory)


def convert(family: str, src: Path, out: Path, dtype: str = "float32") -> None:
    """The real converter (`python -m convert.<family>` in-process)."""
    import importlib

    importlib.import_module(f"convert.{family}").convert(src, out, dtype=dtype, progress=False)


def params_fingerprint(vlm) -> str:
    """SHA-256 over every loaded parameter (path, dtype, shape, bytes), in path order."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(vlm.state)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def arrays_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class LlavaSpec:
    """A LLaVA checkpoint: CLIP tower widths, LLaMA widths, a prompt layout."""

    name: str
    image_size: int
    patch_size: int
    vision: dict  # CLIPVisionConfig fields
    text: dict  # LlamaConfig fields
    image_token_index: int
    text_tokens: tuple[tuple[int, int], ...]  # per row: text tokens before / after the image
    keep: int
    family: str = "llava"

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def hf_config(self):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            image_size=self.image_size, patch_size=self.patch_size, **self.vision
        )
        text = LlamaConfig(
            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, **self.text
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=self.image_token_index,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
            image_seq_length=self.visual_tokens,
        )

    def inputs(self, seed: int) -> dict[str, np.ndarray]:
        """Left-padded rows `<s> text <image>*N text` (ids 4 .. image_token_index - 1) and
        pixel values uniform in [-1.8, 1.8] (CLIP-normalised range)."""
        rs = np.random.RandomState([seed, 1])
        rows = [
            [
                1,
                *rs.randint(4, self.image_token_index, pre),
                *[self.image_token_index] * self.visual_tokens,
                *rs.randint(4, self.image_token_index, post),
            ]
            for pre, post in self.text_tokens
        ]
        ids, mask = left_pad(rows, pad_id=3)
        size = self.image_size
        pixels = (rs.random_sample((len(rows), 3, size, size)) * 3.6 - 1.8).astype(np.float32)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@dataclasses.dataclass(frozen=True)
class QwenSpec:
    """A Qwen2.5-VL checkpoint (patch 4, merge 2, window 16 px) and one image per row."""

    name: str
    grids: tuple[tuple[int, int], ...]  # per row: the image's patch grid (h, w)
    text_tokens: tuple[tuple[int, int], ...]  # per row: question words before / after the image
    keep: int
    vocab_size: int = 64
    family: str = "qwen2_5_vl"
    # <|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>
    ids: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)

    def hf_config(self):
        from transformers import Qwen2_5_VLConfig

        pad, _, eos, v_start, v_end, image, video = self.ids
        return Qwen2_5_VLConfig(
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=48,
                num_heads=2,
                out_hidden_size=64,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=16,
                fullatt_block_indexes=[1],
            ),  # block 0 windowed, block 1 full attention
            text_config=dict(
                vocab_size=self.vocab_size,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-6,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=eos,
                pad_token_id=pad,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 1e6,
                    "mrope_section": [2, 3, 3],
                },
            ),
            image_token_id=image,
            video_token_id=video,
            vision_start_token_id=v_start,
            vision_end_token_id=v_end,
            tie_word_embeddings=False,
        )

    def inputs(self, seed: int) -> dict[str, np.ndarray]:
        """Chat-shaped rows `<|im_start|> words <|vision_start|> <|image_pad|>*n <|vision_end|>
        words <|im_end|> <|im_start|> word`, left-padded; flattened patches uniform in
        [-1.8, 1.8] ([sum h*w, 3 * 2 * 4 * 4]) and image_grid_thw."""
        pad, start, end, v_start, v_end, image, _ = self.ids
        rs = np.random.RandomState([seed, 2])
        words = lambda n: list(rs.randint(len(self.ids), self.vocab_size, n))  # noqa: E731
        rows = [
            [
                start,
                *words(pre),
                v_start,
                *[image] * (h * w // 4),
                v_end,
                *words(post),
                end,
                start,
                *words(1),
            ]
            for (pre, post), (h, w) in zip(self.text_tokens, self.grids)
        ]
        ids, mask = left_pad(rows, pad_id=pad)
        patches = sum(h * w for h, w in self.grids)
        pixels = (rs.random_sample((patches, 3 * 2 * 4 * 4)) * 3.6 - 1.8).astype(np.float32)
        grid = np.array([[1, h, w] for h, w in self.grids], np.int64)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixels,
            "image_grid_thw": grid,
        }


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and attention mask, left-padded to generate's prompt bucket, so `generate` and
    `generate_tokens` share compiled programs."""
    length = prompt_bucket(max(map(len, rows)))
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="quick_gelu",
    projection_dim=32,
)
TINY_LLAMA = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
)
PARITY_MODELS = (
    LlavaSpec(
        "llava",
        image_size=56,
        patch_size=7,
        vision=TINY_CLIP,
        text=TINY_LLAMA,
        image_token_index=300,
        text_tokens=((5, 12), (2, 9)),
        keep=PARITY_KEEP,
    ),
    QwenSpec(
        "qwen2_5_vl", grids=((16, 16), (12, 16)), text_tokens=((4, 10), (2, 12)), keep=PARITY_KEEP
    ),
)


def bench_llava(llm_layers: int) -> LlavaSpec:
    """LLaVA-1.5-7B-shaped: the CLIP ViT-L/14-336 tower (576 tokens) and LLaMA-2-7B widths
    with `llm_layers` of the 32 decoder layers; B = 1, 40 text tokens + the image."""
    from zspa_jax.estimate import llava_1_5_7b_config

    cfg = llava_1_5_7b_config()
    v, t = cfg.vision, cfg.text
    vision = dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        projection_dim=768,
    )
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=llm_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
    )
    return LlavaSpec(
        f"llava-1.5-7b-shaped ({llm_layers}/32 LLM layers)",
        image_size=v.image_size,
        patch_size=v.patch_size,
        vision=vision,
        text=text,
        image_token_index=cfg.image_token_index,
        text_tokens=((5, 35),),
        keep=64,
    )


def build_checkpoint(
    spec, directory: Path, seed: int, source_dtype=np.float32, dtype: str = "float32"
) -> Path:
    """HF source under directory/hf, converted to directory/zspa; returns the latter."""
    write_hf_checkpoint(directory / "hf", spec.hf_config(), seed, source_dtype)
    convert(spec.family, directory / "hf", directory / "zspa", dtype=dtype)
    return directory / "zspa"


# ----------------------------------------------------------------------------- parity run


def model_arrays(inputs: dict[str, np.ndarray]) -> tuple[tuple, dict]:
    """(input_ids, pixel_values, attention_mask) and the family's keyword extras."""
    extra = {"image_grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}
    return (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]), extra


def last_positions(logits: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """[B, n, V]: the logits at the last n positions whose mask is 1, per row."""
    return np.stack([row[np.flatnonzero(m)[-n:]] for row, m in zip(logits, mask)])


def run_parity_case(vlm, spec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """forward unpruned, forward pruned (keep=spec.keep) and pruned greedy generate_tokens."""
    (ids, pixels, mask), extra = model_arrays(inputs)
    prune = zspa_jax.PruneConfig(keep=spec.keep)
    logits, _, out_mask = zspa_jax.forward(
        vlm, ids, pixels, mask, **extra, return_kept=True, return_mask=True
    )
    p_logits, kept, p_mask = zspa_jax.forward(
        vlm, ids, pixels, mask, prune, **extra, return_kept=True, return_mask=True
    )
    out = zspa_jax.generate_tokens(
        vlm, ids, pixels, mask, **extra, prune=prune, max_new_tokens=NEW_TOKENS, eos_token_id=[]
    )
    return {
        "unpruned.logits": last_positions(
            np.asarray(logits), np.asarray(out_mask), LOGIT_POSITIONS
        ),
        "pruned.logits": last_positions(np.asarray(p_logits), np.asarray(p_mask), LOGIT_POSITIONS),
        "pruned.kept": np.asarray(kept, np.int32),
        "greedy.tokens": np.asarray(out.tokens, np.int32)[:, :NEW_TOKENS],
        "greedy.kept": np.asarray(out.kept_indices, np.int32),
    }


def run_parity(workdir: Path, log=print) -> dict[str, np.ndarray]:
    """Every parity output, keyed "<model>.<dtype>.<output>", plus "<model>.fingerprint"."""
    results: dict[str, np.ndarray] = {}
    for spec in PARITY_MODELS:
        t0 = time.perf_counter()
        path = build_checkpoint(spec, workdir / spec.name, SEED)
        inputs = spec.inputs(SEED)
        for dtype in ("float32", "bfloat16"):
            vlm = zspa_jax.load(path, dtype=dtype)
            if dtype == "float32":
                fingerprint = hashlib.sha256(
                    f"{params_fingerprint(vlm)}{arrays_fingerprint(inputs)}".encode()
                )
                results[f"{spec.name}.fingerprint"] = np.array(fingerprint.hexdigest())
            precision = (
                jax.default_matmul_precision("highest")
                if dtype == "float32"
                else contextlib.nullcontext()
            )
            with precision:
                for key, value in run_parity_case(vlm, spec, inputs).items():
                    results[f"{spec.name}.{dtype}.{key}"] = value
        log(f"parity run {spec.name}: {time.perf_counter() - t0:.1f} s")
    return results


# ----------------------------------------------------------------------------- comparison


@dataclasses.dataclass
class Check:
    model: str
    dtype: str
    name: str
    value: str
    bound: str
    ok: bool | None  # None: reported only

    @property
    def result(self) -> str:
        return {True: "PASS", False: "FAIL", None: "info"}[self.ok]


def logit_diff(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max|got - ref| / max|ref|, max|ref|); inf when shapes differ or got is not finite."""
    scale = float(np.abs(ref).max())
    if ref.shape != got.shape or not np.isfinite(got).all():
        return math.inf, scale
    return float(np.abs(got.astype(np.float64) - ref).max()) / max(scale, 1e-30), scale


def agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Fraction of equal entries (0 when shapes differ)."""
    return float((ref == got).mean()) if ref.shape == got.shape else 0.0


def kept_overlap(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over rows of |ref row & got row| / K (0 when shapes differ)."""
    if ref.shape != got.shape:
        return 0.0
    return float(
        np.mean([len(set(r) & set(g)) / len(r) for r, g in zip(ref.tolist(), got.tolist())])
    )


def first_difference(ref: np.ndarray, got: np.ndarray) -> str:
    if ref.shape != got.shape:
        return f"shape {got.shape} vs reference {ref.shape}"
    row, col = (int(i[0]) for i in np.nonzero(ref != got))
    return (
        f"first difference at row {row}, index {col}: {int(got[row, col])} vs {int(ref[row, col])}"
    )


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], kind: str) -> list[Check]:
    """Every parity check of `got` (this run) against `ref` (the carried CPU reference)."""
    checks: list[Check] = []
    bound = F32_LOGIT_BOUND[kind]
    for spec in PARITY_MODELS:
        m = spec.name
        same = str(ref[f"{m}.fingerprint"]) == str(got[f"{m}.fingerprint"])
        checks.append(
            Check(
                m, "-", "weights + inputs SHA-256", "equal" if same else "DIFFERENT", "equal", same
            )
        )
        for which in ("unpruned", "pruned"):
            d, scale = logit_diff(
                ref[f"{m}.float32.{which}.logits"], got[f"{m}.float32.{which}.logits"]
            )
            checks.append(
                Check(
                    m,
                    "float32",
                    f"forward logits, {which}",
                    f"{d:.2e} (ref max abs {scale:.1f})",
                    f"<= {bound:.0e}",
                    d <= bound,
                )
            )
        for key, label in (
            ("pruned.kept", "forward kept indices"),
            ("greedy.kept", "generate kept indices"),
            ("greedy.tokens", f"greedy tokens ({NEW_TOKENS}/row)"),
        ):
            r, g = ref[f"{m}.float32.{key}"], got[f"{m}.float32.{key}"]
            equal = r.shape == g.shape and bool((r == g).all())
            checks.append(
                Check(
                    m,
                    "float32",
                    label,
                    "equal" if equal else first_difference(r, g),
                    "equal",
                    equal,
                )
            )
        # Unpruned bf16 logits get a sanity bound; pruned ones are only reported: in bf16 a
        # near-tie can choose other tokens, and then the logits differ by O(1) legitimately.
        d, scale = logit_diff(
            ref[f"{m}.bfloat16.unpruned.logits"], got[f"{m}.bfloat16.unpruned.logits"]
        )
        checks.append(
            Check(
                m,
                "bfloat16",
                "forward logits, unpruned",
                f"{d:.2e} (ref max abs {scale:.1f})",
                f"<= {BF16_LOGIT_SANITY} (sanity)",
                d <= BF16_LOGIT_SANITY,
            )
        )
        d, scale = logit_diff(
            ref[f"{m}.bfloat16.pruned.logits"], got[f"{m}.bfloat16.pruned.logits"]
        )
        checks.append(
            Check(
                m,
                "bfloat16",
                "forward logits, pruned",
                f"{d:.2e} (ref max abs {scale:.1f})",
                "reported (finite)",
                None if math.isfinite(d) else False,
            )
        )
        for key, label in (
            ("pruned.kept", "forward kept overlap"),
            ("greedy.kept", "generate kept overlap"),
        ):
            value = kept_overlap(ref[f"{m}.bfloat16.{key}"], got[f"{m}.bfloat16.{key}"])
            checks.append(Check(m, "bfloat16", label, f"{value:.3f}", "reported", None))
        value = agreement(ref[f"{m}.bfloat16.greedy.tokens"], got[f"{m}.bfloat16.greedy.tokens"])
        checks.append(
            Check(m, "bfloat16", "greedy token agreement", f"{value:.3f}", "reported", None)
        )
    return checks


OUTPUTS = ("unpruned.logits", "pruned.logits", "pruned.kept", "greedy.tokens", "greedy.kept")


def reference_keys() -> set[str]:
    """The arrays a reference holds (what run_parity returns)."""
    return {f"{s.name}.fingerprint" for s in PARITY_MODELS} | {
        f"{s.name}.{dtype}.{out}"
        for s in PARITY_MODELS
        for dtype in ("float32", "bfloat16")
        for out in OUTPUTS
    }


def load_reference(path: Path) -> dict[str, np.ndarray]:
    """The carried reference; ValueError naming the missing arrays when it is stale."""
    with np.load(path, allow_pickle=False) as z:
        reference = {k: z[k] for k in z.files}
    missing = reference_keys() - set(reference)
    if missing:
        raise ValueError(
            f"{path} lacks {sorted(missing)}: rewrite it with "
            "`python benchmarks/gpu.py --write-reference`"
        )
    return reference


def git_commit() -> str:
    """HEAD of the checkout (with "+changes" when the tree differs from it), or "?"."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+changes" if dirty else "")


def write_reference(results: dict[str, np.ndarray], path: Path) -> None:
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "numpy": np.__version__,
        "commit": git_commit(),
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    np.savez_compressed(path, **results, meta=np.array(json.dumps(meta)))


# ----------------------------------------------------------------------------- timings


def device_memory() -> dict | None:
    """The default device's allocator statistics, or None where the backend has none."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (backends without statistics raise different errors)
        return None
    return stats or None


def peak_memory() -> str:
    stats = device_memory()
    if not stats or "peak_bytes_in_use" not in stats:
        return "n/a"
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB"


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` further calls), each ended by block_until_ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_select_tokens(b: int, n: int, d: int, k: int, t: int, repeats: int) -> dict:
    """zspa_jax.select_tokens (zspaprune, r = 0.6) on f32 [b, n, d] tokens and a t-token prompt."""
    rng = np.random.default_rng(0)
    visual = jax.device_put(rng.standard_normal((b, n, d), np.float32))
    prompt = jax.device_put(rng.standard_normal((b, t, d), np.float32))
    select = jax.jit(partial(zspa_jax.select_tokens, keep=k))
    first, median = median_seconds(lambda: select(visual, prompt), repeats)
    return {
        "shape": f"B={b} N={n} D={d} K={k} T={t}, f32",
        "first_s": first,
        "median_ms": median * 1e3,
        "peak_memory": peak_memory(),
    }


def bench_generate(vlm, spec, keeps: tuple[int, ...], new_tokens: int, repeats: int) -> list[dict]:
    """zspa_jax.generate per keep (fewest tokens first, so each cumulative peak-memory
    reading belongs to the largest run so far): prefill ms and decode tokens/s medians."""
    inputs = spec.inputs(SEED)
    (ids, pixels, mask), extra = model_arrays(inputs)
    rows = []
    for keep in sorted(keeps):
        prune = None if keep == spec.visual_tokens else zspa_jax.PruneConfig(keep=keep)
        call = partial(
            zspa_jax.generate,
            vlm,
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=mask,
            **extra,
            prune=prune,
            max_new_tokens=new_tokens,
            eos_token_id=[],
        )
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        results = [call() for _ in range(repeats)]
        stats = results[-1].stats
        rows.append(
            {
                "keep": keep,
                "sequence_length": int(stats["prompt_tokens_per_row_pruned"][0]),
                "prefill_ms": statistics.median(r.stats["prefill_seconds"] for r in results) * 1e3,
                "decode_tokens_per_second": statistics.median(
                    r.stats["decode_tokens_per_second_total"] for r in results
                ),
                "first_s": first,
                "peak_memory": peak_memory(),
            }
        )
    return rows


def run_benchmarks(args, workdir: Path, cpu: bool, log=print) -> dict:
    """select_tokens, then the generate timings (bf16), smallest shapes under --cpu."""
    if cpu:
        sel = bench_select_tokens(b=2, n=64, d=64, k=PARITY_KEEP, t=8, repeats=args.repeats)
        spec, path = (
            PARITY_MODELS[0],
            workdir / PARITY_MODELS[0].name / "zspa",
        )  # built by the parity run
    else:
        sel = bench_select_tokens(b=8, n=576, d=4096, k=64, t=32, repeats=args.repeats)
        spec = bench_llava(args.llm_layers)
        t0 = time.perf_counter()
        path = build_checkpoint(
            spec, workdir / "bench", SEED, source_dtype=np.float16, dtype="bfloat16"
        )
        log(f"benchmark checkpoint built and converted in {time.perf_counter() - t0:.1f} s")
    log(f"select_tokens {sel['shape']}: {sel['median_ms']:.3f} ms")
    vlm = zspa_jax.load(path, dtype="bfloat16")
    rows = bench_generate(vlm, spec, (spec.visual_tokens, spec.keep), args.new_tokens, args.repeats)
    for r in rows:
        log(
            f"generate keep {r['keep']}: prefill {r['prefill_ms']:.2f} ms, "
            f"decode {r['decode_tokens_per_second']:.1f} tok/s"
        )
    return {
        "select_tokens": sel,
        "model": spec.name,
        "visual_tokens": spec.visual_tokens,
        "batch": len(spec.text_tokens),
        "generate": rows,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }


# ----------------------------------------------------------------------------- report


def machine_line() -> str:
    dev = jax.devices()[0]
    import jaxlib

    return (
        f"device {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); "
        f"jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}, numpy {np.__version__}, Python {platform.python_version()}; "
        f"host {platform.machine()} x{os.cpu_count()}; {datetime.datetime.now().isoformat(timespec='seconds')}"
    )


def report(
    checks: list[Check], bench: dict | None, reference: dict, kind: str, seconds: float, smoke: bool
) -> str:
    """The markdown report: machine, parity table, timing tables."""
    meta = json.loads(str(reference.get("meta", "{}")))
    failed = [c for c in checks if c.ok is False]
    mode = (
        "CPU smoke run (`--cpu`: smallest shapes, 1 repeat, XLA CPU backend optimisation level 0; the "
        "timings only show that the code runs)"
        if smoke
        else "full run"
    )
    lines = [
        "# zspa_jax on one device: parity against the CPU reference, and timings",
        "",
        f"Written by `python benchmarks/gpu.py`; {mode}. Machine: {machine_line()}. Total run time {seconds:.0f} s.",
        "",
        "## Parity",
        "",
        f"Reference: `benchmarks/gpu_reference.npz` (written on {meta.get('backend', '?')} with jax "
        f"{meta.get('jax', '?')} at commit {meta.get('commit', '?')}, {meta.get('written', '?')}). Models: random "
        f"LLaVA (64 visual tokens) and Qwen2.5-VL (64 + 48 merged tokens), "
        f"B = 2, keep = {PARITY_KEEP} (zspaprune), {NEW_TOKENS} greedy tokens (pruned). float32 under "
        f'jax_default_matmul_precision="highest": logits at the last {LOGIT_POSITIONS} positions of each row, '
        f"max abs difference / max abs reference logit <= {F32_LOGIT_BOUND[kind]:.0e} ({kind}); kept indices and "
        f"tokens equal. bfloat16 vs the CPU's bfloat16 run: reported; unpruned logits within a sanity bound "
        f"({BF16_LOGIT_SANITY}), all logits finite. Logit values in the table are that relative difference.",
        "",
        "| model | dtype | check | value | bound | result |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c.model} | {c.dtype} | {c.name} | {c.value} | {c.bound} | {c.result} |"
            for c in checks
        ),
        "",
        f"Parity: {'PASS' if not failed else 'FAIL'} ({sum(c.ok is True for c in checks)} of "
        f"{sum(c.ok is not None for c in checks)} asserted checks passed).",
    ]
    if bench is not None:
        sel = bench["select_tokens"]
        unpruned = max(bench["generate"], key=lambda r: r["keep"])["prefill_ms"]
        lines += [
            "",
            "## Timings",
            "",
            f"Median over {bench['repeats']} timed call(s) after one warm-up call, each ended by `block_until_ready`; "
            "peak device memory is the process's cumulative peak after each row (rows run top to bottom).",
            "",
            "| measure | shape | median | first call | peak device memory |",
            "|---|---|---|---|---|",
            f"| select_tokens (zspaprune) | {sel['shape']} | {sel['median_ms']:.3f} ms | {sel['first_s']:.2f} s "
            f"| {sel['peak_memory']} |",
            "",
            f"`zspa_jax.generate`, bfloat16, {bench['model']}, B = {bench['batch']}, {bench['visual_tokens']} visual "
            f"tokens, {bench['new_tokens']} new tokens (EOS off); prefill = tower + pruning + LLM prefill.",
            "",
            "| keep | sequence length (row 0) | prefill ms | prefill speed-up | decode tokens/s | first call s "
            "| peak device memory |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['keep']} | {r['sequence_length']} | {r['prefill_ms']:.2f} | {unpruned / r['prefill_ms']:.2f}x "
                f"| {r['decode_tokens_per_second']:.1f} | {r['first_s']:.1f} | {r['peak_memory']} |"
                for r in bench["generate"]
            ),
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu", action="store_true", help="smoke run on the CPU (smallest shapes, 1 repeat)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"markdown report (default {GPU_RESULTS.relative_to(ROOT)}; "
        f"with --cpu {CPU_SMOKE_RESULTS.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--write-reference", action="store_true", help="(CPU) rewrite the parity reference and exit"
    )
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument(
        "--repeats", type=int, help="timed calls per measurement (default 5; 1 with --cpu)"
    )
    parser.add_argument(
        "--new-tokens", type=int, help="decode tokens in the timings (default 32; 4 with --cpu)"
    )
    parser.add_argument(
        "--llm-layers", type=int, default=4, help="decoder layers of the 7B-shaped timing model"
    )
    parser.add_argument("--no-bench", action="store_true", help="parity only")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.cpu else 5)
    args.new_tokens = args.new_tokens or (4 if args.cpu else 32)
    if args.out is None:
        args.out = CPU_SMOKE_RESULTS if args.cpu else GPU_RESULTS
    return args


def write_reference_main(args, workdir: Path) -> int:
    """Build every parity model twice (the builds must agree byte for byte), run, save."""
    if jax.default_backend() != "cpu":
        print("--write-reference runs on the CPU only (JAX_PLATFORMS=cpu)", file=sys.stderr)
        return 2
    first = run_parity(workdir / "a")
    second = run_parity(workdir / "b")
    for spec in PARITY_MODELS:
        key = f"{spec.name}.fingerprint"
        if str(first[key]) != str(second[key]):
            print(
                f"{spec.name}: two builds gave different checkpoints; not writing a reference",
                file=sys.stderr,
            )
            return 1
    differ = [k for k in first if not np.array_equal(first[k], second[k])]
    if differ:
        print(
            f"two runs on this CPU disagree on {differ}; not writing a reference", file=sys.stderr
        )
        return 1
    write_reference(first, args.reference)
    print(
        f"wrote {args.reference} ({args.reference.stat().st_size / 1024:.0f} KiB); both builds identical: "
        + ", ".join(f"{s.name} {str(first[s.name + '.fingerprint'])[:16]}" for s in PARITY_MODELS)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zspa_gpu_check_") as tmp:
        workdir = Path(tmp)
        if args.write_reference:
            return write_reference_main(args, workdir)
        if args.cpu and jax.default_backend() != "cpu":
            print(
                "--cpu: JAX did not start on the CPU platform (set JAX_PLATFORMS=cpu)",
                file=sys.stderr,
            )
            return 2
        if not args.reference.exists():
            print(
                f"no reference at {args.reference}: run `python benchmarks/gpu.py --write-reference` on a CPU",
                file=sys.stderr,
            )
            return 2
        print(machine_line(), flush=True)
        reference = load_reference(args.reference)
        kind = platform_kind()
        checks = compare(reference, run_parity(workdir), kind)
        for c in checks:
            print(
                f"[{c.result}] {c.model} {c.dtype} {c.name}: {c.value} (bound {c.bound})",
                flush=True,
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Written now and again with the timings, so a failure in the timings keeps the parity table.
        args.out.write_text(
            report(checks, None, reference, kind, time.perf_counter() - start, smoke=args.cpu)
        )
        if not args.no_bench:
            bench = run_benchmarks(args, workdir, args.cpu)
            args.out.write_text(
                report(checks, bench, reference, kind, time.perf_counter() - start, smoke=args.cpu)
            )
    print(f"wrote {args.out}")
    failed = [c for c in checks if c.ok is False]
    for c in failed:
        print(
            f"PARITY FAIL: {c.model} {c.dtype} {c.name}: {c.value} (bound {c.bound})",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
