"""transformers with visual tokens dropped from layer K on (forward pre-hooks): the
reference for the methods that prune inside the language model (FastV, DART)."""

from __future__ import annotations

import numpy as np
import torch


class DropAtLayer:
    """Forward pre-hooks on HF decoder layers >= K: the prefill's hidden states, RoPE tables,
    position ids and mask lose the dropped tokens; decode steps' masks lose their columns."""

    def __init__(self, lm, layer: int, src: np.ndarray, length: int):
        self.src = torch.as_tensor(src)
        self.length = length
        self.handles = [
            lm.layers[i].register_forward_pre_hook(self.hook, with_kwargs=True)
            for i in range(layer, len(lm.layers))
        ]

    def hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dim() == 4
        cols = torch.cat([self.src, torch.arange(self.length, mask.shape[-1])])
        if mask.shape[-2] == self.length:  # prefill: queries are the whole prompt
            if (
                hidden.shape[1] == self.length
            ):  # layer K itself: drop the tokens from the hidden states
                hidden = hidden[:, self.src]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[:, self.src], sin[:, self.src])
            kwargs["position_ids"] = kwargs["position_ids"][:, self.src]
            kwargs["attention_mask"] = mask[:, :, self.src][:, :, :, cols]
        else:  # a decode step: the cache of this layer lacks the dropped tokens' columns
            kwargs["attention_mask"] = mask[..., cols]
        return (hidden,) + tuple(args[1:]), kwargs

    def remove(self):
        for h in self.handles:
            h.remove()


class QwenDropAtLayer:
    """Forward pre-hooks on transformers' Qwen2.5-VL decoder layers >= K: the prefill's hidden
    states, M-RoPE cos/sin (already combined per section by the rotary embedding: [B, L, Dh]),
    text position ids ([B, L]; None outside generate) and mask [B, 1, L, L] lose the dropped
    tokens; a decode step's mask [B, 1, 1, S] loses the columns this layer's cache lacks."""

    def __init__(self, lm, layer: int, src: np.ndarray, length: int):
        self.src = torch.as_tensor(src)
        self.length = length
        self.calls = {"prefill": 0, "decode": 0}
        self.handles = [
            lm.layers[i].register_forward_pre_hook(self.hook, with_kwargs=True)
            for i in range(layer, len(lm.layers))
        ]

    def hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dim() == 4
        cols = torch.cat([self.src, torch.arange(self.length, mask.shape[-1])])
        cos, sin = kwargs["position_embeddings"]
        if mask.shape[-2] == self.length:  # prefill: queries are the whole prompt
            if (
                hidden.shape[1] == self.length
            ):  # layer K itself: drop the tokens from the hidden states
                hidden = hidden[:, self.src]
            assert cos.shape[:2] == sin.shape[:2] == (1, self.length), cos.shape
            kwargs["position_embeddings"] = (cos[:, self.src], sin[:, self.src])
            if kwargs.get("position_ids") is not None:
                assert kwargs["position_ids"].shape == (1, self.length)
                kwargs["position_ids"] = kwargs["position_ids"][:, self.src]
            kwargs["attention_mask"] = mask[:, :, self.src][:, :, :, cols]
            self.calls["prefill"] += 1
        else:  # a decode step: the cache of this layer lacks the dropped tokens' columns
            assert hidden.shape[1] == mask.shape[-2] == cos.shape[1] == 1
            kwargs["attention_mask"] = mask[..., cols]
            self.calls["decode"] += 1
        return (hidden,) + tuple(args[1:]), kwargs

    def remove(self):
        for h in self.handles:
            h.remove()


def qwen_layer_internals(tiny, row, layer):
    """transformers on one row alone: layer `layer`'s head-mean last-query attention [L], its
    keys after M-RoPE [L, Hkv * Dh], and the hidden states leaving it [L, D]."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    attn = tiny.hf.model.language_model.layers[layer].self_attn
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = tiny.hf(**row, output_attentions=True, output_hidden_states=True)
            x = captured["x"]
            b, length = x.shape[:2]
            k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
            cos, sin = captured["rope"]
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
    finally:
        handle.remove()
    keys = k.transpose(1, 2).reshape(b, length, -1)[0]
    return out.attentions[layer][0, :, -1, :].mean(0), keys, out.hidden_states[layer + 1][0]
