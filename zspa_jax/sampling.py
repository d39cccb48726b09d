"""Next-token sampling: greedy, temperature, top-k, and top-p applied within top-k."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings (hashable: a jit static argument).

    temperature 0 means greedy (argmax; ties -> lowest id, like torch.argmax).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """logits: f32 [B, V] -> int32 [B]."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        k = logits.shape[-1] if self.top_k is None else min(self.top_k, logits.shape[-1])
        top_logits, top_ids = jax.lax.top_k(logits, k)  # sorted descending
        if self.top_p is not None:
            probs = jax.nn.softmax(top_logits, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            top_logits = jnp.where(mass_before < self.top_p, top_logits, -jnp.inf)
        choice = jax.random.categorical(rng, top_logits, axis=-1)
        return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
