"""Batched text generation and scoring for evaluation harnesses, over the public API.

`Runner` answers lists of requests the way lmms-eval asks them, without importing
lmms-eval: `generate_until` through `zspa_jax.generate` and `loglikelihood` through
`zspa_jax.forward`. Requests are grouped by generation settings, by whether they carry an
image, and by the library's prompt-length bucket (`prompt_bucket`), then batched
`batch_size` at a time, so a request is padded to the length it would have alone and
every batch of a bucket reuses one compiled program.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

import zspa_jax
from zspa_jax.batch import check_prune_for
from zspa_jax.eval.args import ModelArgs
from zspa_jax.host import prompt_bucket
from zspa_jax.sharding import device_mesh

# Generation kwargs that tasks pass and that do not change greedy decoding here.
_HARMLESS_GEN_KWARGS = ("image_aspect_ratio", "image_sizes", "use_cache")
_WARNED: set[str] = set()


@dataclasses.dataclass(frozen=True)
class GenRequest:
    """One `generate_until` request: the prompt text, its images (0 or 1) and the task's kwargs."""

    context: str
    images: tuple = ()
    gen_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LoglikelihoodRequest:
    """One `loglikelihood` request: log P(continuation | context, images)."""

    context: str
    continuation: str
    images: tuple = ()


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """Resolved generation settings (hashable: requests are grouped by them)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    until: tuple[str, ...] = ()


def gen_settings(gen_kwargs: Mapping[str, Any], default_max_new_tokens: int) -> GenSettings:
    """lmms-eval / HF generation kwargs -> GenSettings.

    `do_sample` false (or absent with temperature 0) is greedy; sampling without a
    temperature uses 1.0. `until` is a string or a list of strings. Beam search is not
    implemented (num_beams > 1 is an error); unknown keys are ignored with one warning each.
    """
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        until = ()
    elif isinstance(until, str):
        until = (until,)
    elif isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
        until = tuple(until)
    else:
        raise ValueError(
            f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}"
        )
    max_new = kw.pop("max_new_tokens", None)
    max_new = default_max_new_tokens if max_new is None else int(max_new)
    if max_new < 1:
        raise ValueError(f"gen_kwargs['max_new_tokens'] must be >= 1, got {max_new}")
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    do_sample = kw.pop("do_sample", None)
    do_sample = temperature > 0 if do_sample is None else bool(do_sample)
    top_p, top_k = kw.pop("top_p", None), kw.pop("top_k", None)
    num_beams = int(kw.pop("num_beams", 1) or 1)
    if num_beams > 1:
        raise ValueError(
            f"gen_kwargs num_beams={num_beams}: beam search is not implemented by zspa_jax.generate"
        )
    for key in kw:
        if key not in _HARMLESS_GEN_KWARGS and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"zspa_jax: generation kwarg {key!r} is not supported and is ignored", stacklevel=2
            )
    if not do_sample:
        return GenSettings(max_new, until=until)
    return GenSettings(
        max_new,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=None if top_k in (None, 0) else int(top_k),
        top_p=None if top_p in (None, 1, 1.0) else float(top_p),
        until=until,
    )


def cut_at_stops(text: str, until: Iterable[str]) -> str:
    """`text` up to the earliest occurrence of any (non-empty) stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


def batches(keys: Sequence[Any], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by (key, prompt bucket), longest first, `batch_size` per batch.

    Rows of one batch share the key and the padded length they would have alone.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (key, n) in enumerate(zip(keys, lengths)):
        groups.setdefault((key, prompt_bucket(n)), []).append(i)
    out = []
    for _, idx in sorted(groups.items(), key=lambda kv: (-kv[0][1], repr(kv[0][0]))):
        idx.sort(key=lambda i: (-lengths[i], i))
        out += [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    return out


def _fill(idx: list[int], batch_size: int) -> list[int]:
    """A short last batch repeats its last row up to `batch_size`: one compiled shape per bucket."""
    return idx + [idx[-1]] * (batch_size - len(idx))


def load_model(args: ModelArgs) -> zspa_jax.VLM:
    """`zspa_jax.load(args.pretrained, mesh=, dtype=)`, checked against `args.prune`."""
    mesh = (
        None
        if args.mesh is None
        else device_mesh(*args.mesh, f"zspa_jax model_args: mesh={args.mesh[0]}x{args.mesh[1]}")
    )
    vlm = zspa_jax.load(args.pretrained, mesh=mesh, dtype=args.dtype)
    if vlm.processor is None:
        raise ValueError(
            f"zspa_jax model_args: pretrained={str(args.pretrained)!r} has no saved tokenizer/processor; "
            "evaluation needs one (convert a checkpoint that includes them)"
        )
    try:  # the method against this model (a [CLS] tower, an in-LLM layer below its depth)
        check_prune_for(vlm, args.prune)
    except ValueError as e:
        raise ValueError(f"zspa_jax model_args: {e}") from None
    n_visual = getattr(vlm, "tokens_per_image", None)
    if args.prune is not None and n_visual:
        try:
            args.prune.num_keep(n_visual)
        except ValueError:
            raise ValueError(
                f"zspa_jax model_args: keep={args.prune.keep} exceeds the {n_visual} visual tokens per image of "
                f"{args.pretrained}"
            ) from None
    return vlm


class Runner:
    """Answers evaluation requests with one loaded model and one pruning setting."""

    def __init__(self, args: ModelArgs, vlm: zspa_jax.VLM | None = None):
        self.args = args
        self.vlm = load_model(args) if vlm is None else vlm
        self.tokenizer = getattr(self.vlm.processor, "tokenizer", self.vlm.processor)

    # ------------------------------------------------------------------ helpers

    def _check_images(self, images: Sequence[Any], where: str) -> tuple:
        images = tuple(images or ())
        for image in images:
            if not (hasattr(image, "convert") and hasattr(image, "size")):
                raise ValueError(
                    f"{where}: expected PIL images, got {type(image).__name__} (videos are not supported)"
                )
        return images

    def _encode(self, context: str, images: tuple) -> dict[str, np.ndarray]:
        return zspa_jax.encode(self.vlm, [context], [list(images)] if images else None)

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=total == 0, leave=False)

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: Sequence[GenRequest]) -> list[str]:
        """Answers in request order; each cut at its first `until` stop string."""
        settings = [gen_settings(r.gen_kwargs, self.args.max_new_tokens) for r in requests]
        images = [self._check_images(r.images, f"request {i}") for i, r in enumerate(requests)]
        # The exact encoded length (chat template and image expansion included) picks the bucket.
        lengths = [
            self._encode(r.context, im)["input_ids"].shape[1] for r, im in zip(requests, images)
        ]
        keys = [
            (s, len(im)) for s, im in zip(settings, images)
        ]  # a batch's prompts hold as many images
        out: list[str | None] = [None] * len(requests)
        plan = batches(keys, lengths, self.args.batch_size)
        with self._progress(len(requests), "zspa_jax generate") as bar:
            for idx in plan:
                st, image_count = keys[idx[0]]
                rows = _fill(idx, self.args.batch_size)
                res = zspa_jax.generate(
                    self.vlm,
                    [requests[i].context for i in rows],
                    [list(images[i]) for i in rows] if image_count else None,
                    prune=self.args.prune if image_count else None,
                    max_new_tokens=st.max_new_tokens,
                    temperature=st.temperature,
                    top_k=st.top_k,
                    top_p=st.top_p,
                    seed=self.args.seed,
                    keep_positions=self.args.keep_positions,
                )
                for i, text in zip(idx, res.texts):
                    out[i] = cut_at_stops(text, st.until)
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ scoring

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation tokens, whether greedy decoding gives them).

        One forward pass over prompt + continuation; with pruning, the selection sees the
        whole text after the image (continuation included), as any single-pass scorer does.
        """
        rows = []
        for i, r in enumerate(requests):
            enc = self._encode(r.context, self._check_images(r.images, f"request {i}"))
            cont = [
                int(t)
                for t in self.tokenizer(r.continuation, add_special_tokens=False)["input_ids"]
            ]
            prompt = enc["input_ids"][0][enc["attention_mask"][0].astype(bool)]
            extras = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            rows.append((np.concatenate([prompt, np.asarray(cont, np.int32)]), len(cont), extras))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        keys = [tuple(sorted(extras)) for _, _, extras in rows]
        plan = batches(keys, [len(ids) for ids, _, _ in rows], self.args.batch_size)
        with self._progress(len(requests), "zspa_jax loglikelihood") as bar:
            for idx in plan:
                for i, result in zip(
                    idx, self._score([rows[i] for i in _fill(idx, self.args.batch_size)])
                ):
                    out[i] = result
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    def _score(self, rows: list[tuple[np.ndarray, int, dict]]) -> list[tuple[float, bool]]:
        width = prompt_bucket(max(len(ids) for ids, _, _ in rows))
        input_ids = np.full((len(rows), width), self.vlm.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for r, (ids, _, _) in enumerate(rows):
            input_ids[r, width - len(ids) :] = ids
            mask[r, width - len(ids) :] = 1
        extras = {k: np.concatenate([e[k] for _, _, e in rows]) for k in rows[0][2]}
        prune = self.args.prune if extras else None
        logits = zspa_jax.forward(
            self.vlm,
            input_ids=input_ids,
            attention_mask=mask,
            prune=prune,
            seed=self.args.seed,
            keep_positions=self.args.keep_positions,
            **extras,
        )
        results = []
        for r, (ids, n, _) in enumerate(rows):
            if n == 0:
                results.append((0.0, True))
                continue
            # Left padding and pruning keep the continuation at the end: positions L'-n-1 .. L'-2 predict it.
            step = np.asarray(logits[r, -n - 1 : -1], np.float64)
            logp = step - step.max(axis=-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))
            target = ids[-n:]
            results.append(
                (float(logp[np.arange(n), target].sum()), bool((step.argmax(-1) == target).all()))
            )
        return results
