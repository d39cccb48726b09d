"""Runs one converted model on host-device meshes and writes what tests/test_sharding.py checks.

    python -m tests.support.mesh_worker MODEL INPUTS.npz OUT.npz [--meshes 1x8,2x4,8x1] [--devices 8]
    python -m tests.support.mesh_worker MODEL INPUTS.npz OUT.npz --meshes 2x4 --devices 4 \
        --process-id I --num-processes 2 --port P          # one of several processes

A separate process because the fake device count must be set before jax starts (the
rest of the suite keeps one device). INPUTS holds a batch of arrays (input_ids,
attention_mask, pixel_values, and image_grid_thw for Qwen2.5-VL) plus `keep`. OUT holds,
per mesh M: logits_M, tokens_M, pruned_tokens_M, kept_M, tokens_odd_M (the first ODD_ROWS
rows, on meshes whose "data" axis pads them), array_api_tokens_M, select_M, stream_2x4,
and the same without a mesh under "single"; plus a JSON string "report" (per-device
parameter bytes, compile counts, error messages of bad meshes). One of several processes
computes only what the multi-process test compares (logits, tokens, pruned tokens, kept
indices, the odd batch): fewer programs to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# 7 rows divide neither data=2 nor data=8, and both pad them to 8: the batch of 8's shapes,
# so the padded batch runs the programs already compiled for it.
ODD_ROWS = 7


def _setup(devices: int, process_id: int | None, num_processes: int, port: int | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    if process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )


def _mesh(text: str, axis_types=None):
    import jax

    d, m = (int(x) for x in text.split("x"))
    return jax.make_mesh((d, m), ("data", "model"), axis_types=axis_types)


def _param_bytes(vlm) -> dict:
    """Parameter bytes held by each device, in all and of the split parameters only (those
    whose spec names an axis of size > 1), and the whole model's totals of both."""
    import jax
    import numpy as np
    from flax import nnx

    per_device: dict[str, int] = {}
    split_per_device: dict[str, int] = {}
    split_total = total = 0
    sizes = dict(vlm.mesh.shape)
    for leaf in jax.tree.leaves(nnx.state(vlm.model, nnx.Param)):
        is_split = int(np.prod([sizes[a] for a in leaf.sharding.spec if a is not None] or [1])) > 1
        total += leaf.nbytes
        split_total += leaf.nbytes if is_split else 0
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
            if is_split:
                split_per_device[key] = split_per_device.get(key, 0) + shard.data.nbytes
    return {
        "total": total,
        "split_total": split_total,
        "per_device": per_device,
        "split_per_device": split_per_device,
    }


def _error(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--meshes", default="1x8,2x4,8x1")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    _setup(args.devices, args.process_id, args.num_processes, args.port)

    import jax
    import numpy as np

    import zspa_jax
    from zspa_jax import generation
    from zspa_jax.sharding import fetch, mesh_context, place

    data = dict(np.load(args.inputs))
    keep = int(data.pop("keep"))
    batch = {k: v for k, v in data.items()}
    odd = _first_rows(batch, ODD_ROWS)
    gen = dict(max_new_tokens=args.new_tokens, eos_token_id=[])
    prune = zspa_jax.PruneConfig(keep=keep)
    out, report = {}, {"compiles": {}, "bytes": {}, "errors": {}, "mesh_types": {}}

    def run(tag: str, vlm) -> None:
        out[f"logits_{tag}"] = zspa_jax.forward(vlm, **batch)
        out[f"tokens_{tag}"] = zspa_jax.generate(
            vlm, input_ids=batch["input_ids"], **_rest(batch), **gen
        ).sequences
        res = zspa_jax.generate(
            vlm, input_ids=batch["input_ids"], **_rest(batch), prune=prune, **gen
        )
        out[f"pruned_tokens_{tag}"], out[f"kept_{tag}"] = res.sequences, res.kept_indices
        pads = vlm.mesh is not None and vlm.mesh.shape["data"] > 1
        if pads:
            out[f"tokens_odd_{tag}"] = zspa_jax.generate(
                vlm, input_ids=odd["input_ids"], **_rest(odd), **gen
            ).sequences
        if multi:
            return
        # The array API, prompt pre-padded to generate's bucket so the programs are shared.
        extra = generation.prompt_bucket(batch["input_ids"].shape[1]) - batch["input_ids"].shape[1]
        ids = np.pad(batch["input_ids"], ((0, 0), (extra, 0)), constant_values=vlm.pad_token_id)
        mask = np.pad(batch["attention_mask"], ((0, 0), (extra, 0)))
        arrays = {k: v for k, v in _rest(batch).items() if k != "attention_mask"}
        res = zspa_jax.generate_tokens(
            vlm,
            ids,
            attention_mask=mask,
            prune=prune,
            max_new_tokens=args.new_tokens,
            eos_token_id=[],
            **arrays,
        )
        out[f"array_api_tokens_{tag}"] = fetch(res.tokens)[:, : args.new_tokens]
        # select_tokens on arrays split over "data", under the mesh.
        with mesh_context(vlm.mesh):
            kept = zspa_jax.select_tokens(
                place(visual, vlm.mesh, "data"), place(prompt, vlm.mesh, "data"), keep=keep
            )
        out[f"select_{tag}"] = fetch(kept)
        if tag == "2x4":  # streaming: the same tokens, step by step
            chunks = zspa_jax.generate(
                vlm, input_ids=batch["input_ids"], **_rest(batch), stream=True, **gen
            )
            out[f"stream_{tag}"] = np.stack(list(chunks), axis=1)
        # The same calls again: nothing may compile.
        before = dict(generation.TRACE_COUNTS)
        zspa_jax.generate(vlm, input_ids=batch["input_ids"], **_rest(batch), prune=prune, **gen)
        if pads:
            zspa_jax.generate(vlm, input_ids=odd["input_ids"], **_rest(odd), **gen)
        report["compiles"][tag] = sum(generation.TRACE_COUNTS.values()) - sum(before.values())

    rng = np.random.default_rng(0)
    visual = rng.standard_normal((8, 40, 16)).astype(np.float32)
    prompt = rng.standard_normal((8, 5, 16)).astype(np.float32)
    multi = args.process_id is not None
    if not multi:
        run("single", zspa_jax.load(args.model))
    for i, text in enumerate(args.meshes.split(",")):
        # Explicit axes (jax.make_mesh's default) for all but the last mesh, which is Auto.
        auto = i == len(args.meshes.split(",")) - 1 and not multi
        mesh = _mesh(text, (jax.sharding.AxisType.Auto,) * 2 if auto else None)
        report["mesh_types"][text] = "Auto" if auto else "Explicit"
        vlm = zspa_jax.load(args.model, mesh=mesh)
        report["bytes"][text] = _param_bytes(vlm)
        run(text, vlm)

    if not multi:
        report["errors"] = _bad_meshes(args.model, batch)
    if jax.process_index() == 0:
        np.savez(args.out, report=json.dumps(report), **{k: np.asarray(v) for k, v in out.items()})
    return 0


def _rest(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "input_ids"}


def _first_rows(batch: dict, rows: int) -> dict:
    """The first `rows` rows (and, for Qwen2.5-VL, their images: one per row here)."""
    import numpy as np

    out = {k: batch[k][:rows] for k in ("input_ids", "attention_mask")}
    if "image_grid_thw" in batch:
        grid = batch["image_grid_thw"][:rows]
        out["image_grid_thw"] = grid
        out["pixel_values"] = batch["pixel_values"][: int(np.prod(grid, axis=1).sum())]
    else:  # one image per row (and its size, for LLaVA-NeXT)
        out["pixel_values"] = batch["pixel_values"][:rows]
        if "image_sizes" in batch:
            out["image_sizes"] = batch["image_sizes"][:rows]
    return out


def _bad_meshes(model: str, batch: dict) -> dict:
    """Error messages (or "no error") for each misuse test_sharding.py expects refused."""
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    import zspa_jax

    devices = jax.devices()
    one = zspa_jax.load(model)
    graphdef, state = nnx.split(one.model)
    on_last = dataclasses.replace(
        one, model=nnx.merge(graphdef, jax.device_put(state, devices[-1]))
    )
    two = jax.make_mesh((2, 1), ("data", "model"), devices=devices[:2])
    sharded = zspa_jax.load(model, mesh=two)
    ids = batch["input_ids"][:3]

    def traced_odd_batch():
        if "image_grid_thw" in batch:  # Qwen2.5-VL never traces its inputs: the LLaVA case only
            raise ValueError("not applicable")
        fn = jax.jit(
            lambda i, m, p: zspa_jax.generate_tokens(sharded, i, p, m, max_new_tokens=2).tokens
        )
        fn(ids, batch["attention_mask"][:3], batch["pixel_values"][:3])

    return {
        "axis_names": _error(
            lambda: zspa_jax.load(model, mesh=jax.make_mesh((2, 4), ("batch", "model")))
        ),
        "not_a_mesh": _error(lambda: zspa_jax.load(model, mesh={"data": 2, "model": 4})),
        "model_axis_3": _error(
            lambda: zspa_jax.load(
                model, mesh=jax.make_mesh((1, 3), ("data", "model"), devices=devices[:3])
            )
        ),
        "other_devices": _error(
            lambda: zspa_jax.shard(
                on_last, jax.make_mesh((1, 2), ("data", "model"), devices=devices[:2])
            )
        ),
        "already_sharded": _error(lambda: zspa_jax.shard(sharded, two)),
        "traced_odd_batch": _error(traced_odd_batch),
        "one_device_shard_ok": _error(
            lambda: np.asarray(zspa_jax.forward(zspa_jax.shard(one, two), **_first_rows(batch, 3)))
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
