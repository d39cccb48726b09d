"""What visual-token pruning costs in accuracy, on the shipped demo model.

    python benchmarks/accuracy.py [--model DIR] [--n 500] [--keeps 576,192,128,64,32,16]

Test-split questions of `zspa_jax.demo.scenes` (types balanced), one-word answers scored
by greedy argmax at the answer position, for every pruning method x budget K x prompt
scope. Methods: ZSPAPrune at core ratios 0.2 / 0.4 / 0.6 / 0.8 and "auto", relevance-only
top-K (r = 1), DivPrune (r = 0), CDPruner, random, uniform, and the model-internal
methods VisPruner, VisionZip, pool (adaptive average pooling of the 24 x 24 token grid to
h' x w' = K), FastV and DART (both inside the LLM at layer K = 1: the demo decoder has 2
layers), which run through `zspa_jax.forward(prune=PruneConfig(..., prompt_scope=scope))`.
For the merging methods (VisionZip, pool) the "kept" tokens of the recall column are the
slots their tokens take (VisionZip: the dominant patches and the contextual targets; pool:
each window's centre patch). Prompt scopes: "question" (the text after the image span:
the question and "assistant :") and "all_text" (also the system line and "user :");
special tokens never count. Scope does not change prompt-agnostic methods, so they are
run once and listed under both. DART is prompt-aware: its text pivots are the prompt
tokens of the scope (the library passes the scope's prompt mask to in-LLM methods), so it
runs in both scopes; FastV reads the last position's attention and is agnostic.

Besides accuracy, "target recall" is reported for object questions: the fraction whose
kept tokens include at least one patch at least half covered by the object the answer
depends on. It says whether a method finds the object, whatever the LLM then does.

Pruning is composed from the model pieces (the same path `forward(prune=...)` takes):
tower + projector once per image -> `zspa_jax.pruning.select_tokens` -> gather the kept
tokens -> they replace the 576 placeholders, positions renumbered contiguously -> LLaMA
decoder under `jax.jit` over the `nnx.split` state. If `zspa_jax.forward` accepts
`prune=`, a spot check asserts that both paths give the same answers.

Cost per method (scope "question", the benchmark's batch of 50, median of several timed
calls after a warm-up compile, `jax.block_until_ready`): the method's own selection time,
i.e. `select_tokens` under `jax.jit` (which skips its host-side finiteness check) for the
embedding-level methods and, for VisPruner and VisionZip, their kernels on the tower's
feature-layer hidden states and [CLS] attention (computed once, not timed), and for pool
its kernel `zspa_jax.methods.pool.pool_tokens` on the projected tokens. The selection of
FastV and DART cannot be separated from the LLM, so their rows are the LLM prefill with
the method (layers < K on all 576 visual tokens, the rest on K; DART's GFLOPs add its
selection, `method_flops("dart", ...)`, FastV's is free), next to the plain LLM prefill
on a prompt holding K visual tokens and on the unpruned one. FLOPs come from
`zspa_jax.estimate` (`method_flops`, `llm_prefill_flops`, `fastv_prefill_flops`). The
machine's load average is recorded at the start, after the cost section and at the end.

Writes benchmarks/results/accuracy.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import zspa_jax  # noqa: E402
from models.layers import placeholder_slots  # noqa: E402
from zspa_jax import estimate as est  # noqa: E402
from zspa_jax import pruning  # noqa: E402
from zspa_jax.demo import DEMO_MODEL_DIR as ASSET_DIR  # noqa: E402
from zspa_jax.demo import scenes  # noqa: E402
from zspa_jax.demo.data import patch_coverage  # noqa: E402
from zspa_jax.demo.tokenizer import PAD_ID, FastEncoder  # noqa: E402
from zspa_jax.methods import get_method  # noqa: E402
from zspa_jax.methods.pool import pool_tokens  # noqa: E402
from zspa_jax.methods.visionzip import visionzip_merge  # noqa: E402
from zspa_jax.methods.vispruner import vispruner_select  # noqa: E402
from zspa_jax.prefill import prefill_pruned_at_layer, pruned_gather_index  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = (  # table order
    "zspaprune r=0.2",
    "zspaprune r=0.4",
    "zspaprune r=0.6",
    "zspaprune r=0.8",
    "zspaprune r=auto",
    "relevance",
    "cdpruner",
    "divprune",
    "random",
    "uniform",
    "vispruner",
    "visionzip",
    "pool",
    "fastv K=1",
    "dart K=1",
)
PROMPT_AWARE = (
    "zspaprune r=0.2",
    "zspaprune r=0.4",
    "zspaprune r=0.6",
    "zspaprune r=0.8",
    "zspaprune r=auto",
    "relevance",
    "cdpruner",
    "dart K=1",
)
# Need model internals (a tower layer, merged tokens, the LLM's attention): run through forward().
MODEL_LABELS = ("vispruner", "visionzip", "pool", "fastv K=1", "dart K=1")
LLM_LABELS = ("fastv K=1", "dart K=1")  # select inside the LLM: their cost is a prefill row
AGNOSTIC = tuple(m for m in METHODS if m not in PROMPT_AWARE)
SCOPES = ("question", "all_text")


def method_args(label: str) -> dict:
    if label.startswith("zspaprune"):
        r = label.split("=")[1]
        return {"method": "zspaprune", "core_ratio": r if r == "auto" else float(r)}
    if label.startswith(("fastv", "dart")):  # "<method> K=<layer>"
        return {"method": label.split()[0], "layer": int(label.split("=")[1])}
    return {"method": label}


class Evaluator:
    """Pruned greedy answers from cached visual tokens."""

    def __init__(self, vlm, exs, batch: int, keep_positions: bool = False):
        self.vlm = vlm
        self.exs = exs
        self.batch = batch
        self.enc = FastEncoder(vlm.processor.tokenizer if vlm.processor is not None else None)
        self.head = np.asarray(self.enc.head, np.int32)  # <s> + system line + "user :"
        self.specials = set(self.enc.tokenizer.all_special_ids)
        qs = [self.enc.question_ids(e.qa.question) for e in exs]
        self.q_width = max(len(q) for q in qs)
        self.q_ids = np.full((len(exs), self.q_width), PAD_ID, np.int32)
        self.q_len = np.zeros(len(exs), np.int32)
        for i, q in enumerate(qs):
            self.q_ids[i, : len(q)] = q
            self.q_len[i] = len(q)
        table = np.asarray(vlm.model.language_model.model.embed_tokens.embedding[...], np.float32)
        self.table = table
        # Prompt token sets per scope (ids and mask), padded to a common width.
        self.prompt = {}
        for scope in SCOPES:
            rows = []
            for i in range(len(exs)):
                q = list(self.q_ids[i, : self.q_len[i]])
                ids = q if scope == "question" else list(self.head) + q
                rows.append([t for t in ids if t not in self.specials])
            width = max(len(r) for r in rows)
            ids = np.zeros((len(rows), width), np.int32)
            mask = np.zeros((len(rows), width), bool)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = r
                mask[i, : len(r)] = True
            self.prompt[scope] = (table[ids], mask)
        self.visual = self._visual_tokens()
        self.coverage = [patch_coverage(e.scene) for e in exs]  # [576, n_objects] each
        self.id_to_word = {i: w for w, i in self.enc.vocab.items()}
        self._answer = jax.jit(_answer_fn, static_argnums=(0, 1))
        self.keep_positions = keep_positions

    def _visual_tokens(self) -> np.ndarray:
        fn = jax.jit(lambda g, s, px: nnx.merge(g, s).image_features(px), static_argnums=0)
        out, pixels = [], []
        for s in tqdm(range(0, len(self.exs), self.batch), desc="visual tokens", leave=False):
            chunk = self.exs[s : s + self.batch]
            px = np.zeros((self.batch, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), np.float32)
            for r, e in enumerate(chunk):
                px[r] = self.enc.pixels(e.image())
            pixels.append(px[: len(chunk)])
            out.append(np.asarray(fn(self.vlm.graphdef, self.vlm.state, px))[: len(chunk)])
        self.pixels = np.concatenate(pixels)
        return np.concatenate(out)

    def model_method(
        self, label: str, keep: int, scope: str = "question"
    ) -> tuple[np.ndarray, list[str]]:
        """(kept indices or slots [n, K], answers) from `zspa_jax.forward(prune=...)`, batched
        with left padding at one width so each (method, K) compiles once. `scope` is the
        config's prompt_scope (read by the prompt-aware ones, e.g. DART's text pivots)."""
        prompts = [self.enc.prompt_ids(e.qa.question) for e in self.exs]
        width = max(len(p) for p in prompts)
        cfg = pruning.PruneConfig(keep=keep, prompt_scope=scope, **method_args(label))
        kept_all, words = [], []
        for s in range(0, len(self.exs), self.batch):
            rows = prompts[s : s + self.batch]
            count = len(rows)
            rows = rows + [rows[0]] * (self.batch - count)  # fixed batch: pad with copies
            ids = np.full((self.batch, width), PAD_ID, np.int32)
            mask = np.zeros((self.batch, width), np.int32)
            for r, p in enumerate(rows):
                ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
            px = self.pixels[s : s + self.batch]
            px = np.concatenate([px, np.repeat(px[:1], self.batch - count, axis=0)])
            logits, kept = zspa_jax.forward(
                self.vlm,
                ids,
                px,
                mask,
                prune=cfg,
                keep_positions=self.keep_positions,
                return_kept=True,
            )
            kept_all.append(kept[:count])
            words.extend(self.id_to_word[int(t)] for t in np.argmax(logits[:count, -1], axis=-1))
        return np.concatenate(kept_all), words

    def select(self, label: str, scope: str, keep: int, seed: int = 0) -> np.ndarray:
        n = self.visual.shape[1]
        if keep == n:
            return np.broadcast_to(np.arange(n, dtype=np.int32), (len(self.exs), n))
        prompt, mask = self.prompt[scope]
        out = []
        key = jax.random.key(seed)
        for s in range(0, len(self.exs), self.batch):
            key, sub = jax.random.split(key)
            idx = pruning.select_tokens(
                jnp.asarray(self.visual[s : s + self.batch]),
                jnp.asarray(prompt[s : s + self.batch]),
                jnp.asarray(mask[s : s + self.batch]),
                keep=keep,
                rng=sub,
                **method_args(label),
            )
            out.append(np.asarray(idx))
        return np.concatenate(out)

    def auto_ratios(self, scope: str, keep: int) -> dict:
        prompt, mask = self.prompt[scope]
        r = np.concatenate(
            [
                np.asarray(
                    pruning.auto_core_ratio(
                        jnp.asarray(self.visual[s : s + self.batch]),
                        jnp.asarray(prompt[s : s + self.batch]),
                        jnp.asarray(mask[s : s + self.batch]),
                        keep=keep,
                    )
                )
                for s in range(0, len(self.exs), self.batch)
            ]
        )
        return {"mean": float(r.mean()), "zero": float((r == 0).mean()), "max": float(r.max())}

    def answers(self, indices: np.ndarray) -> list[str]:
        words = []
        for s in range(0, len(self.exs), self.batch):
            sl = slice(s, s + self.batch)
            kept = np.take_along_axis(self.visual[sl], indices[sl][:, :, None], axis=1)
            q, qlen = self.q_ids[sl], self.q_len[sl]
            idx = indices[sl]
            pad = self.batch - kept.shape[0]
            if pad:
                kept = np.concatenate([kept, np.zeros((pad,) + kept.shape[1:], kept.dtype)])
                idx = np.concatenate([idx, np.zeros((pad, idx.shape[1]), idx.dtype)])
                q = np.concatenate([q, np.full((pad, q.shape[1]), PAD_ID, np.int32)])
                qlen = np.concatenate([qlen, np.ones(pad, np.int32)])
            n_visual = self.visual.shape[1]
            pos = np.asarray(idx, np.int32) if self.keep_positions else None
            pred = self._answer(
                self.vlm.graphdef, n_visual, self.vlm.state, self.head, kept, q, qlen - 1, pos
            )
            words.extend(
                self.id_to_word[int(t)]
                for t in np.asarray(pred)[: min(self.batch, len(self.exs) - s)]
            )
        return words

    def target_recall(self, indices: np.ndarray) -> float | None:
        hits = []
        for i, e in enumerate(self.exs):
            if e.qa.target is None:
                continue
            on = self.coverage[i][:, e.qa.target] >= 0.5
            hits.append(bool(on[indices[i]].any()))
        return float(np.mean(hits)) if hits else None


def _answer_fn(graphdef, n_visual, state, head, kept, q_ids, last, kept_positions):
    """Greedy next token after [head | kept visual | question], right-padded; positions
    contiguous, or original when `kept_positions` (int [B, K] indices) is given."""
    model = nnx.merge(graphdef, state)
    b = kept.shape[0]
    lm = model.language_model
    embeds = jnp.concatenate(
        [
            lm.embed(jnp.broadcast_to(head, (b, head.shape[0]))),
            kept.astype(jnp.float32),
            lm.embed(q_ids),
        ],
        axis=1,
    )
    length = embeds.shape[1]
    if kept_positions is None:  # contiguous renumbering (the library default)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    else:  # original RoPE positions (`keep_positions=True`): the library's own gather index
        image_id = model.config.image_token_index
        full_ids = jnp.concatenate(
            [
                jnp.broadcast_to(head, (b, head.shape[0])),
                jnp.full((b, n_visual), image_id, jnp.int32),
                q_ids,
            ],
            axis=1,
        )
        slots = placeholder_slots(full_ids, image_id, n_visual)
        positions, _ = pruned_gather_index(
            slots, jnp.take_along_axis(slots, kept_positions, axis=1), full_ids.shape[1]
        )
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    hidden, _ = lm.model(embeds, positions, mask)
    at = head.shape[0] + kept.shape[1] + last
    h = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]
    return jnp.argmax(lm.logits(h), axis=-1)


def _median_ms(fn, *args, repeats: int) -> float:
    """Median wall time of fn(*args) in ms, after one untimed call (the compile)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def method_costs(vlm, ev: Evaluator, keeps: list[int], repeats: int) -> dict:
    """Selection time and FLOPs per method and K on the first batch (scope "question"),
    plus the LLM prefill on the pruned prompt, on the unpruned one and with each in-LLM
    method (FastV, DART)."""
    b, n = ev.batch, ev.visual.shape[1]
    cfg = vlm.model.config
    text_cfg = cfg.text
    visual = jnp.asarray(ev.visual[:b])
    prompt, mask = (jnp.asarray(x[:b]) for x in ev.prompt["question"])
    t_prompt = prompt.shape[1]  # the padded width is what the kernels run over
    rng = jax.random.key(0)
    # Tower outputs for the [CLS]-attention methods, computed once (the tower runs anyway).
    index = vlm.model.cls_feature_index()
    tower = jax.jit(
        lambda g, s, px: nnx.merge(g, s).vision_tower.hidden_states(
            px, num_layers=index, cls_attention_layer=index - 1
        ),
        static_argnums=0,
    )
    states, cls = tower(vlm.graphdef, vlm.state, jnp.asarray(ev.pixels[:b]))
    hidden = states[index]
    width = hidden.shape[-1]
    batching = pruning.default_batching()
    # LLM prefill programs: [head | visual | question] + the head's logits at the last position.
    t_text = len(ev.head) + ev.q_width
    q = jnp.asarray(ev.q_ids[:b])
    head = jnp.broadcast_to(jnp.asarray(ev.head), (b, len(ev.head)))
    # Scope "question" for the in-LLM methods (DART's text pivots): the non-special tokens after the span.
    q_text = ~np.isin(ev.q_ids[:b], np.asarray(sorted(ev.specials), np.int32))
    text_mask = jnp.asarray(np.concatenate([np.zeros((b, len(ev.head) + n), bool), q_text], axis=1))
    key_dim = (
        text_cfg.num_key_value_heads * text_cfg.head_dim
    )  # DART's keys: layer K-1's KV heads, concatenated

    def embeds_of(model, kept):
        lm = model.language_model
        return jnp.concatenate([lm.embed(head), kept, lm.embed(q)], axis=1)

    def plain(g, s, kept):
        model = nnx.merge(g, s)
        embeds = embeds_of(model, kept)
        length = embeds.shape[1]
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
        hid, _ = model.language_model.model(embeds, positions, causal)
        return model.language_model.logits(hid[:, -1])

    def with_llm_method(g, s, kept, name, keep, layer):
        model = nnx.merge(g, s)
        embeds = embeds_of(model, kept)
        length = embeds.shape[1]
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        out = prefill_pruned_at_layer(
            model.language_model.model,
            embeds,
            positions,
            jnp.ones((b, length), jnp.int32),
            method=get_method(name),
            layer=layer,
            keep=keep,
            visual_index=jnp.broadcast_to(head.shape[0] + jnp.arange(n, dtype=jnp.int32), (b, n)),
            visual_valid=None,
            text_mask=text_mask,
        )
        return model.language_model.logits(out.hidden[:, -1])

    plain_jit = jax.jit(plain, static_argnums=0)
    llm_method_jit = jax.jit(with_llm_method, static_argnums=(0, 3, 4, 5))
    g, st = vlm.graphdef, vlm.state
    grid = jnp.full((b, 2), round(n**0.5), jnp.int32)  # the demo's square token grid (pool)
    cost: dict = {
        "batch": b,
        "repeats": repeats,
        "selection": {},
        "llm_prefill": {},
        "llm_method_prefill": {},
        "load_average": {"start": list(os.getloadavg())},
    }
    for keep in tqdm([k for k in keeps if k != n], desc="cost", leave=False):
        zero_share = ev.auto_ratios("question", keep)["zero"]
        for label in METHODS:
            args = method_args(label)
            method = args["method"]
            if label in LLM_LABELS:
                continue  # its cost is its LLM prefill below
            if method == "vispruner":
                ms = _median_ms(
                    lambda f, a: vispruner_select(f, a, keep=keep, batching=batching),
                    hidden[:, 1:],
                    cls.probs[:, 1:],
                    repeats=repeats,
                )
                flops = est.method_flops(method, n, width, keep, 0)
            elif method == "visionzip":
                ms = _median_ms(
                    lambda h, a, k: visionzip_merge(h, a, k, keep=keep, batching=batching),
                    hidden,
                    cls.probs,
                    cls.keys,
                    repeats=repeats,
                )
                flops = est.method_flops(method, n, width, keep, 0, key_dim=cls.keys.shape[-1])
            elif method == "pool":
                pool = jax.jit(
                    lambda v, gr: pool_tokens(v, gr, keep=keep)
                )  # traced grid: no host check
                ms = _median_ms(pool, visual, grid, repeats=repeats)
                flops = est.method_flops(method, n, visual.shape[-1], keep, t_prompt)
            else:
                select = jax.jit(
                    lambda v, p, m, r: pruning.select_tokens(v, p, m, keep=keep, rng=r, **args)
                )
                ms = _median_ms(select, visual, prompt, mask, rng, repeats=repeats)
                flops = est.method_flops(
                    method,
                    n,
                    visual.shape[-1],
                    keep,
                    t_prompt,
                    {k: v for k, v in args.items() if k != "method"},  # the method's options
                    auto_zero_share=zero_share,
                )
            cost["selection"].setdefault(label, {})[str(keep)] = {
                "ms": ms,
                "gflops": b * flops / 1e9,
            }
        kept = visual[:, :keep]
        cost["llm_prefill"][str(keep)] = {
            "ms": _median_ms(plain_jit, g, st, kept, repeats=repeats),
            "gflops": b * est.llm_prefill_flops(text_cfg, t_text + keep) / 1e9,
        }
        for label in LLM_LABELS:
            name, layer = method_args(label)["method"], method_args(label)["layer"]
            select_flops = est.method_flops(
                name, n, text_cfg.hidden_size, keep, t_text, key_dim=key_dim
            )
            cost["llm_method_prefill"].setdefault(label, {})[str(keep)] = {
                "ms": _median_ms(
                    lambda g_, s_, v_: llm_method_jit(g_, s_, v_, name, keep, layer),
                    g,
                    st,
                    visual,
                    repeats=repeats,
                ),
                "gflops": b
                * (est.fastv_prefill_flops(text_cfg, t_text, n, keep, layer) + select_flops)
                / 1e9,
                "selection_gflops": b * select_flops / 1e9,
            }
    cost["llm_prefill"][str(n)] = {
        "ms": _median_ms(plain_jit, g, st, visual, repeats=repeats),
        "gflops": b * est.llm_prefill_flops(text_cfg, t_text + n) / 1e9,
    }
    cost["text_tokens"] = t_text
    cost["load_average"]["end"] = list(os.getloadavg())
    return cost


def score(exs, answers) -> dict:
    correct = np.array([a == e.qa.answer for e, a in zip(exs, answers)])
    types = np.array([e.qa.qtype for e in exs])
    groups = np.array([scenes.TYPE_GROUPS[t] for t in types])
    return {
        "overall": float(correct.mean()),
        "per_type": {
            t: float(correct[types == t].mean())
            for t in scenes.QUESTION_TYPES
            if (types == t).any()
        },
        "per_group": {
            g: float(correct[groups == g].mean())
            for g in dict.fromkeys(scenes.TYPE_GROUPS.values())
        },
    }


def forward_supports_prune() -> bool:
    import inspect

    return "prune" in inspect.signature(zspa_jax.forward).parameters


def spot_check_forward(vlm, ev: Evaluator, results: dict, n: int = 20) -> dict | None:
    """Answers from `zspa_jax.forward(..., prune=PruneConfig(...))` vs this script's path."""
    if not forward_supports_prune():
        return None
    PruneConfig = getattr(zspa_jax, "PruneConfig", pruning.PruneConfig)
    exs = ev.exs[:n]
    pruned = [k for k in results["keeps"] if k != results["visual_tokens"]]
    if not pruned:
        return None
    agree = {}
    checks = (
        ("zspaprune r=0.6", "question", 64),
        ("divprune", "question", 64),
        ("relevance", "all_text", 32),
    )
    for label, scope, preferred in checks:
        keep = (
            preferred if preferred in pruned else min(pruned)
        )  # the grid given by --keeps may lack it
        cfg = PruneConfig(keep=keep, prompt_scope=scope, **method_args(label))
        kwargs = {"keep_positions": True} if ev.keep_positions else {}
        mine = results["answers"][scope][label][str(keep)][:n]
        theirs = []
        for e in exs:
            ids = np.asarray([ev.enc.prompt_ids(e.qa.question)], np.int32)
            px = ev.enc.pixels(e.image())[None]
            logits = zspa_jax.forward(vlm, ids, px, prune=cfg, **kwargs)
            theirs.append(ev.id_to_word[int(np.argmax(np.asarray(logits)[0, -1]))])
        agree[f"{label} / {scope} / K={keep}"] = float(
            np.mean([a == b for a, b in zip(mine, theirs)])
        )
    return agree


# --------------------------------------------------------------------------- reporting


def markdown(res: dict) -> str:
    keeps = res["keeps"]
    n_vis = res["visual_tokens"]
    lines = [
        "# Accuracy under visual-token pruning (demo model, shapes VQA)",
        "",
        f"Model: `{res['model']}` ({res['parameters']:,} parameters, {n_vis} visual tokens per image). "
        f'{res["n"]} test questions (`zspa_jax.demo.scenes`, split "test", types balanced), greedy one-word '
        f"answers. Positions of kept tokens: {res.get('positions', 'contiguous (default)')}. Machine: {res['machine']}. "
        f"Run time {res['seconds']:.0f} s.{load_note(res)}",
        "",
        f"Unpruned accuracy (K = {n_vis}): **{res['unpruned']['overall']:.3f}**; per type: "
        + ", ".join(f"{t} {v:.2f}" for t, v in res["unpruned"]["per_type"].items()),
        "",
    ]
    for scope in SCOPES:
        lines += [f"## Accuracy, prompt scope = `{scope}`", ""]
        lines.append(
            "| method | "
            + " | ".join(f"K={k} ({100 * (1 - k / n_vis):.0f}% pruned)" for k in keeps)
            + " |"
        )
        lines.append("|---" * (len(keeps) + 1) + "|")
        for label in METHODS:
            row = [f"{res['accuracy'][scope][label][str(k)]['overall']:.3f}" for k in keeps]
            best = [
                max(res["accuracy"][scope][m][str(k)]["overall"] for m in METHODS) for k in keeps
            ]
            row = [
                f"**{r}**" if float(r) == b and k != n_vis else r
                for r, b, k in zip(row, best, keeps)
            ]
            lines.append(
                f"| {label}{' *' if label in AGNOSTIC else ''} | " + " | ".join(row) + " |"
            )
        lines += ["", "\\* prompt-agnostic: identical in both scopes.", ""]
    for scope in SCOPES:
        lines += [f"## Target-object recall (object questions), scope = `{scope}`", ""]
        lines.append("| method | " + " | ".join(f"K={k}" for k in keeps) + " |")
        lines.append("|---" * (len(keeps) + 1) + "|")
        for label in METHODS:
            vals = [res["target_recall"][scope][label][str(k)] for k in keeps]
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        lines.append("")
    for k in res["detail_keeps"]:
        lines += [f"## Per question type at K = {k}, scope = `question`", ""]
        types = list(res["unpruned"]["per_type"])
        lines.append("| method | " + " | ".join(types) + " |")
        lines.append("|---" * (len(types) + 1) + "|")
        lines.append(
            "| unpruned | "
            + " | ".join(f"{res['unpruned']['per_type'][t]:.2f}" for t in types)
            + " |"
        )
        for label in METHODS:
            pt = res["accuracy"]["question"][label][str(k)]["per_type"]
            lines.append(f"| {label} | " + " | ".join(f"{pt[t]:.2f}" for t in types) + " |")
        lines.append("")
    if res.get("cost"):
        lines += cost_markdown(res)
    if res.get("forward_spot_check"):
        lines += ["## Cross-check against `zspa_jax.forward(..., prune=...)`", ""]
        for k, v in res["forward_spot_check"].items():
            lines.append(
                f"- {k}: answers agree on {100 * v:.0f}% of {res['spot_check_n']} questions"
            )
        lines.append("")
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def load_note(res: dict) -> str:
    """ " Load average ..." sentence from res["load_average"] (absent in older results: "")."""
    load = res.get("load_average")
    if not load:
        return ""
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    return (
        f" Load average (1/5/15 min) at start {fmt(load['start'])}, after the cost section {fmt(load['after_cost'])}, "
        f"at end {fmt(load['end'])}, on {os.cpu_count()} cores: the machine was shared with other work, so run "
        "time and the timing columns are noisier than on a quiet machine (accuracy is deterministic)."
    )


def cost_markdown(res: dict) -> list[str]:
    c = res["cost"]
    n_vis = res["visual_tokens"]
    keeps = [k for k in res["keeps"] if k != n_vis]
    cell = lambda v: f"{v['ms']:.2f} ms / {v['gflops']:.3f}"  # noqa: E731
    lines = [
        f"## Cost per method: time (ms) / GFLOPs per batch of {c['batch']}, scope `question`",
        "",
        f"Time: median of {c['repeats']} calls after a warm-up compile, `jax.block_until_ready`, on {res['machine']} "
        "(shared with other work, so expect some noise). GFLOPs: `zspa_jax.estimate` (matrix products, 2 x MACs). "
        "Selection rows: the method's own selection only (`select_tokens` under `jax.jit`; VisPruner and "
        "VisionZip: their kernels on the tower's hidden states and [CLS] attention; pool: `pool_tokens` on the "
        "projected tokens). FastV and DART select inside the LLM, so each has its own prefill row instead "
        "(DART's GFLOPs include its selection, FastV's is free). The last rows are what the selection saves: "
        f"the LLM prefill ({res['cost']['text_tokens']} text tokens + K visual, LM head on the last position)."
        + cost_load_note(c),
        "",
        "| method | " + " | ".join(f"K={k}" for k in keeps) + " |",
        "|---" * (len(keeps) + 1) + "|",
    ]
    for label, row in c["selection"].items():
        lines.append(f"| {label} | " + " | ".join(cell(row[str(k)]) for k in keeps) + " |")
    full = c["llm_prefill"][str(n_vis)]
    lines.append(
        "| LLM prefill, K visual tokens | "
        + " | ".join(cell(c["llm_prefill"][str(k)]) for k in keeps)
        + " |"
    )
    for label, row in c["llm_method_prefill"].items():
        lines.append(
            f"| LLM prefill with {label} | " + " | ".join(cell(row[str(k)]) for k in keeps) + " |"
        )
    lines += ["", f"Unpruned LLM prefill (K = {n_vis}): {cell(full)}."]
    for label, row in c["llm_method_prefill"].items():
        if any(v.get("selection_gflops") for v in row.values()):
            lines[-1] += (
                f" {label} selection, within its prefill row: "
                + ", ".join(f"K={k} {row[str(k)]['selection_gflops']:.3f}" for k in keeps)
                + " GFLOPs."
            )
    lines.append("")
    return lines


def cost_load_note(c: dict) -> str:
    load = c.get("load_average")
    if not load:
        return ""
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    return f" Load average (1/5/15 min) while timing: {fmt(load['start'])} at the start, {fmt(load['end'])} at the end."


PALETTE = {
    "zspaprune r=0.2": (255, 170, 170),
    "zspaprune r=0.4": (240, 110, 110),
    "zspaprune r=0.6": (220, 30, 30),
    "zspaprune r=0.8": (140, 0, 0),
    "relevance": (240, 140, 0),
    "divprune": (30, 90, 220),
    "random": (120, 120, 120),
    "uniform": (30, 160, 60),
    "zspaprune r=auto": (200, 0, 160),
    "cdpruner": (0, 170, 170),
    "vispruner": (150, 100, 40),
    "visionzip": (110, 60, 200),
    "pool": (100, 200, 0),
    "fastv K=1": (0, 0, 0),
    "dart K=1": (230, 120, 200),
}


def plot(res: dict, path: Path) -> None:
    """Accuracy vs K (log x axis), one panel per scope; drawn with PIL (no matplotlib here)."""
    from PIL import Image, ImageDraw, ImageFont

    keeps = sorted(res["keeps"])
    font = ImageFont.load_default()
    pw, ph, margin = 520, 380, 60
    legend_w = 190
    img = Image.new("RGB", (2 * pw + legend_w + 20, ph + 70), "white")
    d = ImageDraw.Draw(img)
    lo = min(
        res["accuracy"][s][m][str(k)]["overall"] for s in SCOPES for m in METHODS for k in keeps
    )
    y0 = max(0.0, np.floor(lo * 10) / 10 - 0.05)
    lx0, lx1 = np.log(keeps[0]), np.log(keeps[-1])
    for p, scope in enumerate(SCOPES):
        ox = p * pw
        left, right, top, bottom = ox + margin, ox + pw - 20, 40, ph
        d.text((left, 12), f"prompt scope = {scope}", fill="black", font=font)
        d.rectangle([left, top, right, bottom], outline="black")
        fx = lambda k: left + (np.log(k) - lx0) / (lx1 - lx0) * (right - left)
        fy = lambda a: bottom - (a - y0) / (1.0 - y0) * (bottom - top)
        for t in np.arange(np.ceil(y0 * 10) / 10, 1.0001, 0.1):
            y = fy(t)
            d.line([left, y, right, y], fill=(225, 225, 225))
            d.text((left - 30, y - 6), f"{t:.1f}", fill="black", font=font)
        for k in keeps:
            x = fx(k)
            d.line([x, top, x, bottom], fill=(235, 235, 235))
            d.text((x - 8, bottom + 6), str(k), fill="black", font=font)
        d.text(
            ((left + right) / 2 - 60, bottom + 22),
            "visual tokens kept (K, log)",
            fill="black",
            font=font,
        )
        d.text((ox + 6, top - 16), "accuracy", fill="black", font=font)
        for label in METHODS:
            pts = [(fx(k), fy(res["accuracy"][scope][label][str(k)]["overall"])) for k in keeps]
            width = 3 if label in ("zspaprune r=0.6", "divprune") else 2
            d.line(pts, fill=PALETTE[label], width=width)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=PALETTE[label])
    lx = 2 * pw + 10
    d.text((lx, 40), "method", fill="black", font=font)
    for i, label in enumerate(METHODS):
        y = 62 + 20 * i
        d.line([lx, y + 6, lx + 26, y + 6], fill=PALETTE[label], width=3)
        d.text((lx + 32, y), label, fill="black", font=font)
    d.text((lx, 62 + 20 * len(METHODS) + 10), f"n = {res['n']} questions", fill="black", font=font)
    img.save(path)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=str(ASSET_DIR), help="converted demo model (default: the shipped one)"
    )
    parser.add_argument("--n", type=int, default=500, help="test questions (default 500)")
    parser.add_argument("--keeps", default="576,192,128,64,32,16")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--no-spot-check", action="store_true")
    parser.add_argument(
        "--cost-repeats", type=int, default=7, help="timed calls per method and K (median)"
    )
    parser.add_argument(
        "--keep-positions",
        action="store_true",
        help="kept tokens keep their original RoPE positions (default: renumbered contiguously); "
        "results go to accuracy_keep_positions.{md,json,png}",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    load = {"start": list(os.getloadavg())}
    vlm = zspa_jax.load(args.model)
    exs = scenes.examples("test", args.n)
    keeps = sorted({int(k) for k in args.keeps.split(",")}, reverse=True)
    ev = Evaluator(vlm, exs, args.batch, keep_positions=args.keep_positions)
    n_vis = ev.visual.shape[1]
    cost = method_costs(vlm, ev, keeps, args.cost_repeats)  # first, before the long accuracy loop
    load["after_cost"] = list(os.getloadavg())
    print("cost per method measured")
    res: dict = {
        "model": str(
            Path(args.model).relative_to(ROOT)
            if Path(args.model).resolve().is_relative_to(ROOT)
            else args.model
        ),
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(vlm.state))),
        "visual_tokens": n_vis,
        "n": len(exs),
        "keeps": keeps,
        "detail_keeps": [k for k in (64, 16) if k in keeps],
        "machine": f"{platform.machine()} CPU x{os.cpu_count()}, jax {jax.__version__} ({jax.default_backend()})",
        "positions": "original (keep_positions=True)"
        if args.keep_positions
        else "contiguous (default)",
        "accuracy": {s: {m: {} for m in METHODS} for s in SCOPES},
        "target_recall": {s: {m: {} for m in METHODS} for s in SCOPES},
        "answers": {s: {m: {} for m in METHODS} for s in SCOPES},
    }
    full = ev.select("uniform", "question", n_vis)
    full_answers = ev.answers(full)
    res["unpruned"] = score(exs, full_answers)
    print(f"unpruned accuracy {res['unpruned']['overall']:.3f}")
    jobs = [
        (s, m, k)
        for k in keeps
        if k != n_vis
        for m in METHODS
        for s in SCOPES
        if s == "question" or m in PROMPT_AWARE
    ]
    auto_r = {}
    for scope, label, keep in tqdm(jobs, desc="pruned runs"):
        if label in MODEL_LABELS:
            idx, answers = ev.model_method(label, keep, scope)
        else:
            idx = ev.select(label, scope, keep, seed=args.seed)
            answers = ev.answers(idx)
        if label == "zspaprune r=auto":
            auto_r[f"{scope} K={keep}"] = ev.auto_ratios(scope, keep)
        scopes = SCOPES if label in AGNOSTIC else (scope,)
        for s in scopes:
            res["accuracy"][s][label][str(keep)] = score(exs, answers)
            res["target_recall"][s][label][str(keep)] = ev.target_recall(idx)
            res["answers"][s][label][str(keep)] = answers
    for s in SCOPES:
        for label in METHODS:
            res["accuracy"][s][label][str(n_vis)] = res["unpruned"]
            res["target_recall"][s][label][str(n_vis)] = ev.target_recall(full)
            res["answers"][s][label][str(n_vis)] = full_answers
    res["auto_core_ratio"] = auto_r
    res["cost"] = cost
    res["notes"] = [
        "zspaprune r=auto: mean chosen r (share of questions with r = 0) per scope and K: "
        + "; ".join(f"{k} {v['mean']:.2f} ({100 * v['zero']:.0f}%)" for k, v in auto_r.items())
    ]
    if not args.no_spot_check:
        res["spot_check_n"] = min(20, len(exs))
        res["forward_spot_check"] = spot_check_forward(vlm, ev, res, n=res["spot_check_n"])
    res["seconds"] = time.perf_counter() - start
    load["end"] = list(os.getloadavg())
    res["load_average"] = load
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers = res.pop("answers")
    stem = "accuracy_keep_positions" if args.keep_positions else "accuracy"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    plot(res, out / f"{stem}.png")
    res["answers"] = answers
    print(markdown(res))
    print(f"wrote {out}/{stem}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
