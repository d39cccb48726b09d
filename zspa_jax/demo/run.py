"""`python -m zspa_jax demo`: the main job, offline, on the embedded demo model.

Makes a scene, asks one question of each type, answers with all 576 visual tokens and
with ZSPAPrune keeping `keep`, prints answers and timings, and writes a picture of which
tokens each question kept.
"""

from __future__ import annotations

import textwrap
import time
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 320  # pixels per scene panel in the picture
COLUMNS = 4  # panels per row: 8 panels (reference + 7 questions) fit a screen in 2 rows
DIM_ALPHA = 170  # dropped tokens: black at this opacity over the image
FONT_SIZE = 22  # captions; still ~11 px when the 1280 px wide picture is shown at half size
TITLE_SIZE = 30
MARGIN = 10
INK, GOOD, BAD = (20, 20, 20), (0, 110, 40), (180, 20, 20)


def demo_model_path() -> Path:
    path = Path(str(resources.files("zspa_jax") / "assets" / "demo_model"))
    if not (path / "zspa_config.json").exists():
        raise FileNotFoundError(
            f"the embedded demo model is missing at {path}; reinstall the package"
        )
    return path


def with_article(phrase: str) -> str:
    """ "orange circle" -> "an orange circle"; "red star" -> "a red star"."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def describe(scene) -> str:
    """Plain-English description of a scene (the model's own caption words, with articles)."""
    from zspa_jax.demo import scenes

    ordered = sorted(scene.objects, key=lambda o: (scenes.POSITIONS.index(o.position), o.cx))
    parts = [f"{with_article(f'{o.colour} {o.shape}')} at {o.position}" for o in ordered]
    objects = (
        "no shapes"
        if not parts
        else parts[0]
        if len(parts) == 1
        else ", ".join(parts[:-1]) + " and " + parts[-1]
    )
    return f"{objects}, on {with_article(scene.background)} background"


def _font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font: offline, scalable


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _dimmed(base: Image.Image, kept: np.ndarray | None, grid: int) -> Image.Image:
    """`base` with every patch not in `kept` darkened (None: nothing dropped)."""
    if kept is None:
        return base.copy()
    keep = np.zeros(grid * grid, bool)
    keep[np.asarray(kept)] = True
    cell = base.width / grid
    dim = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(dim)
    for idx in np.flatnonzero(~keep):
        y, x = divmod(int(idx), grid)
        draw.rectangle(
            [x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], fill=(0, 0, 0, DIM_ALPHA)
        )
    return Image.alpha_composite(base.convert("RGBA"), dim).convert("RGB")


def kept_tokens_picture(
    image: Image.Image,
    rows: list[dict],
    grid: int,
    out: Path,
    keep: int,
    n_visual: int,
    scene_text: str = "",
    swatch_centre: tuple[float, float] | None = None,
) -> list[tuple[int, int]]:
    """A title with the budget, a legend, an unpruned reference panel, then one panel per
    question: kept patches in full colour, dropped ones dimmed; captions give the question,
    the true answer and both models' answers (green right, red wrong). `swatch_centre`:
    where in `image` (its pixels) the legend's sample patch comes from. Returns the top-left
    corner of each PANEL x PANEL image panel (the reference first)."""
    font, bold = _font(FONT_SIZE), _font(TITLE_SIZE)
    line_h = FONT_SIZE + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    base = image.convert("RGB").resize((PANEL, PANEL), Image.NEAREST)

    panels = [
        dict(title="unpruned reference", lines=[(f"all {n_visual} visual tokens", INK)], kept=None)
    ]
    for row in rows:
        question = row["question"].replace(" ?", "?").replace(" .", ".")  # display form
        lines = [(t, INK) for t in _wrap(measure, question, font, PANEL - 2 * MARGIN)]
        lines.append((f"truth: {row['truth']}", INK))
        for label, answer in ((f"all {n_visual}", row["full"]), (f"keep {keep}", row["pruned"])):
            lines.append((f"{label}: {answer}", GOOD if answer == row["truth"] else BAD))
        panels.append(dict(title=None, lines=lines, kept=row["kept"]))
    caption_h = (
        MARGIN + line_h * max(len(p["lines"]) + (p["title"] is not None) for p in panels) + MARGIN
    )

    columns = min(COLUMNS, len(panels))
    n_rows = -(-len(panels) // columns)
    width = columns * PANEL + (columns + 1) * MARGIN
    title = f"ZSPAPrune: {keep} of {n_visual} visual tokens kept ({100 * (1 - keep / n_visual):.0f}% dropped), per question"
    title_lines = _wrap(measure, title, bold, width - 2 * MARGIN)
    scene_lines = (
        _wrap(measure, f"Scene: {scene_text}", font, width - 2 * MARGIN) if scene_text else []
    )
    swatch = 2 * FONT_SIZE
    header_h = (
        MARGIN
        + len(title_lines) * (TITLE_SIZE + 8)
        + len(scene_lines) * line_h
        + swatch
        + 2 * MARGIN
    )
    canvas = Image.new("RGB", (width, header_h + n_rows * (PANEL + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)

    y = MARGIN
    for t in title_lines:
        draw.text((MARGIN, y), t, fill=INK, font=bold)
        y += TITLE_SIZE + 8
    for t in scene_lines:
        draw.text((MARGIN, y), t, fill=INK, font=font)
        y += line_h
    # Legend: a patch of the scene's own colours, as kept and as dropped.
    y += MARGIN // 2
    cx, cy = (0.0, 0.0) if swatch_centre is None else swatch_centre
    sx = int(min(max(cx * PANEL / image.width - swatch / 2, 0), PANEL - swatch))
    sy = int(min(max(cy * PANEL / image.height - swatch / 2, 0), PANEL - swatch))
    sample = base.crop((sx, sy, sx + swatch, sy + swatch))
    x = MARGIN
    for label, patch in (
        ("kept token: full colour", sample),
        ("dropped token: dimmed", _dimmed(sample, np.zeros(0, int), 1)),
    ):
        canvas.paste(patch, (x, y))
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], outline=INK)
        draw.text((x + swatch + 8, y + (swatch - FONT_SIZE) // 2 - 2), label, fill=INK, font=font)
        x += swatch + 8 + int(draw.textlength(label, font=font)) + 3 * MARGIN

    corners = []
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        x0 = MARGIN + c * (PANEL + MARGIN)
        y0 = header_h + r * (PANEL + caption_h)
        corners.append((x0, y0))
        canvas.paste(_dimmed(base, p["kept"], grid), (x0, y0))
        ty = y0 + PANEL + MARGIN // 2
        if p["title"]:
            draw.text((x0, ty), p["title"], fill=INK, font=_font(FONT_SIZE + 2))
            ty += line_h
        for text, colour in p["lines"]:
            draw.text((x0, ty), text, fill=colour, font=font)
            ty += line_h
    canvas.save(out)
    return corners


def _span(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _wrap_text(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False)


def _score_sentence(full_ok: int, pruned_ok: int, n: int, keep: int, n_visual: int) -> str:
    if pruned_ok > full_ok:
        return (
            f"Note: on these {n} questions the pruned model ({keep} tokens) scored higher than the unpruned one "
            f"({pruned_ok} vs {full_ok} right). That is chance on a handful of questions, not a gain from pruning: "
            f"over 500 test questions pruning costs this model accuracy (benchmarks/results/accuracy_keep_positions.md)."
        )
    if pruned_ok == full_ok:
        return f"Pruning to {keep} of {n_visual} visual tokens changed no score on these {n} questions."
    return f"Pruning to {keep} of {n_visual} visual tokens cost {full_ok - pruned_ok} of {n} answers here."


def run_demo(out: str | Path = "zspa_demo.png", keep: int = 64, seed: int = 0) -> int:
    import zspa_jax
    from zspa_jax.demo import scenes

    t_start = time.perf_counter()
    vlm = zspa_jax.load(demo_model_path())
    scene = scenes.make_scene("test", seed)
    image = scenes.render(scene)
    rng = np.random.default_rng(seed)
    qas = [
        qa for qa in (scenes.ask(scene, t, rng) for t in scenes.QUESTION_TYPES) if qa is not None
    ]
    prompts = [scenes.chat_prompt(qa.question) for qa in qas]
    images = [image] * len(qas)
    n_visual = vlm.tokens_per_image
    prune = zspa_jax.PruneConfig(keep=keep)

    full = zspa_jax.generate(vlm, prompts, images, max_new_tokens=4)
    # The demo model only ever saw the question after all 576 image positions, so kept
    # tokens keep their original RoPE positions (renumbering costs it accuracy; see README).
    pruned = zspa_jax.generate(
        vlm, prompts, images, prune=prune, max_new_tokens=4, keep_positions=True
    )
    # Second calls show steady-state speed (the first ones include compilation).
    full_warm = zspa_jax.generate(vlm, prompts, images, max_new_tokens=4)
    pruned_warm = zspa_jax.generate(
        vlm, prompts, images, prune=prune, max_new_tokens=4, keep_positions=True
    )
    kept_count = int(pruned.kept_indices.shape[1])

    # What the model reads: the text of the prompt (BOS, system line, question) with the
    # one <image> placeholder expanded to n_visual visual tokens.
    text_tokens = [n - n_visual for n in full.stats["prompt_tokens_per_row"]]
    lo, hi = min(text_tokens), max(text_tokens)
    print(_wrap_text(f"scene: {describe(scene)}") + "\n")
    print(
        _wrap_text(
            f'Each prompt is {_span(lo, hi)} text tokens (the system line "{scenes.SYSTEM}" and the question) plus '
            f"{n_visual} visual tokens (one per {scenes.PATCH_SIZE}x{scenes.PATCH_SIZE}-pixel patch of the "
            f"{scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE} image): {_span(lo + n_visual, hi + n_visual)} tokens for the language model. "
            f"ZSPAPrune keeps {kept_count} of the {n_visual} visual tokens, chosen per question, so the same prompts "
            f"are {_span(lo + kept_count, hi + kept_count)} tokens."
        )
        + "\n"
    )

    rows = []
    header = f"{'question':<44} {'truth':<8} {'all ' + str(n_visual):<10} {'keep ' + str(kept_count):<10}"
    print(header + "\n" + "-" * len(header))
    for i, qa in enumerate(qas):
        row = dict(
            question=qa.question,
            truth=qa.answer,
            full=full.texts[i] or "-",
            pruned=pruned.texts[i] or "-",
            kept=pruned.kept_indices[i],
        )
        rows.append(row)
        print(f"{qa.question:<44} {qa.answer:<8} {row['full']:<10} {row['pruned']:<10}")
    correct = lambda res: sum(t == qa.answer for t, qa in zip(res.texts, qas))
    full_ok, pruned_ok = correct(full), correct(pruned)
    print(
        f"\ncorrect: {full_ok}/{len(qas)} with all {n_visual} visual tokens, "
        f"{pruned_ok}/{len(qas)} keeping {kept_count} ({100 * (1 - kept_count / n_visual):.0f}% pruned)"
    )
    print(_wrap_text(_score_sentence(full_ok, pruned_ok, len(qas), kept_count, n_visual)))
    fs, ps = full_warm.stats, pruned_warm.stats
    print(
        f"prefill of {len(qas)} prompts: {fs['prefill_seconds'] * 1e3:.0f} ms at {max(fs['prompt_tokens_per_row_pruned'])} "
        f"tokens -> {ps['prefill_seconds'] * 1e3:.0f} ms at {max(ps['prompt_tokens_per_row_pruned'])} tokens "
        f"(x{fs['prefill_seconds'] / ps['prefill_seconds']:.1f}); KV cache {fs['kv_cache_bytes'] / 2**20:.2f} -> "
        f"{ps['kv_cache_bytes'] / 2**20:.2f} MiB"
    )
    grid = int(round(n_visual**0.5))
    out = Path(out)
    centre = (scene.objects[0].cx, scene.objects[0].cy) if scene.objects else None
    kept_tokens_picture(image, rows, grid, out, kept_count, n_visual, describe(scene), centre)
    print(f"kept tokens per question: {out}  (total {time.perf_counter() - t_start:.0f} s)")
    return 0
