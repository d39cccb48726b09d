"""`python -m zspa_jax demo`: the main job, offline, on the embedded demo model.

Makes a scene, asks one question of each type, answers with all 576 visual tokens and
with ZSPAPrune keeping `keep`, prints answers and timings, and writes a picture of which
tokens each question kept.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 288  # pixels per scene panel in the picture


def demo_model_path() -> Path:
    path = Path(str(resources.files("zspa_jax") / "assets" / "demo_model"))
    if not (path / "zspa_config.json").exists():
        raise FileNotFoundError(f"the embedded demo model is missing at {path}; reinstall the package")
    return path


def kept_tokens_picture(image: Image.Image, rows: list[dict], grid: int, out: Path) -> None:
    """One panel per question: kept patches at full brightness, pruned ones dimmed."""
    font = ImageFont.load_default()
    caption_h = 64
    canvas = Image.new("RGB", (PANEL * len(rows), PANEL + caption_h), "white")
    base = image.convert("RGB").resize((PANEL, PANEL), Image.NEAREST)
    cell = PANEL / grid
    for i, row in enumerate(rows):
        keep = np.zeros(grid * grid, bool)
        keep[row["kept"]] = True
        dim = Image.new("RGBA", (PANEL, PANEL), (0, 0, 0, 0))
        draw = ImageDraw.Draw(dim)
        for idx in np.flatnonzero(~keep):
            y, x = divmod(int(idx), grid)
            draw.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], fill=(0, 0, 0, 170))
        panel = Image.alpha_composite(base.convert("RGBA"), dim).convert("RGB")
        canvas.paste(panel, (i * PANEL, 0))
        text = ImageDraw.Draw(canvas)
        lines = [row["question"], f"truth: {row['truth']}", f"pruned: {row['pruned']}  full: {row['full']}"]
        for j, line in enumerate(lines):
            text.text((i * PANEL + 6, PANEL + 4 + 19 * j), line, fill="black", font=font)
    canvas.save(out)


def run_demo(out: str | Path = "zspa_demo.png", keep: int = 64, seed: int = 0) -> int:
    import zspa_jax
    from zspa_jax.demo import scenes

    t_start = time.perf_counter()
    vlm = zspa_jax.load(demo_model_path())
    scene = scenes.make_scene("test", seed)
    image = scenes.render(scene)
    rng = np.random.default_rng(seed)
    qas = [qa for qa in (scenes.ask(scene, t, rng) for t in scenes.QUESTION_TYPES) if qa is not None]
    prompts = [scenes.chat_prompt(qa.question) for qa in qas]
    images = [image] * len(qas)
    n_visual = vlm.tokens_per_image
    prune = zspa_jax.PruneConfig(keep=keep)

    full = zspa_jax.generate(vlm, prompts, images, max_new_tokens=4)
    # The demo model only ever saw the question after all 576 image positions, so kept
    # tokens keep their original RoPE positions (renumbering costs it accuracy; see README).
    pruned = zspa_jax.generate(vlm, prompts, images, prune=prune, max_new_tokens=4, keep_positions=True)
    # Second calls show steady-state speed (the first ones include compilation).
    full_warm = zspa_jax.generate(vlm, prompts, images, max_new_tokens=4)
    pruned_warm = zspa_jax.generate(vlm, prompts, images, prune=prune, max_new_tokens=4, keep_positions=True)

    rows = []
    print(f"scene: {scene.caption()}\n")
    header = f"{'question':<44} {'truth':<8} {'all ' + str(n_visual):<10} {'keep ' + str(keep):<10}"
    print(header + "\n" + "-" * len(header))
    for i, qa in enumerate(qas):
        row = dict(
            question=qa.question, truth=qa.answer, full=full.texts[i] or "-", pruned=pruned.texts[i] or "-",
            kept=pruned.kept_indices[i],
        )
        rows.append(row)
        print(f"{qa.question:<44} {qa.answer:<8} {row['full']:<10} {row['pruned']:<10}")
    correct = lambda res: sum(t == qa.answer for t, qa in zip(res.texts, qas))
    print(f"\ncorrect: {correct(full)}/{len(qas)} with all {n_visual} visual tokens, "
          f"{correct(pruned)}/{len(qas)} keeping {keep} ({100 * (1 - keep / n_visual):.0f}% pruned)")
    fs, ps = full_warm.stats, pruned_warm.stats
    print(
        f"prefill of {len(qas)} prompts: {fs['prefill_seconds'] * 1e3:.0f} ms at {max(fs['prompt_tokens_per_row_pruned'])} "
        f"tokens -> {ps['prefill_seconds'] * 1e3:.0f} ms at {max(ps['prompt_tokens_per_row_pruned'])} tokens "
        f"(x{fs['prefill_seconds'] / ps['prefill_seconds']:.1f}); KV cache {fs['kv_cache_bytes'] / 2**20:.2f} -> "
        f"{ps['kv_cache_bytes'] / 2**20:.2f} MiB"
    )
    grid = int(round(n_visual**0.5))
    out = Path(out)
    kept_tokens_picture(image, rows, grid, out)
    print(f"kept tokens per question: {out}  (total {time.perf_counter() - t_start:.0f} s)")
    return 0
