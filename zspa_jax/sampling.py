"""Next-token sampling: greedy, temperature, top-k, and top-p applied within top-k."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zspa_jax.validation import check_int, check_real


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings (hashable: a jit static argument).

    temperature 0 means greedy (argmax; ties -> lowest id, like torch.argmax).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("temperature", check_real("temperature", self.temperature, minimum=0.0))
        if self.top_k is not None:
            set_("top_k", check_int("top_k", self.top_k, minimum=1))
        if self.top_p is not None:
            set_("top_p", check_real("top_p", self.top_p, minimum=0.0, maximum=1.0, open_minimum=True))

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
