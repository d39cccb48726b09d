"""Write a zspa_jax LLaVA back out in Hugging Face format (config, safetensors, processor).

The tensor names are the ones transformers 5 writes for `LlavaForConditionalGeneration`
(`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*`), which is also the canonical layout of `convert.keymap`. The
inverse mapping is derived from `convert.keymap.RULES` itself: each of our parameter paths
gets its HF candidate name, and the candidate is accepted only if `map_key` sends it back
to the same path; the transform is then undone. No second table to keep in sync.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from convert.keymap import Transform, map_key
from models.checkpoint import flatten

# our leaf name -> HF leaf name (the candidates; keymap.RULES decides which are right)
_LEAF = {
    "kernel": "weight",
    "embedding": "weight",
    "scale": "weight",
    "bias": "bias",
    "class_embedding": "class_embedding",
}


def invert(transform: Transform, x: np.ndarray) -> np.ndarray:
    """Undo `Transform.apply`: flax kernel [in, out] -> torch [out, in]; HWIO -> OIHW."""
    if transform is Transform.LINEAR:
        return x.T
    if transform is Transform.CONV:
        return x.transpose(3, 2, 0, 1)
    return x


def hf_key(path: str) -> tuple[str, Transform]:
    """HF tensor name for one of our dotted parameter paths (checked against keymap.RULES)."""
    head, _, leaf = path.rpartition(".")
    if leaf not in _LEAF:
        raise KeyError(f"no HF name for parameter {path!r} (unknown leaf {leaf!r})")
    candidate = path if leaf == "class_embedding" else f"{head}.{_LEAF[leaf]}"
    mapped = map_key(candidate)
    if mapped is None or mapped[0] != path:
        raise KeyError(
            f"parameter {path!r}: candidate HF key {candidate!r} maps to {mapped!r}, not back to it"
        )
    return candidate, mapped[1]


def _param_dict(vlm_or_params: Any) -> dict:
    """A VLM, an NNX LLaVA module, an nnx.State or a nested dict -> nested dict of arrays."""
    from flax import nnx

    obj = getattr(vlm_or_params, "model", vlm_or_params)  # zspa_jax.VLM -> its module
    if isinstance(obj, nnx.Module):
        return nnx.state(obj, nnx.Param).to_pure_dict()
    if isinstance(obj, nnx.State):
        return obj.to_pure_dict()
    if isinstance(obj, dict):
        return obj
    raise TypeError(
        f"expected a VLM, an NNX module, an nnx.State or a dict of params, got {type(vlm_or_params)}"
    )


def hf_state_dict(vlm_or_params: Any) -> dict[str, np.ndarray]:
    """{HF tensor name: f32 numpy array in torch layout}."""
    out = {}
    for path, value in flatten(_param_dict(vlm_or_params)).items():
        key, transform = hf_key(path)
        out[key] = np.ascontiguousarray(invert(transform, np.asarray(value, dtype=np.float32)))
    return out


def hf_config(cfg, tokenizer=None):
    """`transformers.LlavaConfig` equivalent to our `models.llava.LlavaConfig`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v, t = cfg.vision, cfg.text
    specials = {}
    if tokenizer is not None:
        specials = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        projection_dim=v.hidden_size,
    )
    text = LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        tie_word_embeddings=t.tie_word_embeddings,
        hidden_act=t.hidden_act,
        attention_bias=t.attention_bias,
        mlp_bias=t.mlp_bias,
        **specials,
    )
    layer = cfg.vision_feature_layer
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cfg.image_token_index,
        vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
        multimodal_projector_bias=cfg.multimodal_projector_bias,
        image_seq_length=cfg.image_seq_length,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def export_hf(
    vlm_or_params: Any, cfg=None, tokenizer=None, processor=None, out_dir: str | Path = "."
) -> Path:
    """Write an HF LLaVA directory that `LlavaForConditionalGeneration.from_pretrained` loads.

    Args:
      vlm_or_params: a `zspa_jax.VLM`, an NNX `LlavaForConditionalGeneration`, an
        `nnx.State` or a nested dict of our params.
      cfg: our `models.llava.LlavaConfig` (taken from the VLM / module when None).
      tokenizer, processor: HF objects to save beside the weights (taken from the VLM when
        None; a processor alone also provides its tokenizer).
      out_dir: created if needed.
    Writes config.json, generation_config.json, model.safetensors (f32) and the
    processor/tokenizer files; returns out_dir.
    """
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    if cfg is None:
        cfg = getattr(vlm_or_params, "config", None)
        if cfg is None:
            raise ValueError("cfg is required when exporting a bare param tree")
    if processor is None:
        processor = getattr(vlm_or_params, "processor", None)
    if tokenizer is None and processor is not None:
        tokenizer = getattr(processor, "tokenizer", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(vlm_or_params)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config(cfg, tokenizer).save_pretrained(str(out))
    if tokenizer is not None:
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        ).save_pretrained(str(out))
    if processor is not None:
        processor.save_pretrained(str(out))
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m zspa_jax.demo.export MODEL_DIR OUT_DIR: a converted checkpoint -> HF format."""
    import argparse

    import zspa_jax

    parser = argparse.ArgumentParser(
        prog="python -m zspa_jax.demo.export", description=main.__doc__
    )
    parser.add_argument(
        "model", help="converted zspa_jax checkpoint (e.g. zspa_jax/assets/demo_model)"
    )
    parser.add_argument("out", help="output directory for the HF LLaVA files")
    args = parser.parse_args(argv)
    vlm = zspa_jax.load(args.model)
    export_hf(vlm, vlm.config, None, vlm.processor, args.out)
    print(json.dumps({"out": str(Path(args.out).absolute())}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
