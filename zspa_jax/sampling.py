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
            set_(
                "top_p",
                check_real("top_p", self.top_p, minimum=0.0, maximum=1.0, open_minimum=True),
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """The distribution each row's next token is drawn from: logits f32 [B, V] -> f32 [B, V].

        Greedy: one-hot at the argmax. Otherwise, in this order: divide the logits by the
        temperature; keep the top_k largest (all when None; ties -> lower id); keep the
        smallest prefix of those, sorted by probability, whose softmax mass reaches top_p
        (at least one token); renormalise over what is kept. Everything else is 0.
        """
        logits = jnp.asarray(logits, jnp.float32)
        vocab = logits.shape[-1]
        if self.greedy:
            return jax.nn.one_hot(jnp.argmax(logits, axis=-1), vocab, dtype=jnp.float32)
        logits = logits / self.temperature
        if self.top_k is None and self.top_p is None:
            return jax.nn.softmax(logits, axis=-1)
        k = vocab if self.top_k is None else min(self.top_k, vocab)
        top_logits, top_ids = jax.lax.top_k(logits, k)  # sorted descending
        probs = jax.nn.softmax(top_logits, axis=-1)
        if self.top_p is not None:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            probs = jnp.where(mass_before < self.top_p, probs, 0.0)
            probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
        rows = jnp.arange(logits.shape[0])[:, None]
        return jnp.zeros_like(logits).at[rows, top_ids].set(probs)

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """logits: f32 [B, V] -> int32 [B]: one draw per row from `probabilities(logits)`."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        probs = self.probabilities(logits)
        return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)
