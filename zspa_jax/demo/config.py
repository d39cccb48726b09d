"""The demo training configuration: `TrainConfig` (model sizes, data, schedule) and the `--quick` overrides."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model
    vision_width: int = 64
    vision_layers: int = 3
    vision_feature_layer: int = -2  # LLaVA-1.5 reads layer -2: the last layer is carried but unused
    vision_heads: int = 2
    vision_mlp: int = 256
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    text_mlp: int = 352
    max_positions: int = 1024
    # data and schedule
    seed: int = 0
    qa_per_image: int = 8
    captions: bool = True  # a caption segment in stage 0 / stage 2 sequences too
    symbolic_steps: int = 1200  # stage 0
    symbolic_batch: int = 16
    symbolic_tokens: int = 112  # patches shown per symbolic scene (objects + sampled background)
    symbolic_qa_per_image: int = 8  # stage 0's own count (see zspa_jax.demo.train)
    symbolic_lr: float = 3e-3
    batch: int = 16  # stages 1 and 2
    stage1_steps: int = 700
    stage2_steps: int = 380
    stage1_lr: float = 3e-3
    stage2_lr: float = 1.5e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    align_weight: float = 1.0
    eval_every: int = 100
    eval_examples: int = 210

    def __post_init__(self):
        counts = (
            self.batch,
            self.symbolic_batch,
            self.qa_per_image,
            self.symbolic_qa_per_image,
            self.symbolic_tokens,
        )
        if min(counts) < 1 or min(self.symbolic_steps, self.stage1_steps, self.stage2_steps) < 0:
            raise ValueError(f"invalid TrainConfig {self}")


QUICK = dict(
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    vision_mlp=64,
    text_width=32,
    text_layers=1,
    text_heads=2,
    text_kv_heads=1,
    text_mlp=64,
    qa_per_image=2,
    symbolic_qa_per_image=2,
    symbolic_steps=4,
    symbolic_batch=4,
    symbolic_tokens=96,
    batch=4,
    stage1_steps=3,
    stage2_steps=5,
    eval_every=0,
    eval_examples=14,
)
