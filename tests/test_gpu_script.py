"""benchmarks/gpu.py, the prepared GPU check: its CPU smoke run end to end (slow), and its
parity comparison failing on a perturbed reference (fast, no model)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    """benchmarks/gpu.py imported as a module (its main() is not run)."""
    spec = importlib.util.spec_from_file_location("zspa_benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def reference(gpu):
    return gpu.load_reference(gpu.REFERENCE)


def _failed(checks) -> set[tuple[str, str, str]]:
    return {(c.model, c.dtype, c.name) for c in checks if c.ok is False}


def test_carried_reference_is_small_and_complete(gpu, reference):
    assert gpu.REFERENCE.stat().st_size < 2 * 2**20
    for spec in gpu.PARITY_MODELS:
        assert len(str(reference[f"{spec.name}.fingerprint"])) == 64
        for dtype in ("float32", "bfloat16"):
            k = f"{spec.name}.{dtype}"
            assert reference[f"{k}.unpruned.logits"].shape[:2] == (2, gpu.LOGIT_POSITIONS)
            assert reference[f"{k}.pruned.kept"].shape == (2, spec.keep)
            assert reference[f"{k}.greedy.kept"].shape == (2, spec.keep)
            assert reference[f"{k}.greedy.tokens"].shape == (2, gpu.NEW_TOKENS)
            assert np.isfinite(reference[f"{k}.pruned.logits"]).all()


@pytest.mark.parametrize("kind", ["cpu", "accelerator"])
def test_reference_against_itself_passes(gpu, reference, kind):
    checks = gpu.compare(reference, reference, kind)
    assert not _failed(checks)
    assert sum(c.ok is True for c in checks) == 14


def test_perturbed_reference_fails_the_right_checks(gpu, reference):
    """Each deliberate perturbation fails exactly its own check (so the checks can fail)."""
    m = gpu.PARITY_MODELS[0].name
    scale = float(np.abs(reference[f"{m}.float32.unpruned.logits"]).max())

    def perturbed(key, change):
        bad = dict(reference)
        bad[key] = change(reference[key].copy())
        return _failed(gpu.compare(bad, reference, "accelerator"))

    def bump_first(a):
        a.flat[0] += 1
        return a

    def add(amount):
        def change(a):
            a.flat[0] += amount
            return a

        return change

    assert perturbed(f"{m}.fingerprint", lambda a: np.array("0" * 64)) == {
        (m, "-", "weights + inputs SHA-256")
    }
    # float32: 1e-3 x max|logit| is over the accelerator bound (1e-4); 5e-5 is within it.
    assert perturbed(f"{m}.float32.unpruned.logits", add(1e-3 * scale)) == {
        (m, "float32", "forward logits, unpruned")
    }
    assert perturbed(f"{m}.float32.unpruned.logits", add(5e-5 * scale)) == set()
    assert perturbed(f"{m}.float32.pruned.logits", add(np.nan)) == {
        (m, "float32", "forward logits, pruned")
    }
    assert perturbed(f"{m}.float32.pruned.kept", bump_first) == {
        (m, "float32", "forward kept indices")
    }
    assert perturbed(f"{m}.float32.greedy.kept", bump_first) == {
        (m, "float32", "generate kept indices")
    }
    tokens = f"greedy tokens ({gpu.NEW_TOKENS}/row)"
    assert perturbed(f"{m}.float32.greedy.tokens", bump_first) == {(m, "float32", tokens)}
    # bfloat16: only the unpruned sanity bound is asserted; tokens and kept indices are reported.
    assert perturbed(f"{m}.bfloat16.unpruned.logits", add(0.5 * scale)) == {
        (m, "bfloat16", "forward logits, unpruned")
    }
    assert perturbed(f"{m}.bfloat16.pruned.logits", add(0.5 * scale)) == set()
    assert perturbed(f"{m}.bfloat16.greedy.tokens", bump_first) == set()
    assert perturbed(f"{m}.bfloat16.greedy.kept", bump_first) == set()


def test_cpu_bound_is_tighter(gpu, reference):
    m = gpu.PARITY_MODELS[1].name
    key = f"{m}.float32.unpruned.logits"
    bad = dict(reference)
    bad[key] = reference[key] * (1 + 5e-5)  # within the accelerator bound, over the CPU one
    assert not _failed(gpu.compare(bad, reference, "accelerator"))
    assert _failed(gpu.compare(bad, reference, "cpu")) == {
        (m, "float32", "forward logits, unpruned")
    }


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "gpu.md"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "PARITY FAIL" not in proc.stderr
    text = out.read_text()
    assert "device cpu" in text and "CPU smoke run" in text and "Parity: PASS (14 of 14" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("llava", "qwen2_5_vl"):
            rows[tuple(cells[:3])] = cells[5]
    for model in ("llava", "qwen2_5_vl"):
        assert rows[(model, "-", "weights + inputs SHA-256")] == "PASS"
        for check in (
            "forward logits, unpruned",
            "forward logits, pruned",
            "forward kept indices",
            "generate kept indices",
            "greedy tokens (12/row)",
        ):
            assert rows[(model, "float32", check)] == "PASS", (model, check)
        assert rows[(model, "bfloat16", "forward logits, unpruned")] == "PASS"
        for check in (
            "forward logits, pruned",
            "forward kept overlap",
            "generate kept overlap",
            "greedy token agreement",
        ):
            assert rows[(model, "bfloat16", check)] == "info", (model, check)
    assert len(rows) == 22
    assert "| select_tokens (zspaprune) | B=2 N=64 D=64 K=8 T=8, f32 |" in text
    for keep, length in ((8, 26), (64, 82)):
        assert f"\n| {keep} | {length} | " in text, f"generate row for keep {keep}"
    assert "n/a" in text  # the CPU backend keeps no allocator statistics
    for line in proc.stdout.splitlines():
        if line.startswith("[") and "] " in line:
            assert line.startswith(("[PASS]", "[info]")), line
