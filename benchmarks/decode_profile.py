"""Where a zspa_jax decode step spends its time, against the memory-bandwidth roofline.

    python benchmarks/decode_profile.py            # -> benchmarks/results/decode_profile.{md,json}

Model: the generate benchmark's SmolLM2-135M + CLIP-L model (benchmarks/models.py), text
only (the tower is not part of decode), B = 1, f32, contexts of 109 and 621 tokens (the
sequence lengths at keep 64 and keep 576 in benchmarks/generate.py).

Per-step time = (time of 32 greedy tokens - time of 1 token) / 31, medians of 7 runs, so
prefill and dispatch cancel. Then, each on its own program:
  * the decoder's 210 weight GEMVs (30 layers x q, k, v, o, gate, up, down) chained in one
    program, and the head GEMV (x @ E^T, 49153 x 576) alone: what XLA's CPU matrix-vector
    kernels reach on these shapes;
  * the copy bandwidth reference of benchmarks/generate.py, and a read-only bandwidth (a
    jitted sum), which is what a GEMV's weight stream can at best use.
The step time beyond the isolated weight streaming is attention over the cache plus per-op
overhead (norms, RoPE, residual adds, cache update, sampling, the while loop).

Against transformers: the same model's `generate(input_ids, max_new_tokens=n,
min_new_tokens=n, do_sample=False)` (f32, torch threads = cores, as benchmarks/generate.py
sets them), per step the same (32 - 1) / 31 difference, timed round-robin with the JAX
calls so load from other jobs hits both alike; the ratio is transformers' step over ours.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import zspa_jax  # noqa: E402
from models.llama import KVCache  # noqa: E402
from zspa_jax import generation  # noqa: E402
from zspa_jax.host import round_up  # noqa: E402

RESULTS = HERE / "results"
CONTEXTS = (109, 621)
NEW_TOKENS = 32
PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def _load_generate_benchmark():
    """benchmarks/generate.py as a module: its bandwidth, timing and machine helpers, and
    the benchmark models it loads (`.bench_models`)."""
    spec = importlib.util.spec_from_file_location("zspa_bench_generate", HERE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate_bench = _load_generate_benchmark()


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn` (which returns the arrays to wait for)."""
    return generate_bench.median([generate_bench.timed(fn)[0] for _ in range(repeats)])


def step_seconds(vlm, hf, ids, repeats: int = 5) -> dict:
    """Seconds per decode step, (32 tokens - 1 token) / 31, of the real generate program and
    (when `hf` is given) of transformers' generate, timed round-robin; plus whether the 32
    greedy tokens agree."""
    import torch

    def run(n: int):
        return generation.generate_tokens(
            vlm, ids, max_new_tokens=n, max_new_tokens_bound=NEW_TOKENS, eos_token_id=[]
        ).tokens

    ids_t = torch.as_tensor(np.array(ids), dtype=torch.long)

    def run_torch(n: int):
        with torch.inference_mode():
            return hf.generate(
                input_ids=ids_t,
                attention_mask=torch.ones_like(ids_t),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    fns = {("jax", NEW_TOKENS): lambda: run(NEW_TOKENS), ("jax", 1): lambda: run(1)}
    if hf is not None:
        fns.update(
            {
                ("torch", NEW_TOKENS): lambda: run_torch(NEW_TOKENS),
                ("torch", 1): lambda: run_torch(1),
            }
        )
    outs = {
        key: fn() for key, fn in fns.items()
    }  # warm-up (JAX: compile; max_new_tokens is traced: one program)
    jax.block_until_ready(outs[("jax", NEW_TOKENS)])
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(generate_bench.timed(fn)[0])
    step = {
        fw: (generate_bench.median(times[(fw, NEW_TOKENS)]) - generate_bench.median(times[(fw, 1)]))
        / (NEW_TOKENS - 1)
        for fw in {fw for fw, _ in fns}
    }
    row = {"step_s": step["jax"]}
    if hf is not None:
        ours = np.asarray(outs[("jax", NEW_TOKENS)])[:, :NEW_TOKENS]
        theirs = outs[("torch", NEW_TOKENS)].numpy()[:, ids.shape[1] :]
        row.update(
            torch_step_s=step["torch"],
            speedup_vs_torch=step["torch"] / step["jax"],
            tokens_equal=bool(np.array_equal(ours, theirs)),
        )
    return row


def gemv_seconds(vlm) -> dict:
    """The decoder's weight GEMVs chained in one program, and the tied head alone."""
    layers = vlm.model.language_model.model.layers
    weights = [
        getattr(getattr(layer, block), name).kernel[...]
        for layer in layers
        for block, name in PROJECTIONS
    ]
    hidden = vlm.config.text.hidden_size

    def chain(x, ws):
        total = jnp.zeros((), jnp.float32)
        for w in (
            ws
        ):  # every input is x (or x tiled): all GEMVs independent, as XLA sees a layer's q/k/v
            xin = (
                x
                if w.shape[0] == hidden
                else jnp.tile(x, (1, w.shape[0] // hidden + 1))[:, : w.shape[0]]
            )
            total = total + (xin @ w).sum()
        return total

    x = jnp.ones((1, hidden), jnp.float32)
    chained = jax.jit(chain)
    chained(x, weights).block_until_ready()
    layer_s = median_seconds(lambda: chained(x, weights), 10)
    table = vlm.model.language_model.model.embed_tokens.embedding[...]
    head = jax.jit(lambda x, e: x @ e.T)
    head(x, table).block_until_ready()
    head_s = median_seconds(lambda: head(x, table), 20)
    layer_bytes = sum(w.nbytes for w in weights)
    return {
        "layer_gemvs": len(weights),
        "layer_bytes": layer_bytes,
        "layer_s": layer_s,
        "head_bytes": table.nbytes,
        "head_s": head_s,
    }


def read_bandwidth_gbs(size_mib: int = 512) -> float:
    """Read-only bandwidth: a jitted sum over `size_mib` of f32 (what a GEMV's weight stream
    needs; the copy reference counts a write for every byte read)."""
    data = jnp.ones((size_mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    return data.nbytes / min(generate_bench.timed(lambda: total(data))[0] for _ in range(5)) / 1e9


def markdown(report: dict) -> str:
    m, bw = report["machine"], report["bandwidth_gbs"]
    g = report["gemv"]
    lines = [
        "# Decode step profile (zspa_jax, XLA CPU)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['date']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in report.get('load_average_end', []))} "
        f"(a load above {m['cores']} means other jobs shared the {m['cores']} cores: absolute times are inflated, "
        "the ratio to transformers comes from round-robin timing). jax "
        f"{m['jax']}, torch {m.get('torch', '?')}.",
        f"Model: {report['model']}; decoder weights read per step {report['weight_bytes'] / 2**20:.0f} MiB "
        f"(30 layers {g['layer_bytes'] / 2**20:.0f} MiB + tied head {g['head_bytes'] / 2**20:.0f} MiB); "
        f"copy bandwidth reference {bw:.1f} GB/s (read + write); read-only bandwidth (jitted sum over 512 MiB) "
        f"{report['read_bandwidth_gbs']:.1f} GB/s.",
        "",
        "| context | step ms | tok/s | weights + cache GB/s (utilisation) | weight streaming ms (isolated GEMVs + head) "
        "| everything else ms | transformers step ms | x vs transformers (target >= 2) | greedy tokens equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    floor = g["layer_s"] + g["head_s"]
    for r in report["contexts"]:
        rate = (report["weight_bytes"] + r["cache_bytes"]) / r["step_s"] / 1e9
        lines.append(
            f"| {r['context']} | {1e3 * r['step_s']:.1f} | {1 / r['step_s']:.1f} | {rate:.1f} ({100 * rate / bw:.0f}%) "
            f"| {1e3 * floor:.1f} ({100 * floor / r['step_s']:.0f}% of the step) | {1e3 * (r['step_s'] - floor):.1f} "
            + (
                f"| {1e3 * r['torch_step_s']:.1f} | {r['speedup_vs_torch']:.2f}x | {r['tokens_equal']} |"
                if "torch_step_s" in r
                else "| - | - | - |"
            )
        )
    lines += [
        "",
        "Everything else: the step minus the isolated weight-streaming time: attention over the cache, norms, "
        "RoPE, residual adds, KV-cache update, sampling and loop control (many small ops, each with a fixed cost).",
        "",
        "Isolated kernels (one program each, same weights):",
        "",
        "| kernel | ms | MiB | GB/s | share of the copy reference | share of the read-only bandwidth |",
        "|---|---|---|---|---|---|",
    ]
    read = report["read_bandwidth_gbs"]
    for name, nbytes, seconds in (
        (f"{g['layer_gemvs']} decoder GEMVs chained", g["layer_bytes"], g["layer_s"]),
        ("tied head x @ E^T", g["head_bytes"], g["head_s"]),
    ):
        rate = nbytes / seconds / 1e9
        lines.append(
            f"| {name} | {1e3 * seconds:.1f} | {nbytes / 2**20:.0f} | {rate:.1f} | {100 * rate / bw:.0f}% | {100 * rate / read:.0f}% |"
        )
    lines += [
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    args = parser.parse_args(argv)
    machine = generate_bench.machine_info()
    bm = generate_bench.bench_models.get_model("smollm2-clip-l")
    if bm is None:
        raise SystemExit("the SmolLM2 benchmark model is not available (see benchmarks/models.py)")
    vlm = zspa_jax.load(bm.zspa_dir, processor=False)
    hf = None if args.no_torch else generate_bench.load_torch(bm)
    bandwidth = generate_bench.memory_bandwidth()["reference_gbs"]
    read_bandwidth = read_bandwidth_gbs()
    gemv = gemv_seconds(vlm)
    report = {
        "machine": machine,
        "model": bm.description,
        "bandwidth_gbs": bandwidth,
        "read_bandwidth_gbs": read_bandwidth,
        "weight_bytes": gemv["layer_bytes"] + gemv["head_bytes"],
        "gemv": gemv,
        "contexts": [],
    }
    rng = np.random.default_rng(0)
    for context in CONTEXTS:
        ids = jnp.asarray(rng.integers(10, 40000, size=(1, context)), jnp.int32)
        row = {
            "context": context,
            **step_seconds(vlm, hf, ids, repeats=7),
            # decode attends over the whole preallocated cache (shapes only: nothing allocated)
            "cache_bytes": jax.eval_shape(
                lambda: KVCache.zeros(vlm.config.text, 1, round_up(context + NEW_TOKENS, 64))
            ).nbytes,
        }
        report["contexts"].append(row)
        print(
            f"context {context}: step {1e3 * row['step_s']:.1f} ms"
            + (
                f", transformers {1e3 * row['torch_step_s']:.1f} ms ({row['speedup_vs_torch']:.2f}x)"
                if hf
                else ""
            ),
            flush=True,
        )
    report["load_average_end"] = list(os.getloadavg())
    md = markdown(report)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_profile.md").write_text(md)
    (args.out / "decode_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
