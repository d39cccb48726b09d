"""`python -m zspa_jax demo` (zspa_jax.demo.run): terminal lines and the picture of kept tokens."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from zspa_jax.demo import run, scenes


def test_articles_and_scene_description():
    assert run.with_article("orange circle") == "an orange circle"
    assert run.with_article("red star") == "a red star"
    assert run.with_article("gray") == "a gray"
    scene = scenes.make_scene("test", 0)
    text = run.describe(scene)
    for o in scene.objects:
        article = "an" if o.colour[0] in "aeiou" else "a"
        assert f"{article} {o.colour} {o.shape} at {o.position}" in text
    assert " a orange" not in text and text.endswith(f"on a {scene.background} background")


def test_score_sentence_says_when_pruning_scored_higher():
    higher = run._score_sentence(4, 5, 7, 64, 576)
    assert "pruned model (64 tokens) scored higher than the unpruned one (5 vs 4 right)" in higher
    assert "chance" in higher
    assert "scored higher" not in run._score_sentence(5, 5, 7, 64, 576)
    assert "cost 2 of 7 answers" in run._score_sentence(5, 3, 7, 64, 576)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run (keep 64, seed 0): its stdout and picture."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "zspa_demo.png"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run.run_demo(out=out, keep=64, seed=0) == 0
    return buf.getvalue(), out


@pytest.mark.slow
def test_demo_explains_the_sequence_and_the_scores(demo):
    stdout, _ = demo
    flat = " ".join(stdout.split())  # the long lines are wrapped
    from zspa_jax.families.llava import FAMILY

    processor = FAMILY.adapter.load_processor(run.demo_model_path())
    scene = scenes.make_scene("test", 0)
    rng = np.random.default_rng(0)
    qas = [
        qa for qa in (scenes.ask(scene, t, rng) for t in scenes.QUESTION_TYPES) if qa is not None
    ]
    # The processor's own expansion of <image>: the length of what the language model reads.
    lengths = [
        processor(
            text=[scenes.chat_prompt(qa.question)], images=[scene.render()], return_tensors="np"
        )["input_ids"].shape[1]
        for qa in qas
    ]
    lo, hi = min(lengths), max(lengths)
    span = lambda a, b: f"{a}" if a == b else f"{a}-{b}"  # noqa: E731
    assert f"Each prompt is {span(lo - 576, hi - 576)} text tokens" in flat
    assert "plus 576 visual tokens (one per 4x4-pixel patch of the 96x96 image)" in flat
    assert f"{span(lo, hi)} tokens for the language model" in flat
    assert (
        f"ZSPAPrune keeps 64 of the 576 visual tokens, chosen per question, so the same prompts are {span(lo - 512, hi - 512)} tokens"
        in flat
    )
    assert f"scene: {run.describe(scene)}" in flat

    m = re.search(r"correct: (\d+)/(\d+) with all 576 visual tokens, (\d+)/(\d+) keeping 64", flat)
    assert m, stdout
    full_ok, n, pruned_ok = int(m[1]), int(m[2]), int(m[3])
    assert n == len(qas)
    # The table's rows agree with the summary.
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1
    table = [line.split() for line in lines[start : start + n]]
    assert [" ".join(r[:-3]) for r in table] == [qa.question for qa in qas]
    assert [r[-3] for r in table] == [qa.answer for qa in qas]
    assert len(table) == n
    assert (
        sum(r[-3] == r[-2] for r in table) == full_ok
        and sum(r[-3] == r[-1] for r in table) == pruned_ok
    )
    if pruned_ok > full_ok:
        assert f"scored higher than the unpruned one ({pruned_ok} vs {full_ok} right)" in flat
    else:
        assert "scored higher" not in flat


def test_demo_picture_shows_kept_tokens_and_an_unpruned_reference(tmp_path):
    """The picture's panels: the reference is the scene untouched; each question panel
    keeps exactly its kept patches at full colour and dims every other one."""
    image = scenes.make_scene("test", 3).render()
    grid = scenes.GRID
    rng = np.random.default_rng(0)
    rows = [
        dict(
            question="what colour is the circle ?",
            truth="red",
            full="red",
            pruned="blue",
            kept=np.sort(rng.choice(grid * grid, 64, replace=False)),
        ),
        dict(
            question="how many shapes are there ?",
            truth="3",
            full="2",
            pruned="3",
            kept=np.sort(rng.choice(grid * grid, 64, replace=False)),
        ),
    ]
    out = tmp_path / "p.png"
    corners = run.kept_tokens_picture(
        image, rows, grid, out, 64, grid * grid, "a red circle", (10.0, 10.0)
    )
    pic = np.asarray(Image.open(out).convert("RGB")).astype(int)
    base = np.asarray(image.convert("RGB").resize((run.PANEL, run.PANEL), Image.NEAREST)).astype(
        int
    )
    assert len(corners) == 1 + len(rows)
    cell = run.PANEL / grid
    centres = ((np.arange(grid) + 0.5) * cell).astype(int)
    x0, y0 = corners[0]
    np.testing.assert_array_equal(pic[y0 : y0 + run.PANEL, x0 : x0 + run.PANEL], base)
    for (x0, y0), row in zip(corners[1:], rows):
        panel = pic[y0 : y0 + run.PANEL, x0 : x0 + run.PANEL]
        same = np.array(
            [[np.array_equal(panel[y, x], base[y, x]) for x in centres] for y in centres]
        ).reshape(-1)
        darker = np.array(
            [[panel[y, x].sum() < base[y, x].sum() for x in centres] for y in centres]
        ).reshape(-1)
        kept = np.zeros(grid * grid, bool)
        kept[row["kept"]] = True
        np.testing.assert_array_equal(same, kept)
        np.testing.assert_array_equal(darker, ~kept)
    # The title and legend sit above the panels.
    assert min(y for _, y in corners) > 3 * run.TITLE_SIZE


@pytest.mark.slow
def test_demo_writes_its_picture(demo):
    stdout, out = demo
    assert f"kept tokens per question: {out}" in stdout
    pic = Image.open(out)
    # Reference + one panel per question, in rows of run.COLUMNS.
    assert pic.width == run.COLUMNS * run.PANEL + (run.COLUMNS + 1) * run.MARGIN
    assert pic.height > 2 * run.PANEL
