"""Meshes: both families on host-device meshes (1x8, 2x4, 8x1) and on 2 processes x 4
devices, against the single-device run and transformers.

The meshes run in subprocesses (tests/support/mesh_worker.py) so this process keeps one device;
the rule tables, plans and mesh checks that need no devices are tested here directly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import zspa_jax
from tests.support import tiny_qwen2_5_vl as qwen_helpers
from tests.support.converter import subprocess_env
from tests.support.mesh_worker import ODD_ROWS
from tests.support.paths import REPO_ROOT
from zspa_jax import estimate, sharding

MESHES = ("1x8", "2x4", "8x1")
NEW_TOKENS = 6
ROWS = 8


def _worker(model, inputs, out, *extra: str, timeout: float = 900) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tests.support.mesh_worker",
        str(model),
        str(inputs),
        str(out),
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc: subprocess.Popen, timeout: float = 900) -> None:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"mesh worker failed (exit {proc.returncode}):\n{output[-4000:]}"


class Run:
    """A family's worker results plus its transformers references."""

    def __init__(
        self,
        arrays: dict,
        out: dict,
        hf_logits: np.ndarray,
        hf_tokens: np.ndarray,
        mask: np.ndarray,
    ):
        self.arrays = arrays
        self.out = out
        self.report = json.loads(str(out["report"]))
        self.hf_logits = hf_logits
        self.hf_tokens = hf_tokens
        self.mask = mask.astype(bool)  # real positions (left padding excluded)


def _llava_inputs(tiny) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(ROWS):
        text = lambda n: rng.integers(10, 290, size=n)  # noqa: E731
        rows.append(
            np.concatenate(
                [
                    [tiny.bos_token_id],
                    text(1 + i % 3),
                    np.full(tiny.tokens_per_image, tiny.image_token_index),
                    text(2 + i),
                ]
            )
        )
    width = max(len(r) for r in rows)
    ids = np.full((ROWS, width), tiny.pad_token_id, np.int64)
    mask = np.zeros((ROWS, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    size = tiny.options["image_size"]
    pixels = rng.standard_normal((ROWS, 3, size, size)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _hf_llava(tiny, a: dict) -> tuple[np.ndarray, np.ndarray]:
    """transformers' prompt logits and cached greedy `generate` (this model emits its own
    <image> id as a token, which an uncached re-run would read as a placeholder)."""
    t = {k: torch.as_tensor(v) for k, v in a.items()}
    with torch.no_grad():
        logits = tiny.hf(**t).logits.numpy()
        tokens = tiny.hf.generate(
            **t,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tiny.pad_token_id,
        )
    return logits, tokens[:, a["input_ids"].shape[1] :].numpy()


def _hf_greedy(hf, batch: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' prompt logits and greedy tokens, each step a full forward over the
    sequence so far (no KV cache). transformers' cached `generate` is not the reference:
    for Qwen2.5-VL it departs from its own uncached forward on near-ties (on this batch,
    row 5 step 3: cached generate picks 6, the full forward and zspa_jax pick 43)."""
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
    mm = batch.pop("mm_token_type_ids", None)
    tokens = []
    with torch.no_grad():
        for step in range(steps + 1):
            extra = {} if mm is None else {"mm_token_type_ids": mm}
            logits = hf(input_ids=ids, attention_mask=mask, **batch, **extra).logits
            if step == 0:
                prompt_logits = logits.numpy()
            if step == steps:
                break
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            mm = None if mm is None else torch.cat([mm, torch.zeros_like(token)], 1)
    return prompt_logits, torch.cat(tokens, 1).numpy()


def _qwen_batch(tiny) -> dict:
    """8 rows, one image each of four sizes (the processor's arrays, mm_token_type_ids included)."""
    sizes = [(16, 32), (24, 24), (32, 16), (16, 16)] * 2
    images = [qwen_helpers.random_image(h, w, seed=50 + i) for i, (h, w) in enumerate(sizes)]
    prompts = [("what is shown here", 1), ("describe it", 1)] * (ROWS // 2)
    return {
        k: v.numpy() for k, v in qwen_helpers.hf_inputs(tiny.processor, prompts, images).items()
    }


def _llava_next_batch(tiny) -> dict:
    """8 rows, one image each of four sizes (different crop grids: 52, 56, 36 and 34 tokens)."""
    from tests.support.tiny_llava_next import rows

    sizes = [(40, 70), (64, 30), (32, 32), (20, 60)] * 2
    return rows(tiny, [(1 + i % 3, [size], 2 + i) for i, size in enumerate(sizes)], seed=21)


def _hf_llava_next(tiny, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """transformers on each row alone: prompt logits (at the row's real positions) and cached greedy tokens."""
    from tests.support.tiny_llava_next import hf_pieces, hf_row_logits

    merged, _ = hf_pieces(tiny, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = np.zeros(ids.shape + (tiny.hf.config.text_config.vocab_size,), np.float32)
    tokens = []
    for row in range(len(ids)):
        real = mask[row] == 1
        logits[row, real] = hf_row_logits(tiny, merged, batch, row, None)
        with torch.no_grad():
            out = tiny.hf.generate(
                input_ids=torch.as_tensor(ids[row : row + 1, real]),
                pixel_values=torch.as_tensor(batch["pixel_values"][row : row + 1]),
                image_sizes=torch.as_tensor(batch["image_sizes"][row : row + 1]),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tiny.pad_token,
            )
        tokens.append(out[0, real.sum() :].numpy())
    return logits, np.stack(tokens)


@pytest.fixture(scope="session")
def mesh_runs(tiny_hf_llava, converted, tmp_path_factory):
    """{family: Run}: each family's worker on the three meshes."""
    tmp = tmp_path_factory.mktemp("mesh")
    llava = tiny_hf_llava("mesh")
    llava_arrays = _llava_inputs(llava)
    qwen = qwen_helpers.tiny_model()
    qwen_batch = _qwen_batch(qwen)
    qwen_arrays = {
        k: qwen_batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    }
    from tests.support.tiny_llava_next import tiny_llava_next

    llava_next = tiny_llava_next()
    llava_next_arrays = _llava_next_batch(llava_next)
    jobs = {}
    for family, model, arrays, keep in (
        ("llava", converted(llava.path), llava_arrays, 6),
        ("qwen2_5_vl", qwen_helpers.converted(qwen), qwen_arrays, 4),
        ("llava_next", llava_next.out, llava_next_arrays, 5),
    ):
        np.savez(tmp / f"{family}_in.npz", keep=keep, **arrays)
        out = tmp / f"{family}_out.npz"
        # The families at once (compiling is mostly single-threaded), references meanwhile.
        jobs[family] = (
            model,
            arrays,
            out,
            _worker(
                model,
                tmp / f"{family}_in.npz",
                out,
                "--new-tokens",
                str(NEW_TOKENS),
                "--meshes",
                ",".join(MESHES_OF[family]),
            ),
        )
    references = {
        "llava": _hf_llava(llava, llava_arrays),
        "qwen2_5_vl": _hf_greedy(qwen.hf, qwen_batch, NEW_TOKENS),
        "llava_next": _hf_llava_next(llava_next, llava_next_arrays),
    }
    runs = {}
    for family, (_model, arrays, out, proc) in jobs.items():
        _wait(proc)
        runs[family] = Run(
            arrays, dict(np.load(out)), *references[family], arrays["attention_mask"]
        )
    runs["_paths"] = {
        family: (model, tmp / f"{family}_in.npz") for family, (model, *_) in jobs.items()
    }
    return runs


FAMILIES = ("llava", "qwen2_5_vl", "llava_next")
# Every mesh shape for LLaVA; Qwen2.5-VL and LLaVA-NeXT (the same decoder, their own tower
# rules, host layout and aux) on 2x4, which splits both axes: the mesh path names no family,
# so the other shapes would repeat LLaVA's checks.
MESHES_OF = {"llava": MESHES, "qwen2_5_vl": ("2x4",), "llava_next": ("2x4",)}
FAMILY_MESHES = [(f, m) for f in FAMILIES for m in MESHES_OF[f]]

# Mesh vs one device differ only in the order of float32 reductions (each device sums its
# shard, then an all-reduce adds the partial sums), which moves every dot product by a few
# units in the last place of its magnitude, compounded through the layers. The bound is a
# budget of REORDER_ULPS float32 ulps of the largest logit: 64 * 1.19e-7 * ~5 = 3.7e-5 here.
# Measured: up to 15 ulps (8.8e-6) on one AMD EPYC machine and 23 (1.32e-5) on another, so ~3x
# headroom; a real sharding bug (a wrong split, a dropped all-reduce) moves logits by O(1),
# i.e. millions of ulps.
REORDER_ULPS = 64


def reorder_bound(logits: np.ndarray) -> float:
    return REORDER_ULPS * float(np.finfo(np.float32).eps) * float(np.abs(logits).max())


@pytest.mark.parametrize("family, mesh", FAMILY_MESHES)
@pytest.mark.slow
def test_logits_equal_single_device_and_transformers(mesh_runs, family, mesh, parity_record):
    run = mesh_runs[family]
    ours, single = run.out[f"logits_{mesh}"], run.out["logits_single"]
    real = run.mask
    scale = float(np.abs(single[real]).max())
    bound = reorder_bound(single[real])
    assert bound < 1e-3 * scale  # still far below any real sharding bug
    assert (
        parity_record(
            f"{family} logits, mesh vs 1 device",
            f"mesh {mesh}, B={ROWS}",
            np.abs(ours - single)[real].max(),
            bound,
            scale=scale,
        )
        <= bound
    )
    assert (
        parity_record(
            f"{family} logits, mesh vs transformers",
            f"mesh {mesh}, B={ROWS}",
            np.abs(ours - run.hf_logits)[real].max(),
            1e-4,
            scale=scale,
        )
        <= 1e-4
    )


@pytest.mark.parametrize("family, mesh", FAMILY_MESHES)
@pytest.mark.slow
def test_greedy_tokens_equal_single_device_and_transformers(mesh_runs, family, mesh):
    run = mesh_runs[family]
    assert run.out[f"tokens_{mesh}"].shape == (ROWS, NEW_TOKENS)
    np.testing.assert_array_equal(run.out[f"tokens_{mesh}"], run.out["tokens_single"])
    np.testing.assert_array_equal(run.out[f"tokens_{mesh}"], run.hf_tokens)


@pytest.mark.parametrize("family, mesh", FAMILY_MESHES)
@pytest.mark.slow
def test_pruned_generation_equals_single_device(mesh_runs, family, mesh):
    run = mesh_runs[family]
    np.testing.assert_array_equal(run.out[f"kept_{mesh}"], run.out["kept_single"])
    np.testing.assert_array_equal(run.out[f"pruned_tokens_{mesh}"], run.out["pruned_tokens_single"])
    # Pruning changed the answer somewhere, so the comparison above could fail.
    assert not np.array_equal(run.out["pruned_tokens_single"], run.out["tokens_single"])


@pytest.mark.parametrize("family, mesh", FAMILY_MESHES)
@pytest.mark.slow
def test_array_api_and_select_tokens_on_a_mesh(mesh_runs, family, mesh):
    """generate_tokens on the sharded model, select_tokens on arrays split over "data"."""
    run = mesh_runs[family]
    np.testing.assert_array_equal(
        run.out[f"array_api_tokens_{mesh}"], run.out["pruned_tokens_single"]
    )
    np.testing.assert_array_equal(run.out[f"select_{mesh}"], run.out["select_single"])


@pytest.mark.parametrize("family, mesh", [(f, m) for f, m in FAMILY_MESHES if m in ("2x4", "8x1")])
@pytest.mark.slow
def test_batch_that_does_not_divide_data_is_padded_and_dropped(mesh_runs, family, mesh):
    """7 rows on data=2 and data=8: padded, then the padding dropped; each row's tokens
    are those it gets in the batch of 8 (one device and transformers)."""
    run = mesh_runs[family]
    odd = run.out[f"tokens_odd_{mesh}"]
    assert odd.shape == (ODD_ROWS, NEW_TOKENS)
    np.testing.assert_array_equal(odd, run.out["tokens_single"][:ODD_ROWS])
    np.testing.assert_array_equal(odd, run.hf_tokens[:ODD_ROWS])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_repeated_calls_do_not_recompile(mesh_runs, family):
    assert mesh_runs[family].report["compiles"] == {
        "single": 0,
        **{m: 0 for m in MESHES_OF[family]},
    }


@pytest.mark.parametrize("family, mesh", FAMILY_MESHES)
@pytest.mark.slow
def test_parameters_are_really_split(mesh_runs, family, mesh, parity_note):
    b = mesh_runs[family].report["bytes"][mesh]
    model = int(mesh.split("x")[1])
    per_device = set(b["per_device"].values())
    parity_note(
        f"{family} mesh {mesh}: {b['total']} parameter bytes, {b['split_total']} in split parameters; "
        f"per device {sorted(per_device)} (split {sorted(set(b['split_per_device'].values()) or {0})})"
    )
    assert len(b["per_device"]) == 8 and len(per_device) == 1  # every device holds the same amount
    if model == 1:
        assert b["split_total"] == 0 and per_device == {b["total"]}
        return
    # Almost every byte is in a split parameter, and each device holds 1/model of those.
    assert b["split_total"] >= 0.9 * b["total"]
    assert set(b["split_per_device"].values()) == {b["split_total"] // model}
    assert per_device.pop() < b["total"] / model + (b["total"] - b["split_total"])


@pytest.mark.parametrize("family, mesh", FAMILY_MESHES)
@pytest.mark.slow
def test_estimate_predicts_the_measured_parameter_bytes(mesh_runs, family, mesh):
    """`estimate.mesh_bytes` (the --mesh planner) equals what each device really holds."""
    from zspa_jax.families import read_config

    model, _ = mesh_runs["_paths"][family]
    data, size = (int(x) for x in mesh.split("x"))
    planned = estimate.mesh_bytes(
        read_config(model), {"data": data, "model": size}, batch=ROWS, length=64
    )
    measured = mesh_runs[family].report["bytes"][mesh]
    assert planned["param_bytes_total"] == measured["total"]
    assert set(measured["per_device"].values()) == {planned["param_bytes_per_device"]}


def test_estimate_cli_mesh(capsys, monkeypatch):
    # The 13B widths and heads with 2 layers per stack: the same arithmetic, cheap to trace.
    monkeypatch.setitem(
        estimate.MODELS, "llava-1.5-13b", lambda: _two_layers(estimate.llava_1_5_13b_config())
    )
    assert (
        estimate.main(
            [
                "--model",
                "llava-1.5-13b",
                "--mesh",
                "data=2,model=8",
                "--batch",
                "3",
                "--keep",
                "576",
                "64",
                "--new-tokens",
                "4",
                "--json",
            ]
        )
        == 0
    )
    full, pruned = json.loads(capsys.readouterr().out)
    assert (
        full["rows_per_device"] == 2 and full["kv_heads_split"]
    )  # 3 rows padded to 4 over data=2; 40 heads / 8
    t = _two_layers(estimate.llava_1_5_13b_config()).text
    assert full["kv_cache_bytes_per_device"] == estimate.kv_cache_bytes(t, 2, 60 + 576 + 4, 2) // 8
    assert pruned["kv_cache_bytes_per_device"] == estimate.kv_cache_bytes(t, 2, 60 + 64 + 4, 2) // 8
    assert (
        full["param_bytes_total"] / 8
        < full["param_bytes_per_device"]
        < full["param_bytes_total"] / 8 * 1.01
    )
    with pytest.raises(SystemExit) as bad:
        estimate.main(["--mesh", "data=2,model"])
    assert (
        bad.value.code == 2
        and "--mesh: mesh must look like 'data=D,model=M'" in capsys.readouterr().err
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_streaming_on_a_mesh_yields_the_same_tokens(mesh_runs, family):
    run = mesh_runs[family]
    np.testing.assert_array_equal(run.out["stream_2x4"], run.out["tokens_single"])


@pytest.mark.slow
def test_explicit_and_auto_meshes_both_ran(mesh_runs):
    assert mesh_runs["llava"].report["mesh_types"] == {
        "1x8": "Explicit",
        "2x4": "Explicit",
        "8x1": "Auto",
    }


@pytest.mark.parametrize(
    "case, needles",
    [
        ("axis_names", ["mesh", "'batch'", "missing ['data']"]),
        ("not_a_mesh", ["mesh must be a jax.sharding.Mesh", "dict"]),
        ("model_axis_3", ["axis 'model'", "size 3", "divides no parameter"]),
        ("other_devices", ["cpu:7", "does not hold"]),
        ("already_sharded", ["already split over mesh", "'data': 2"]),
        ("traced_odd_batch", ["3 rows", "axis 'data' (2)", "traced"]),
    ],
)
@pytest.mark.slow
def test_bad_meshes_are_refused_by_name(mesh_runs, case, needles):
    message = mesh_runs["llava"].report["errors"][case]
    for needle in needles:
        assert needle in message, message


@pytest.mark.slow
def test_shard_places_a_loaded_model(mesh_runs):
    assert mesh_runs["llava"].report["errors"]["one_device_shard_ok"] == "no error"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The family with the most host-side arrays (3-D positions, window layouts); the
# multi-process path itself names no family.
@pytest.mark.parametrize("family", ("qwen2_5_vl",))
@pytest.mark.slow
def test_two_processes_give_the_same_tokens(mesh_runs, family, tmp_path):
    model, inputs = mesh_runs["_paths"][family]
    port, out = _free_port(), tmp_path / "multi.npz"
    procs = [
        _worker(
            model,
            inputs,
            out,
            "--meshes",
            "2x4",
            "--devices",
            "4",
            "--new-tokens",
            str(NEW_TOKENS),
            "--process-id",
            str(i),
            "--num-processes",
            "2",
            "--port",
            str(port),
        )
        for i in range(2)
    ]
    for proc in procs:
        _wait(proc)
    multi, single = np.load(out), mesh_runs[family].out
    report = json.loads(str(multi["report"]))
    assert len(report["bytes"]["2x4"]["per_device"]) == 4  # this process held 4 of the 8 devices
    for key in ("tokens", "pruned_tokens", "kept"):
        np.testing.assert_array_equal(multi[f"{key}_2x4"], single[f"{key}_single"])
    np.testing.assert_array_equal(multi["tokens_odd_2x4"], single["tokens_single"][:ODD_ROWS])
    real = mesh_runs[family].mask
    assert np.abs(multi["logits_2x4"] - single["logits_single"])[real].max() <= reorder_bound(
        single["logits_single"][real]
    )


# ------------------------------------------------------------- no devices needed


def _two_layers(cfg):
    """The real widths with 2 layers per stack: the rules match per layer (cheap to trace)."""
    import dataclasses

    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, num_hidden_layers=2),
        text=dataclasses.replace(cfg.text, num_hidden_layers=2),
    )


def test_rule_tables_split_like_megatron():
    from models.checkpoint import flatten
    from models.llava import LlavaForConditionalGeneration
    from zspa_jax.families import param_template

    cfg = _two_layers(estimate.llava_1_5_7b_config())
    shapes = {p: tuple(t.shape) for p, t in flatten(param_template(cfg)).items()}
    plan = sharding.plan_params(
        shapes, LlavaForConditionalGeneration.SHARDING_RULES, {"data": 1, "model": 8}
    )
    s = plan.specs
    attn = "language_model.model.layers.0.self_attn."
    assert s[attn + "q_proj.kernel"] == sharding.P(None, "model")
    assert s[attn + "o_proj.kernel"] == sharding.P("model", None)
    assert s["language_model.model.layers.0.mlp.down_proj.kernel"] == sharding.P("model", None)
    assert s["language_model.lm_head.kernel"] == sharding.P(None, "model")
    assert s["vision_tower.encoder.layers.0.mlp.fc1.kernel"] == sharding.P(None, "model")
    assert s["language_model.model.norm.scale"] == sharding.P()
    # CLIP's 577 positions and 1024 width divide 8; nothing had to be replicated.
    assert plan.replicated == ()
    odd = sharding.plan_params(
        shapes, LlavaForConditionalGeneration.SHARDING_RULES, {"data": 1, "model": 3}
    )
    assert any(
        "q_proj.kernel dim 1 (4096) does not divide model=3: replicated" in r
        for r in odd.replicated
    )


def test_every_parameter_of_both_families_has_a_rule_or_is_small():
    """A parameter no rule matches is replicated: only norms, biases of row-split layers
    and small embeddings may fall through (a renamed layer would silently replicate)."""
    from models.checkpoint import flatten
    from zspa_jax.families import family_of, param_template

    for cfg in (
        _two_layers(estimate.llava_1_5_7b_config()),
        estimate.qwen2_5_vl_7b_config(text_layers=2, vision_depth=4),
    ):
        shapes = {p: tuple(t.shape) for p, t in flatten(param_template(cfg)).items()}
        plan = sharding.plan_params(
            shapes, family_of(cfg).model_cls.SHARDING_RULES, {"data": 1, "model": 8}
        )
        unsplit = {p: shapes[p] for p, spec in plan.specs.items() if spec == sharding.P()}
        assert all(np.prod(shape) <= 1024 * 1024 for shape in unsplit.values()), {
            p: s for p, s in unsplit.items() if np.prod(s) > 1024 * 1024
        }


@pytest.mark.parametrize(
    "text, expected",
    [("data=2,model=4", {"data": 2, "model": 4}), ("model=8", {"data": 1, "model": 8})],
)
def test_parse_mesh_shape(text, expected):
    assert sharding.parse_mesh_shape(text) == expected


@pytest.mark.parametrize("text", ["data=2,model=0", "batch=2", "data:2", "data=x"])
def test_parse_mesh_shape_refuses_bad_text(text):
    with pytest.raises(ValueError, match="data=D,model=M"):
        sharding.parse_mesh_shape(text)


@pytest.mark.slow
def test_one_device_mesh_works_in_process(converted, tiny_hf_llava):
    """A 1x1 mesh (the only one this process has) gives the same logits as no mesh."""
    tiny = tiny_hf_llava("mesh")
    a = _llava_inputs(tiny)
    path = converted(tiny.path)
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    np.testing.assert_array_equal(
        zspa_jax.forward(zspa_jax.load(path, mesh=mesh), **a),
        zspa_jax.forward(zspa_jax.load(path), **a),
    )
