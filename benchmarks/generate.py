"""Generation benchmark: zspa_jax vs transformers (PyTorch), stage by stage, side by side.

    python benchmarks/generate.py              # full run -> benchmarks/results/generate.{md,json,png}
    python benchmarks/generate.py --quick      # smoke run (keep 576/64, 8 new tokens); prints only unless --out

For each benchmark model (benchmarks/models.py) and keep K in {576, 192, 128, 64}, B = 1,
one realistic prompt (chat template + image + a question, ~40 text tokens), the same f32
weights in both frameworks and the same thread count (torch.set_num_threads = the cores
JAX uses). Stages are timed separately in each framework:

  vision    tower + projector.   JAX: jit(model.image_features).  torch: hf.model.get_image_features.
  prune     ZSPAPrune selection (K < N only). JAX: zspa_jax.select_tokens (jitted).
            torch: tests/support/torch_reference_pruning.select_tokens_vectorised (batched, same
            running-max algorithm; a device-aware copy of it on CUDA).
  prefill   the LLM on the pruned prompt (L' = T + K tokens, exact length, no padding) into a
            KV cache, logits of the last position only. JAX: a jit of the decoder with a
            KVCache of generate's size (round_up(L' + new, 64)); torch:
            hf(inputs_embeds=..., use_cache=True, logits_to_keep=1).
  decode    tokens/s of greedy decoding of `--new-tokens` tokens, EOS disabled.
            JAX: zspa_jax.decode.decode_program (the library's lax.while_loop program, on the
            state from its prefill_program): N steps = N decoder forwards, tokens/s = N / time.
            torch: hf.generate(inputs_embeds=..., max_new_tokens=n, min_new_tokens=n,
            do_sample=False) timed for n = N and n = 1; the difference is N - 1 decoder
            forwards (+ their sampling), tokens/s = (N - 1) / (t_N - t_1): generate's own
            decode loop with the prefill subtracted.
  e2e       the whole call. JAX: zspa_jax.generate(input_ids, pixel_values, prune=...)
            (prompt left-padded to the 64-token bucket as the library does); torch: vision +
            prune + generate(inputs_embeds) in sequence.

Timings are medians over `--repeats` after a warm-up, with the two frameworks' calls
interleaved round-robin so load from other jobs hits both alike. JAX's first call (trace +
compile + run) is reported separately, and the library's compile counter
(zspa_jax.generation.TRACE_COUNTS, plus this script's own jitted stages and select_tokens'
jit cache) is checked to be unchanged across the repeated calls. Peak RSS comes from one
subprocess per framework and model that loads only that framework's model and runs the
e2e call at each keep (HWM reset per keep via /proc/self/clear_refs, keeps ascending):
the first call (JAX: including compilation) and a second, steady-state call.

Decode bandwidth utilisation = (bytes of weights read per token + bytes of KV cache read
per token) x tokens/s / measured memory bandwidth. Weights: every decoder layer, the final
norm, the LM head (the whole tied embedding table for SmolLM2) (zspa_jax.estimate). KV:
JAX reads its whole preallocated cache each step; torch reads the filled part (mean over
the decode). Bandwidth: the best of a large numpy copy (1 thread and one thread per core)
and a jitted `x + 1` over a large array in JAX (the only one that counts on an
accelerator), counting read + write bytes.

The script picks torch's CUDA device when available and JAX's default backend, so it runs
unchanged on a GPU machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/models.py would shadow the repo's `models` package if this directory stayed first.
sys.path[:] = [str(ROOT), str(ROOT / "tests" / "support")] + [
    p for p in sys.path if Path(p or ".").resolve() != HERE
]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _omp_wait_policy() -> str:
    """--torch-omp-wait-policy (read before torch loads OpenMP): "passive" by default.

    torch's OpenMP threads spin-wait between parallel regions by default; on a CPU shared with
    other jobs that spinning fights the other processes and made torch's small matmuls 5x
    slower here (a 109-token SmolLM2 prefill: 3.4 s spinning vs 0.5 s passive, 2 threads).
    JAX's CPU backend does not use OpenMP. "default" leaves OpenMP's own policy."""
    policy = "passive"
    for i, arg in enumerate(sys.argv):
        if arg == "--torch-omp-wait-policy" and i + 1 < len(sys.argv):
            policy = sys.argv[i + 1]
        elif arg.startswith("--torch-omp-wait-policy="):
            policy = arg.split("=", 1)[1]
    if policy not in ("passive", "active", "default"):
        raise SystemExit(
            f"--torch-omp-wait-policy must be passive, active or default, got {policy!r}"
        )
    if policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", policy.upper())
    return policy


_omp_wait_policy()

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import zspa_jax  # noqa: E402
from models.llama import KVCache  # noqa: E402
from zspa_jax import decode, generation  # noqa: E402
from zspa_jax.estimate import estimate  # noqa: E402
from zspa_jax.loading import token_ids  # noqa: E402
from zspa_jax.pipeline import prompt_token_mask  # noqa: E402
from zspa_jax.pruning import PruneConfig, select_tokens  # noqa: E402


def _load_bench_models():
    spec = importlib.util.spec_from_file_location("zspa_bench_models", HERE / "models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zspa_bench_models"] = module
    spec.loader.exec_module(module)
    return module


bench_models = _load_bench_models()

KEEPS = (576, 192, 128, 64)
QUESTION = "Describe the objects in this picture, their colours and where they are."
CORE_RATIO = 0.6
RESULTS = HERE / "results"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
TORCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# ----------------------------------------------------------------------------- small helpers


def log(*args) -> None:
    print(*args, flush=True)


def sync(x: Any = None) -> Any:
    """Wait for asynchronous work: JAX arrays in x, and the CUDA stream when torch uses one."""
    leaves = [leaf for leaf in jax.tree.leaves(x) if isinstance(leaf, jax.Array)]
    if leaves:
        jax.block_until_ready(leaves)
    if TORCH_DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return x


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = sync(fn())
    return time.perf_counter() - t0, out


def interleaved(
    fns: dict[str, tuple[Callable[[], Any] | None, Callable[[Any], Any]]], repeats: int
) -> dict[str, list[float]]:
    """Round-robin timing of already warmed-up functions: {name: (setup, fn)}; setup() runs
    untimed before each call and its result is fn's argument."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (setup, fn) in fns.items():
            arg = setup() if setup is not None else None
            sync(arg)
            dt, out = timed(lambda: fn(arg))
            samples[name].append(dt)
            del out
    return samples


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (2**20 if sys.platform == "darwin" else 1024)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": CORES,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_device": str(TORCH_DEVICE),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_average_start": list(os.getloadavg()),
    }
    if TORCH_DEVICE.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def memory_bandwidth(size_mib: int = 512, repeats: int = 5) -> dict:
    """Copy bandwidth in GB/s (read + write bytes / time, best of `repeats`)."""
    out = {}
    n = size_mib * 2**20 // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    out["numpy_copy_1thread_gbs"] = 2 * src.nbytes / best(lambda: np.copyto(dst, src)) / 1e9
    chunks = np.array_split(np.arange(n), CORES)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if len(c)]

    def threaded():
        threads = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    out["numpy_copy_threads_gbs"] = 2 * src.nbytes / best(threaded) / 1e9
    del src, dst
    # Donated in-place update: a fresh output buffer would also time the page faults of
    # its first touch (about 1 GB/s on a VM), not the memory system.
    holder = [jnp.ones((size_mib * 2**20 // 4,), jnp.float32)]
    add = jax.jit(lambda x: x + 1.0, donate_argnums=0)

    def add_one():
        holder[0] = jax.block_until_ready(add(holder[0]))

    add_one()
    out["jax_add_one_gbs"] = 2 * holder[0].nbytes / best(add_one) / 1e9
    del holder
    if jax.default_backend() == "cpu":
        out["reference_gbs"] = max(
            out["numpy_copy_1thread_gbs"], out["numpy_copy_threads_gbs"], out["jax_add_one_gbs"]
        )
        out["reference"] = "best of the host copies (numpy 1 thread, numpy threads, jax x+1)"
    else:
        out["reference_gbs"] = out["jax_add_one_gbs"]
        out["reference"] = "jax x+1 on the accelerator"
    return out


def synthetic_image(size: int):
    """A deterministic picture with a few coloured shapes (the processor resizes it)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(img)
    s = size / 336
    d.ellipse([30 * s, 40 * s, 130 * s, 140 * s], fill=(200, 30, 30))
    d.rectangle([190 * s, 50 * s, 300 * s, 150 * s], fill=(30, 60, 200))
    d.polygon([(60 * s, 300 * s), (160 * s, 300 * s), (110 * s, 200 * s)], fill=(40, 170, 60))
    d.rectangle([200 * s, 220 * s, 310 * s, 250 * s], fill=(240, 200, 20))
    return img


def build_inputs(bm, processor, question: str) -> dict:
    """input_ids, attention_mask, pixel_values (numpy) for one prompt with the image."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    if getattr(processor, "chat_template", None):
        try:
            text = processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": question}],
                    }
                ],
                add_generation_prompt=True,
            )
        except TypeError:  # a text-only template (SmolLM2's) wants string content
            text = processor.apply_chat_template(
                [{"role": "user", "content": f"{image_token}\n{question}"}],
                add_generation_prompt=True,
            )
    else:
        text = f"{image_token}\n{question}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = processor(text=[text], images=[synthetic_image(bm.image_size)], return_tensors="np")
    ids = np.asarray(batch["input_ids"], np.int32)
    n_image = int((ids == bm.image_token_index).sum())
    if n_image != bm.tokens_per_image:
        raise RuntimeError(
            f"{bm.name}: prompt holds {n_image} image tokens, expected {bm.tokens_per_image}"
        )
    return {
        "text": text,
        "input_ids": ids,
        "attention_mask": np.asarray(batch["attention_mask"], np.int32),
        "pixel_values": np.asarray(batch["pixel_values"], np.float32),
        "image_start": int(np.flatnonzero(ids[0] == bm.image_token_index)[0]),
        "text_tokens": int(ids.shape[1] - n_image),
    }


def special_ids(bm, processor) -> tuple[int, ...]:
    """The ids zspa_jax.load treats as special (never part of the prompt for pruning)."""
    ids = token_ids(Path(bm.zspa_dir), processor)["special_token_ids"]
    return tuple(i for i in ids if i != bm.image_token_index)


def question_mask(inputs: dict, bm, specials) -> np.ndarray:
    mask = prompt_token_mask(
        jnp.asarray(inputs["input_ids"]),
        jnp.asarray(inputs["attention_mask"]),
        bm.image_token_index,
        specials,
        "question",
    )
    return np.asarray(mask)


# ----------------------------------------------------------------------------- torch side


def load_torch(bm):
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlavaForConditionalGeneration.from_pretrained(bm.hf_dir, dtype=torch.float32)
    return model.to(TORCH_DEVICE).eval()


def torch_zspaprune(visual, prompt, prompt_mask, *, keep: int, core_ratio: float = CORE_RATIO):
    """Device-aware copy of tests/support/torch_reference_pruning.select_tokens_vectorised (CUDA path)."""
    visual, prompt = visual.float(), prompt.float()
    bsz, n, _ = visual.shape
    dev = visual.device
    m = prompt_mask.bool()
    k = min(max(math.floor(keep * core_ratio + 0.5), 0), keep)
    vn = visual / visual.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    p = torch.where(m[..., None], prompt, 0.0).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    pn = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    s = torch.einsum("bnd,bd->bn", vn, pn)
    core = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    ar = torch.arange(bsz, device=dev)
    selected = torch.zeros(bsz, n, dtype=torch.bool, device=dev)
    selected[ar[:, None], core] = True
    c = torch.einsum("bnd,bkd->bnk", vn, vn[ar[:, None], core]).amax(-1)
    picks = [core]
    for _ in range(keep - k):
        j = torch.where(selected, math.inf, c).argmin(1)
        selected[ar, j] = True
        c = torch.maximum(c, torch.einsum("bnd,bd->bn", vn, vn[ar, j]))
        picks.append(j[:, None])
    return torch.sort(torch.cat(picks, 1), dim=1).values


def torch_prune_fn():
    if TORCH_DEVICE.type == "cpu":
        from torch_reference_pruning import select_tokens_vectorised

        return select_tokens_vectorised
    return torch_zspaprune


class TorchPipeline:
    def __init__(self, hf, bm, inputs: dict, prompt_mask: np.ndarray):
        self.hf, self.bm = hf, bm
        self.n = bm.tokens_per_image
        self.start = inputs["image_start"]
        self.ids = torch.as_tensor(inputs["input_ids"], dtype=torch.long, device=TORCH_DEVICE)
        self.pixels = torch.as_tensor(inputs["pixel_values"], device=TORCH_DEVICE)
        self.prompt_mask = torch.as_tensor(np.array(prompt_mask), device=TORCH_DEVICE)
        self.prune_impl = torch_prune_fn()
        cfg = hf.config
        self.pad_id = (
            cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
        )
        with torch.inference_mode():
            text_ids = torch.where(self.ids == bm.image_token_index, 0, self.ids)
            self.text_embeds = hf.get_input_embeddings()(text_ids)

    @torch.inference_mode()
    def vision(self):
        feats = self.hf.model.get_image_features(pixel_values=self.pixels).pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    @torch.inference_mode()
    def prune(self, feats, keep: int):
        return self.prune_impl(
            feats, self.text_embeds, self.prompt_mask, keep=keep, core_ratio=CORE_RATIO
        )

    @torch.inference_mode()
    def embeds(self, feats, kept):
        visual = (
            feats
            if kept is None
            else feats[torch.arange(feats.shape[0], device=feats.device)[:, None], kept]
        )
        e = self.text_embeds
        return torch.cat([e[:, : self.start], visual.to(e.dtype), e[:, self.start + self.n :]], 1)

    @torch.inference_mode()
    def prefill(self, embeds):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.hf(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, embeds, new_tokens: int):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.hf.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
        )

    def e2e(self, keep: int, new_tokens: int):
        feats = self.vision()
        kept = None if keep >= self.n else self.prune(feats, keep)
        return self.generate(self.embeds(feats, kept), new_tokens)


def torch_kv_bytes_per_token(prefill_out, length: int) -> int:
    cache = prefill_out.past_key_values
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total // length if total else 0


# ----------------------------------------------------------------------------- JAX side


class JaxStages:
    """The pipeline's pieces as separately jitted programs over (graphdef, state)."""

    def __init__(self, vlm):
        self.vlm = vlm
        self.traces: collections.Counter = collections.Counter()
        graphdef = vlm.graphdef

        def tower(state, pixel_values):
            self.traces["tower"] += 1
            return nnx.merge(graphdef, state).image_features(pixel_values)

        def embed(state, input_ids):
            self.traces["embed"] += 1
            return nnx.merge(graphdef, state).embed_tokens(input_ids)

        def prefill(state, embeds, cache_length):
            self.traces["prefill"] += 1
            lm = nnx.merge(graphdef, state).language_model
            b, length, _ = embeds.shape
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
            causal = jnp.arange(cache_length)[None, None, :] <= jnp.arange(length)[None, :, None]
            cache = KVCache.zeros(lm.config, b, cache_length)
            hidden, cache = lm.model(embeds, positions, causal, cache, 0)
            return lm.logits(hidden[:, -1]), cache

        self.tower = jax.jit(tower)
        self.embed = jax.jit(embed)
        self.prefill = jax.jit(prefill, static_argnames=("cache_length",))


def jax_compile_state() -> dict:
    from zspa_jax.methods.zspaprune import select_fixed_core

    state = {f"generation.{k}": v for k, v in generation.TRACE_COUNTS.items()}
    cache_size = getattr(select_fixed_core, "_cache_size", None)
    if cache_size is not None:
        state["select_tokens_jit_cache"] = cache_size()
    return state


def jax_assemble(text_embeds, visual, start: int, n: int, kept):
    v = visual if kept is None else jnp.take_along_axis(visual, kept[:, :, None], axis=1)
    return jnp.concatenate(
        [text_embeds[:, :start], v.astype(text_embeds.dtype), text_embeds[:, start + n :]], axis=1
    )


class CaptureLibraryCalls:
    """Record the arguments `zspa_jax.generate` passes to its jitted prefill and decode
    programs (decode.prefill_program / decode_program), so the benchmark replays exactly the
    library's programs (same padded inputs, same static settings, no extra compile) without
    re-deriving its private bookkeeping."""

    NAMES = ("prefill_program", "decode_program")

    def __init__(self):
        self.calls: dict[str, tuple[tuple, dict]] = {}

    def __enter__(self):
        self.originals = {name: getattr(generation, name) for name in self.NAMES}
        for name, original in self.originals.items():

            def wrapper(*args, _name=name, _original=original, **kwargs):
                self.calls.setdefault(_name, (args, kwargs))
                return _original(*args, **kwargs)

            setattr(generation, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(generation, name, original)

    def prefill(self):
        """Run the captured prefill again: (DecodeState, kept indices)."""
        args, kwargs = self.calls["prefill_program"]
        return self.originals["prefill_program"](*args, **kwargs)

    def decode(self, state):
        """Run the captured decode program on `state` (which it donates)."""
        args, kwargs = self.calls["decode_program"]
        args = tuple(state if isinstance(a, decode.DecodeState) else a for a in args)
        kwargs = {k: state if isinstance(v, decode.DecodeState) else v for k, v in kwargs.items()}
        return self.originals["decode_program"](*args, **kwargs)

    def static_settings(self):
        args, kwargs = self.calls["prefill_program"]
        return next(a for a in (*args, *kwargs.values()) if isinstance(a, decode.StaticSettings))

    def padded_length(self) -> int:
        args, kwargs = self.calls["prefill_program"]
        return max(
            a.shape[1]
            for a in (*args, *kwargs.values())
            if isinstance(a, jax.Array) and a.ndim == 2
        )


# ----------------------------------------------------------------------------- per model


def bench_model(bm, args, bandwidth: dict) -> dict:
    n_new = args.new_tokens
    processor = bm.load_processor()
    inputs = build_inputs(bm, processor, args.question)
    specials = special_ids(bm, processor)
    pmask = question_mask(inputs, bm, specials)
    n = bm.tokens_per_image
    t_text = inputs["text_tokens"]
    log(f"\n== {bm.name}: {bm.description}")
    log(f"   prompt: {t_text} text tokens ({int(pmask.sum())} in the question) + {n} image tokens")
    load_avg_start = list(os.getloadavg())

    rss0 = rss_mb()
    t0 = time.perf_counter()
    vlm = zspa_jax.load(bm.zspa_dir)
    jax_load_s = time.perf_counter() - t0
    if vlm.special_token_ids != specials:
        log(f"   warning: special ids differ: {vlm.special_token_ids} vs {specials}")
    rss1 = rss_mb()
    t0 = time.perf_counter()
    hf = load_torch(bm)
    torch_load_s = time.perf_counter() - t0
    rss2 = rss_mb()
    log(
        f"   loaded: jax {jax_load_s:.1f} s (+{rss1 - rss0:.0f} MB RSS), torch {torch_load_s:.1f} s (+{rss2 - rss1:.0f} MB)"
    )

    stages = JaxStages(vlm)
    tp = TorchPipeline(hf, bm, inputs, pmask)
    ids_j = jnp.asarray(inputs["input_ids"])
    px_j = jnp.asarray(inputs["pixel_values"])
    mask_j = jnp.asarray(pmask)
    text_embeds_j = sync(stages.embed(vlm.state, ids_j))

    # ---- vision tower + projector (independent of keep)
    first_tower_s, visual_j = timed(lambda: stages.tower(vlm.state, px_j))
    feats_t = sync(tp.vision())
    vis = interleaved(
        {
            "jax": (None, lambda _: stages.tower(vlm.state, px_j)),
            "torch": (None, lambda _: tp.vision()),
        },
        args.repeats,
    )
    feat_diff = float(np.abs(np.asarray(visual_j) - feats_t.float().cpu().numpy()).max())
    log(
        f"   vision: jax {median(vis['jax']) * 1e3:.0f} ms (first call {first_tower_s:.1f} s), "
        f"torch {median(vis['torch']) * 1e3:.0f} ms; max|diff| of features {feat_diff:.2e}"
    )

    rows = []
    for keep in args.keeps:
        if keep > n:
            continue
        prune = None if keep == n else PruneConfig(keep=keep, core_ratio=CORE_RATIO)
        length = t_text + keep
        cache_length = round_up(length + n_new, decode.CACHE_BUCKET)
        est = estimate(
            vlm.config, t_text, PruneConfig(keep=keep, core_ratio=CORE_RATIO), new_tokens=n_new
        )
        log(f"-- keep {keep}: sequence {length} tokens")

        # Pruning inputs and pruned embeddings for both frameworks (not timed).
        if prune is None:
            kept_j, kept_t = None, None
        else:
            kept_j = sync(
                select_tokens(visual_j, text_embeds_j, mask_j, keep=keep, core_ratio=CORE_RATIO)
            )
            kept_t = tp.prune(feats_t, keep)
        kept_equal = (
            None
            if prune is None
            else bool(np.array_equal(np.asarray(kept_j), kept_t.cpu().numpy()))
        )
        embeds_j = sync(jax_assemble(text_embeds_j, visual_j, inputs["image_start"], n, kept_j))
        embeds_t = tp.embeds(feats_t, kept_t)

        # ---- first calls (JAX: trace + compile + run)
        before = jax_compile_state()
        with CaptureLibraryCalls() as library:
            first_gen_s, gen_out = timed(
                lambda: zspa_jax.generate(
                    vlm,
                    input_ids=inputs["input_ids"],
                    pixel_values=inputs["pixel_values"],
                    attention_mask=inputs["attention_mask"],
                    prune=prune,
                    max_new_tokens=n_new,
                    eos_token_id=[],
                )
            )
        compiles_first = {
            k: v - before.get(k, 0) for k, v in jax_compile_state().items() if v != before.get(k, 0)
        }
        first_prefill_s, _ = timed(lambda: stages.prefill(vlm.state, embeds_j, cache_length))
        st = library.static_settings()
        padded_length = library.padded_length()
        state0, _ = sync(library.prefill())
        copy_state = lambda: jax.tree.map(jnp.copy, state0)  # decode_program donates its state
        dec = sync(library.decode(copy_state()))
        jax_tokens = np.asarray(dec.tokens)[0, :n_new]
        jax_cache_bytes = int(dec.cache.nbytes)
        del dec
        # torch warm-up
        t_prefill_out = tp.prefill(embeds_t)
        kv_per_token_t = torch_kv_bytes_per_token(t_prefill_out, length)
        del t_prefill_out
        torch_tokens = tp.generate(embeds_t, n_new).cpu().numpy()[0, :n_new]
        sync(tp.generate(embeds_t, 1))
        sync(tp.e2e(keep, n_new))
        if prune is not None:
            sync(tp.prune(feats_t, keep))

        # ---- timed, interleaved
        before = jax_compile_state()
        traces_before = dict(stages.traces)
        fns: dict[str, tuple] = {}
        if prune is not None:
            fns["jax_prune"] = (
                None,
                lambda _: select_tokens(
                    visual_j, text_embeds_j, mask_j, keep=keep, core_ratio=CORE_RATIO
                ),
            )
            fns["torch_prune"] = (None, lambda _: tp.prune(feats_t, keep))
        fns["jax_prefill"] = (None, lambda _: stages.prefill(vlm.state, embeds_j, cache_length))
        fns["torch_prefill"] = (None, lambda _: tp.prefill(embeds_t))
        fns["jax_decode"] = (copy_state, library.decode)
        fns["torch_generate_n"] = (None, lambda _: tp.generate(embeds_t, n_new))
        fns["torch_generate_1"] = (None, lambda _: tp.generate(embeds_t, 1))
        samples = interleaved(fns, args.repeats)
        gen_stats = []

        def jax_e2e(_):
            out = zspa_jax.generate(
                vlm,
                input_ids=inputs["input_ids"],
                pixel_values=inputs["pixel_values"],
                attention_mask=inputs["attention_mask"],
                prune=prune,
                max_new_tokens=n_new,
                eos_token_id=[],
            )
            gen_stats.append(out.stats)
            return out.sequences

        samples.update(
            interleaved(
                {"jax_e2e": (None, jax_e2e), "torch_e2e": (None, lambda _: tp.e2e(keep, n_new))},
                args.e2e_repeats,
            )
        )
        after = jax_compile_state()
        recompiles = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        recompiles.update(
            {
                f"stage.{k}": v - traces_before.get(k, 0)
                for k, v in stages.traces.items()
                if v != traces_before.get(k, 0)
            }
        )

        med = {k: median(v) for k, v in samples.items()}
        jax_decode_tps = n_new / med["jax_decode"]
        torch_decode_s = med["torch_generate_n"] - med["torch_generate_1"]
        torch_decode_tps = (n_new - 1) / torch_decode_s if torch_decode_s > 0 else float("nan")
        weight_bytes = est["decode_weight_bytes_per_token"]
        # JAX attends over (reads) its whole preallocated decode cache every step.
        jax_bytes_token = weight_bytes + jax_cache_bytes
        torch_kv_read = kv_per_token_t * (length + (n_new - 1) / 2)
        torch_bytes_token = weight_bytes + torch_kv_read
        bw = bandwidth["reference_gbs"] * 1e9
        match = int(
            np.argmin(np.append(jax_tokens == torch_tokens, False))
        )  # matching prefix length
        row = {
            "keep": keep,
            "pruned": prune is not None,
            "text_tokens": t_text,
            "sequence_length": length,
            "generate_prompt_length_padded": padded_length - n + keep,
            "jax_decode_cache_length": st.cache_length,
            "stage_prefill_cache_length": cache_length,
            "new_tokens": n_new,
            "kept_indices_equal": kept_equal,
            "greedy_tokens_matching_prefix": match,
            "jax": {
                "vision_ms": median(vis["jax"]) * 1e3,
                "prune_ms": med["jax_prune"] * 1e3 if prune is not None else 0.0,
                "prefill_ms": med["jax_prefill"] * 1e3,
                "decode_tokens_per_s": jax_decode_tps,
                "decode_ms_per_token": 1e3 / jax_decode_tps,
                "e2e_s": med["jax_e2e"],
                "generate_stats_prefill_s": median([s["prefill_seconds"] for s in gen_stats]),
                "generate_stats_decode_tokens_per_s": median(
                    [s["decode_tokens_per_second_total"] for s in gen_stats]
                ),
                "first_generate_call_s": first_gen_s,
                "compile_s_estimate": first_gen_s - med["jax_e2e"],
                "first_stage_prefill_call_s": first_prefill_s,
                "compiles_on_first_call": compiles_first,
                "kv_cache_bytes": jax_cache_bytes,
                "decode_bytes_per_token": jax_bytes_token,
                "decode_bandwidth_gbs": jax_bytes_token * jax_decode_tps / 1e9,
                "decode_bandwidth_utilisation": jax_bytes_token * jax_decode_tps / bw,
                "prefill_gflops_per_s": est["llm_prefill_flops"] / med["jax_prefill"] / 1e9,
            },
            "torch": {
                "vision_ms": median(vis["torch"]) * 1e3,
                "prune_ms": med["torch_prune"] * 1e3 if prune is not None else 0.0,
                "prefill_ms": med["torch_prefill"] * 1e3,
                "decode_tokens_per_s": torch_decode_tps,
                "decode_ms_per_token": 1e3 / torch_decode_tps,
                "generate_n_s": med["torch_generate_n"],
                "generate_1_s": med["torch_generate_1"],
                "e2e_s": med["torch_e2e"],
                "kv_cache_bytes": int(kv_per_token_t * (length + n_new - 1)),
                "decode_bytes_per_token": torch_bytes_token,
                "decode_bandwidth_gbs": torch_bytes_token * torch_decode_tps / 1e9,
                "decode_bandwidth_utilisation": torch_bytes_token * torch_decode_tps / bw,
                "prefill_gflops_per_s": est["llm_prefill_flops"] / med["torch_prefill"] / 1e9,
            },
            "recompiles_during_repeats": recompiles,
            "estimate": {
                k: est[k]
                for k in (
                    "vision_flops",
                    "projector_flops",
                    "pruning_flops",
                    "llm_prefill_flops",
                    "decode_flops_per_token",
                    "kv_cache_bytes",
                    "decode_weight_bytes_per_token",
                )
            },
            "samples_s": samples,
            "load_average": list(os.getloadavg()),
        }
        rows.append(row)
        j, t = row["jax"], row["torch"]
        log(
            f"   jax   prune {j['prune_ms']:.2f} ms  prefill {j['prefill_ms']:.0f} ms  decode {j['decode_tokens_per_s']:.1f} tok/s "
            f"(bw {100 * j['decode_bandwidth_utilisation']:.0f}%)  e2e {j['e2e_s']:.2f} s  first call {first_gen_s:.1f} s"
        )
        log(
            f"   torch prune {t['prune_ms']:.2f} ms  prefill {t['prefill_ms']:.0f} ms  decode {t['decode_tokens_per_s']:.1f} tok/s "
            f"(bw {100 * t['decode_bandwidth_utilisation']:.0f}%)  e2e {t['e2e_s']:.2f} s"
        )
        log(
            f"   kept equal: {kept_equal}; greedy tokens matching prefix {match}/{n_new}; recompiles: {recompiles or 'none'}"
        )

    result = {
        "model": bm.name,
        "description": bm.description,
        "hf_dir": str(bm.hf_dir),
        "zspa_dir": str(bm.zspa_dir),
        "visual_tokens": n,
        "text_tokens": t_text,
        "question_tokens": int(pmask.sum()),
        "prompt_text": inputs["text"],
        "torch_attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "load": {
            "jax_s": jax_load_s,
            "torch_s": torch_load_s,
            "jax_rss_mb": rss1 - rss0,
            "torch_rss_mb": rss2 - rss1,
        },
        "vision_feature_max_abs_diff": feat_diff,
        "vision_first_call_s": first_tower_s,
        "load_average_start": load_avg_start,
        "load_average_end": list(os.getloadavg()),
        "rows": rows,
    }
    del stages, tp, hf, vlm
    gc.collect()
    return result


# ----------------------------------------------------------------------------- RSS workers


def rss_worker(
    framework: str, model_name: str, keeps: list[int], new_tokens: int, question: str
) -> dict:
    """Runs in its own process: load one framework's model, one e2e call per keep."""
    bm = bench_models.get_model(model_name, log=lambda *a: None)
    processor = bm.load_processor()
    inputs = build_inputs(bm, processor, question)
    out = {
        "framework": framework,
        "rss_start_mb": rss_mb(),
        "hwm_reset": reset_peak_rss(),
        "keeps": {},
    }
    if framework == "jax":
        vlm = zspa_jax.load(bm.zspa_dir)

        def call(keep):
            prune = (
                None
                if keep >= bm.tokens_per_image
                else PruneConfig(keep=keep, core_ratio=CORE_RATIO)
            )
            return zspa_jax.generate(
                vlm,
                input_ids=inputs["input_ids"],
                pixel_values=inputs["pixel_values"],
                attention_mask=inputs["attention_mask"],
                prune=prune,
                max_new_tokens=new_tokens,
                eos_token_id=[],
            ).sequences
    else:
        hf = load_torch(bm)
        tp = TorchPipeline(hf, bm, inputs, question_mask(inputs, bm, special_ids(bm, processor)))
        call = lambda keep: tp.e2e(keep, new_tokens)  # noqa: E731
    out["rss_loaded_mb"] = rss_mb()
    out["peak_after_load_mb"] = peak_rss_mb()
    for keep in sorted(keeps):
        if keep > bm.tokens_per_image:
            continue
        entry = {}
        for label in ("first", "steady"):
            reset_peak_rss()
            if TORCH_DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(call(keep))
            entry[f"peak_rss_{label}_mb"] = peak_rss_mb()
            if framework == "torch" and TORCH_DEVICE.type == "cuda":
                entry[f"device_peak_{label}_mb"] = torch.cuda.max_memory_allocated() / 2**20
            if framework == "jax" and jax.default_backend() != "cpu":
                stats = jax.local_devices()[0].memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    entry[f"device_peak_{label}_mb"] = stats["peak_bytes_in_use"] / 2**20
        out["keeps"][str(keep)] = entry
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_rss_workers(model_name: str, args) -> dict:
    results = {}
    for framework in ("jax", "torch"):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--rss-worker",
            framework,
            "--models",
            model_name,
            "--new-tokens",
            str(args.new_tokens),
            "--keeps",
            *map(str, args.keeps),
            "--question",
            args.question,
            "--torch-omp-wait-policy",
            args.torch_omp_wait_policy,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RSS_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            log(f"   RSS worker {framework} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            results[framework] = {"error": proc.stderr[-2000:]}
            continue
        results[framework] = json.loads(line[len("RSS_RESULT ") :])
        results[framework]["seconds"] = time.perf_counter() - t0
        peaks = {k: round(v["peak_rss_first_mb"]) for k, v in results[framework]["keeps"].items()}
        log(f"   peak RSS {framework} (MB, first call per keep): {peaks}")
    return results


# ----------------------------------------------------------------------------- targets + outputs


def evaluate_targets(model: dict) -> list[dict]:
    rows = {r["keep"]: r for r in model["rows"]}
    n = model["visual_tokens"]
    targets = []

    def add(name, value, ok, detail):
        targets.append(
            {
                "model": model["model"],
                "target": name,
                "value": value,
                "pass": bool(ok),
                "detail": detail,
            }
        )

    worst = min(
        rows.values(),
        key=lambda r: r["jax"]["decode_tokens_per_s"] / r["torch"]["decode_tokens_per_s"],
    )
    ratio = worst["jax"]["decode_tokens_per_s"] / worst["torch"]["decode_tokens_per_s"]
    add(
        "zspa_jax decode tokens/s >= 2x transformers generate",
        ratio,
        ratio >= 2.0,
        f"worst keep {worst['keep']}: {worst['jax']['decode_tokens_per_s']:.1f} vs {worst['torch']['decode_tokens_per_s']:.1f} tok/s = {ratio:.2f}x",
    )
    small = min(rows)
    if n in rows and small < n:
        full, pr = rows[n], rows[small]
        seq_ratio = full["sequence_length"] / pr["sequence_length"]
        speedup = full["jax"]["prefill_ms"] / pr["jax"]["prefill_ms"]
        torch_speedup = full["torch"]["prefill_ms"] / pr["torch"]["prefill_ms"]
        add(
            f"LLM prefill speed-up at keep {small} >= 0.8 x sequence-length ratio",
            speedup / seq_ratio,
            speedup >= 0.8 * seq_ratio,
            f"jax {speedup:.2f}x for a {seq_ratio:.2f}x shorter sequence ({full['sequence_length']} -> {pr['sequence_length']}); torch {torch_speedup:.2f}x",
        )
        fractions = {
            k: r["jax"]["prune_ms"] / (full["jax"]["prefill_ms"] - r["jax"]["prefill_ms"])
            for k, r in rows.items()
            if k < n and full["jax"]["prefill_ms"] > r["jax"]["prefill_ms"]
        }
        if fractions:
            k_worst = max(fractions, key=fractions.get)
            add(
                "pruning time <= 1% of the LLM prefill it saves",
                fractions[k_worst],
                fractions[k_worst] <= 0.01,
                f"worst keep {k_worst}: {rows[k_worst]['jax']['prune_ms']:.2f} ms vs {full['jax']['prefill_ms'] - rows[k_worst]['jax']['prefill_ms']:.0f} ms saved ({100 * fractions[k_worst]:.2f}%)",
            )
    util = min(r["jax"]["decode_bandwidth_utilisation"] for r in rows.values())
    add(
        "decode bandwidth utilisation >= 50%",
        util,
        util >= 0.5,
        "min over keeps: "
        + ", ".join(
            f"{k}: {100 * r['jax']['decode_bandwidth_utilisation']:.0f}%" for k, r in rows.items()
        ),
    )
    recompiles = {
        k: r["recompiles_during_repeats"] for k, r in rows.items() if r["recompiles_during_repeats"]
    }
    add(
        "no recompilation across repeated calls",
        len(recompiles),
        not recompiles,
        f"{recompiles or 'TRACE_COUNTS unchanged at every keep'}",
    )
    firsts = {k: round(r["jax"]["first_generate_call_s"], 1) for k, r in rows.items()}
    add(
        "first-call compile time reported",
        max(r["jax"]["compile_s_estimate"] for r in rows.values()),
        True,
        "first generate call per keep (s): " + ", ".join(f"{k}: {v}" for k, v in firsts.items()),
    )
    return targets


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# zspa_jax vs transformers: generation benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores used ({m['cpu_count']} visible), {m['memory_gib']} GiB; "
        f"jax {m['jax']} (backend {m['jax_backend']}), torch {m['torch']} on {m['torch_device']} "
        f"({m['torch_threads']} threads, OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}), transformers {m['transformers']}, "
        f"Python {m['python']}; {m['date']}.",
        f"Load average (1/5/15 min) at start: {', '.join(f'{x:.2f}' for x in m['load_average_start'])}; "
        f"at end: {', '.join(f'{x:.2f}' for x in report.get('load_average_end', []))}.",
        f"Memory bandwidth (read + write): numpy copy 1 thread {report['bandwidth']['numpy_copy_1thread_gbs']:.1f} GB/s, "
        f"numpy copy {m['cores']} threads {report['bandwidth']['numpy_copy_threads_gbs']:.1f} GB/s, jax x+1 "
        f"{report['bandwidth']['jax_add_one_gbs']:.1f} GB/s; reference {report['bandwidth']['reference_gbs']:.1f} GB/s.",
        f"B = 1, f32 weights in both, greedy, {report['settings']['new_tokens']} new tokens, EOS disabled; medians of "
        f"{report['settings']['repeats']} interleaved repeats ({report['settings']['e2e_repeats']} for e2e) after warm-up.",
        "",
    ]
    for model in report["models"]:
        lines += [
            f"## {model['model']}",
            "",
            f"{model['description']}. Prompt: {model['text_tokens']} text tokens ({model['question_tokens']} scored as the question) "
            f"+ {model['visual_tokens']} visual tokens. torch attention: {model['torch_attn_implementation']}. "
            f"Vision features max|jax - torch| = {model['vision_feature_max_abs_diff']:.1e}.",
            "",
            "| keep | seq len | framework | vision ms | prune ms | LLM prefill ms | decode tok/s | decode BW util | e2e s | first call s | peak RSS MB (first / steady) | KV cache |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        rss = model.get("rss", {})
        for r in model["rows"]:
            for fw in ("jax", "torch"):
                x = r[fw]
                peak = rss.get(fw, {}).get("keeps", {}).get(str(r["keep"]), {})
                peak_s = (
                    f"{peak['peak_rss_first_mb']:.0f} / {peak['peak_rss_steady_mb']:.0f}"
                    if peak
                    else "n/a"
                )
                first = f"{x['first_generate_call_s']:.1f}" if fw == "jax" else "-"
                prune = f"{x['prune_ms']:.2f}" if r["pruned"] else "-"
                lines.append(
                    f"| {r['keep']} | {r['sequence_length']} | {'zspa_jax' if fw == 'jax' else 'transformers'} | {x['vision_ms']:.0f} | {prune} "
                    f"| {x['prefill_ms']:.0f} | {x['decode_tokens_per_s']:.1f} | {100 * x['decode_bandwidth_utilisation']:.0f}% "
                    f"| {x['e2e_s']:.2f} | {first} | {peak_s} | {_fmt_bytes(x['kv_cache_bytes'])} |"
                )
        lines += [
            "",
            "Checks: "
            + "; ".join(
                f"keep {r['keep']}: kept indices equal {r['kept_indices_equal']}, greedy tokens equal for the first "
                f"{r['greedy_tokens_matching_prefix']}/{r['new_tokens']}"
                for r in model["rows"]
            )
            + ".",
            "",
        ]
    for name in report.get("skipped", []):
        lines += [
            f"Skipped: `{name}` (not available on this machine; see benchmarks/models.py).",
            "",
        ]
    lines += ["## Targets", "", "| model | target | result | measured |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['model']} | {t['target']} | {'PASS' if t['pass'] else 'MISS'} | {t['detail']} |"
        )
    lines += [
        "",
        "Notes: JAX vision/prefill/decode are separately jitted stages on exact-length inputs; `e2e` is the public "
        "`zspa_jax.generate` (prompt left-padded to 64-token buckets, KV cache preallocated to a 64-multiple). "
        "torch decode tokens/s = (N - 1) / (t(generate N) - t(generate 1)); JAX decode tokens/s = N / t(decode_program). "
        "Peak RSS: separate process per framework, one model loaded, HWM reset per keep; 'first' includes JAX "
        "compilation. KV cache: JAX = its preallocated cache; torch = the DynamicCache at the end of generation.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Per model: stacked prefill stages (ms) and decode tokens/s, zspa_jax vs transformers (PIL)."""
    from PIL import Image, ImageDraw

    models = report["models"]
    width, panel_h = 1100, 380
    img = Image.new("RGB", (width, 40 + panel_h * len(models)), "white")
    d = ImageDraw.Draw(img)
    d.text(
        (10, 10),
        f"zspa_jax vs transformers ({report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['jax_backend']})",
        fill="black",
    )
    colors = {"vision": (90, 130, 200), "prune": (230, 150, 40), "prefill": (80, 170, 90)}
    fw_tint = {"jax": 1.0, "torch": 0.6}
    for p, model in enumerate(models):
        top = 40 + p * panel_h
        rows = model["rows"]
        d.text(
            (10, top),
            f"{model['model']}: prefill stages (ms), left; decode tokens/s, right",
            fill="black",
        )
        for side, (x0, x1) in enumerate([(60, 560), (640, 1080)]):
            y0, y1 = top + 30, top + panel_h - 50
            d.line([(x0, y1), (x1, y1)], fill="black")
            d.line([(x0, y0), (x0, y1)], fill="black")
            if side == 0:
                values = [
                    r[fw]["vision_ms"] + r[fw]["prune_ms"] + r[fw]["prefill_ms"]
                    for r in rows
                    for fw in ("jax", "torch")
                ]
            else:
                values = [r[fw]["decode_tokens_per_s"] for r in rows for fw in ("jax", "torch")]
            vmax = max(values) * 1.1 if values else 1
            d.text((x0 - 55, y0 - 5), f"{vmax:.0f}", fill="black")
            d.text((x0 - 20, y1 - 5), "0", fill="black")
            group_w = (x1 - x0) / max(len(rows), 1)
            bar_w = group_w * 0.35
            for i, r in enumerate(rows):
                gx = x0 + i * group_w + group_w * 0.12
                d.text((gx + bar_w * 0.4, y1 + 8), f"keep {r['keep']}", fill="black")
                for j, fw in enumerate(("jax", "torch")):
                    bx = gx + j * (bar_w + 4)
                    tint = fw_tint[fw]
                    if side == 0:
                        y = y1
                        for stage in ("vision", "prune", "prefill"):
                            h = r[fw][f"{stage}_ms"] / vmax * (y1 - y0)
                            c = tuple(int(255 - (255 - v) * tint) for v in colors[stage])
                            d.rectangle([bx, y - h, bx + bar_w, y], fill=c, outline="black")
                            y -= h
                    else:
                        h = r[fw]["decode_tokens_per_s"] / vmax * (y1 - y0)
                        c = tuple(int(255 - (255 - v) * tint) for v in (150, 80, 160))
                        d.rectangle([bx, y1 - h, bx + bar_w, y1], fill=c, outline="black")
                        d.text(
                            (bx, y1 - h - 12), f"{r[fw]['decode_tokens_per_s']:.0f}", fill="black"
                        )
                    d.text((bx + 2, y1 + 22), "J" if fw == "jax" else "T", fill="black")
        ly = top + panel_h - 18
        lx = 60
        for stage, c in colors.items():
            d.rectangle([lx, ly, lx + 12, ly + 10], fill=c)
            d.text((lx + 16, ly - 1), stage, fill="black")
            lx += 90
        d.text((lx + 20, ly - 1), "J = zspa_jax (dark), T = transformers (light)", fill="black")
    img.save(path)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: keep 576/64, 8 new tokens, 2 repeats"
    )
    parser.add_argument("--models", nargs="+", default=list(bench_models.MODEL_NAMES))
    parser.add_argument("--keeps", type=int, nargs="+", default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--e2e-repeats", type=int, default=None)
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results; --quick: none)",
    )
    parser.add_argument(
        "--torch-omp-wait-policy",
        choices=("passive", "active", "default"),
        default="passive",
        help="OMP_WAIT_POLICY for torch's OpenMP threads (default passive: no spinning on a shared CPU)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="re-render md/png (and targets) from a results JSON",
    )
    parser.add_argument("--rss-worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        report["targets"] = [t for m in report["models"] for t in evaluate_targets(m)]
        out_dir = args.out or args.from_json.parent
        (out_dir / "generate.md").write_text(markdown(report))
        if report["models"]:
            plot(report, out_dir / "generate.png")
        print(markdown(report))
        return 0
    args.keeps = args.keeps or ([576, 64] if args.quick else list(KEEPS))
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.e2e_repeats = args.e2e_repeats or (1 if args.quick else 3)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (torch decode rate = generate(N) - generate(1))")

    torch.set_num_threads(CORES)  # the cores JAX's CPU backend uses
    if jax.default_backend() != "cpu":
        # Same f32 arithmetic as torch (no TF32 in JAX's matmuls on GPU).
        jax.config.update("jax_default_matmul_precision", "highest")

    if args.rss_worker:
        out = rss_worker(
            args.rss_worker, args.models[0], args.keeps, args.new_tokens, args.question
        )
        print("RSS_RESULT " + json.dumps(out), flush=True)
        return 0

    machine = machine_info()
    log(
        f"machine: {machine['cpu']}, {CORES} cores, jax {machine['jax']} ({machine['jax_backend']}), torch "
        f"{machine['torch']} on {TORCH_DEVICE}; load average {machine['load_average_start']}"
    )
    bandwidth = memory_bandwidth()
    log(
        f"memory bandwidth: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in bandwidth.items()})}"
    )
    report = {
        "machine": machine,
        "bandwidth": bandwidth,
        "settings": {
            "keeps": args.keeps,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "e2e_repeats": args.e2e_repeats,
            "question": args.question,
            "core_ratio": CORE_RATIO,
            "quick": args.quick,
        },
        "models": [],
        "skipped": [],
    }
    for name in args.models:
        bm = bench_models.get_model(name, log=log)
        if bm is None:
            report["skipped"].append(name)
            continue
        model = bench_model(bm, args, bandwidth)
        if not args.no_rss:
            model["rss"] = run_rss_workers(name, args)
        report["models"].append(model)
    report["load_average_end"] = list(os.getloadavg())
    report["targets"] = [t for m in report["models"] for t in evaluate_targets(m)]

    md = markdown(report)
    print("\n" + md)
    for t in report["targets"]:
        log(f"{'PASS' if t['pass'] else 'MISS'}  [{t['model']}] {t['target']}: {t['detail']}")
    out_dir = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "generate.md").write_text(md)
        (out_dir / "generate.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        if report["models"]:
            plot(report, out_dir / "generate.png")
        log(f"wrote {out_dir}/generate.md, generate.json, generate.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
