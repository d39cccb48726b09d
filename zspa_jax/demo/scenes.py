"""A procedural visual-QA task: coloured shapes on a cluttered background.

Every scene is a pure function of ``(split, index)``: the generator is a numpy
``Generator`` seeded with ``(BASE_SEED, split id, index)``, so the train, val and test
splits are reproducible streams that never share a seed (and, with continuous positions
and per-pixel noise, never share an image). Nothing here touches JAX.

Scene: 96 x 96 RGB, a plain background (white / black / gray, jittered, with pixel
noise), 1-5 shapes (circle, square, triangle, cross, star; 6 colours; radius 7-12 px,
i.e. 3.5-6 patches across at the tower's 4 px patches, so one object covers ~2-8 % of the
576 visual tokens) placed without overlap, and 3-8 pieces of clutter (dots and short
lines in random colours, each smaller than a patch or one patch wide). Every
(colour, shape) pair is unique inside a scene so "the red circle" always names one
object, and object centres keep 3 px away from the 3 x 3 grid lines so "where" has one
right answer.

Questions (one-word answers), labelled by type so accuracy is reported per type:

  object questions (the answer is in one object's tokens)
    colour    what colour is the {shape} ?          (that shape occurs once)
    shape     what shape is the {colour} object ?    (that colour occurs once)
    position  where is the {colour} {shape} ?        -> top-left ... center ... bottom-right
    exists    is there a {colour} {shape} ?          -> yes / no (negatives share a colour or shape)
  counting (several objects)
    count     how many {shape}s are there ?          -> 0 ... 5
  whole image
    count_all   how many shapes are there ?          -> 1 ... 5
    background  what colour is the background ?      -> white / black / gray

Captions (stage-1 data) list the objects in reading order:
  "on a white background : a red circle at top-left , a blue star at center ."

The chat template puts a fixed system line before the image and the question after it,
like LLaVA-1.5, so the "question" and "all_text" prompt scopes of the pruner differ:
  "a chat between a user and an assistant about an image . user : <image> {question} assistant :"
and the response is "{answer} </s>" (the tokenizer adds "<s>" in front).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
PATCH_SIZE = 4
GRID = IMAGE_SIZE // PATCH_SIZE  # 24 x 24 = 576 visual tokens, like LLaVA-1.5
BASE_SEED = 20251017
SPLITS = {"train": 0, "val": 1, "test": 2}

SHAPES = ("circle", "square", "triangle", "cross", "star")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "star": "stars",
}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (20, 20, 20), "gray": (128, 128, 128)}
CELLS = (
    ("top-left", "top", "top-right"),
    ("left", "center", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)
POSITIONS = tuple(word for row in CELLS for word in row)
MAX_OBJECTS = 5
COUNT_WORDS = tuple(str(i) for i in range(MAX_OBJECTS + 1))

QUESTION_TYPES = ("colour", "shape", "position", "exists", "count", "count_all", "background")
TYPE_GROUPS = {
    "colour": "object",
    "shape": "object",
    "position": "object",
    "exists": "object",
    "count": "counting",
    "count_all": "whole-image",
    "background": "whole-image",
}

SYSTEM = "a chat between a user and an assistant about an image ."
IMAGE_TOKEN = "<image>"
CAPTION_QUESTION = "describe the image ."


def chat_prompt(question: str) -> str:
    """The text a user feeds the processor (with `<image>`; BOS comes from the tokenizer)."""
    return f"{SYSTEM} user : {IMAGE_TOKEN} {question} assistant :"


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    angle: float  # rotation in radians (triangle / square / cross / star)
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        third = IMAGE_SIZE / 3
        return CELLS[int(self.cy // third)][int(self.cx // third)]


@dataclasses.dataclass(frozen=True)
class Scene:
    split: str
    index: int
    background: str
    bg_rgb: tuple[int, int, int]
    objects: tuple[Obj, ...]
    clutter: tuple[tuple, ...]  # ("dot", x, y, r, rgb) | ("line", x0, y0, x1, y1, rgb)
    noise_seed: int

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def caption(self) -> str:
        ordered = sorted(self.objects, key=lambda o: (POSITIONS.index(o.position), o.cx))
        parts = " , ".join(f"a {o.colour} {o.shape} at {o.position}" for o in ordered)
        return f"on a {self.background} background : {parts} ."

    def render(self) -> Image.Image:
        return render(self)


@dataclasses.dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str
    target: int | None = None  # index of the object the answer depends on (object questions)


def _rng(split: str, index: int, stream: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([BASE_SEED, SPLITS[split], int(index), stream])


def _jitter(rgb, rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def make_scene(split: str, index: int, max_objects: int = MAX_OBJECTS) -> Scene:
    """The scene `index` of `split` (pure function of its arguments).

    `max_objects` < 5 draws from a smaller scene distribution (training curriculum);
    evaluation always uses the default.
    """
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
    rng = _rng(split, index)
    background = str(rng.choice(list(BACKGROUNDS)))
    n_objects = int(rng.integers(1, max_objects + 1))
    objects: list[Obj] = []
    used: set[tuple[str, str]] = set()
    attempts = 0
    while len(objects) < n_objects and attempts < 500:
        attempts += 1
        # Reuse an earlier shape 40 % of the time so counts above 1 are common.
        if objects and rng.random() < 0.4:
            shape = objects[int(rng.integers(len(objects)))].shape
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if (colour, shape) in used:
            continue
        radius = float(rng.uniform(7.0, 12.0))
        cx, cy = (float(v) for v in rng.uniform(radius + 1, IMAGE_SIZE - radius - 1, size=2))
        # Keep centres clear of the 3 x 3 grid lines: "where" then has one answer.
        if any(abs(c - g) < 3.0 for c in (cx, cy) for g in (IMAGE_SIZE / 3, 2 * IMAGE_SIZE / 3)):
            continue
        if any(math.hypot(cx - o.cx, cy - o.cy) < radius + o.radius + 3 for o in objects):
            continue
        angle = float(rng.uniform(-0.35, 0.35))
        objects.append(Obj(shape, colour, cx, cy, radius, angle, _jitter(COLOURS[colour], rng, 18)))
        used.add((colour, shape))
    clutter = []
    for _ in range(int(rng.integers(3, 9))):
        rgb = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x, y = (float(v) for v in rng.uniform(2, IMAGE_SIZE - 2, size=2))
        if rng.random() < 0.5:
            clutter.append(("dot", x, y, float(rng.uniform(0.8, 1.8)), rgb))
        else:
            length, theta = float(rng.uniform(3, 8)), float(rng.uniform(0, math.pi))
            clutter.append(
                ("line", x, y, x + length * math.cos(theta), y + length * math.sin(theta), rgb)
            )
    return Scene(
        split=split,
        index=int(index),
        background=background,
        bg_rgb=_jitter(BACKGROUNDS[background], rng, 12),
        objects=tuple(objects),
        clutter=tuple(clutter),
        noise_seed=int(rng.integers(2**31)),
    )


def _polygon(obj: Obj) -> list[tuple[float, float]]:
    r, a = obj.radius, obj.angle
    if obj.shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif obj.shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif obj.shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    elif obj.shape == "cross":
        w = 0.33 * r
        corners = [
            (w, r),
            (w, w),
            (r, w),
            (r, -w),
            (w, -w),
            (w, -r),
            (-w, -r),
            (-w, -w),
            (-r, -w),
            (-r, w),
            (-w, w),
            (-w, r),
        ]
        return [
            (obj.cx + x * math.cos(a) - y * math.sin(a), obj.cy + x * math.sin(a) + y * math.cos(a))
            for x, y in corners
        ]
    else:
        raise ValueError(obj.shape)
    return [(obj.cx + rr * math.cos(t + a), obj.cy + rr * math.sin(t + a)) for t, rr in pts]


def render(scene: Scene) -> Image.Image:
    """Draw the scene: a 96 x 96 RGB PIL image (deterministic)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.bg_rgb)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        if obj.shape == "circle":
            r = obj.radius
            draw.ellipse([obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r], fill=obj.rgb)
        else:
            draw.polygon(_polygon(obj), fill=obj.rgb)
    for item in scene.clutter:
        if item[0] == "dot":
            _, x, y, r, rgb = item
            draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
        else:
            _, x0, y0, x1, y1, rgb = item
            draw.line([x0, y0, x1, y1], fill=rgb, width=1)
    noise = np.random.default_rng(scene.noise_seed).normal(
        0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> QA | None:
    """One question of `qtype` about `scene`, or None if the scene cannot support it."""
    objs = scene.objects
    if qtype == "colour":
        unique = [i for i, o in enumerate(objs) if scene.count(o.shape) == 1]
        if not unique:
            return None
        i = unique[int(rng.integers(len(unique)))]
        return QA(qtype, f"what colour is the {objs[i].shape} ?", objs[i].colour, i)
    if qtype == "shape":
        unique = [i for i, o in enumerate(objs) if sum(p.colour == o.colour for p in objs) == 1]
        if not unique:
            return None
        i = unique[int(rng.integers(len(unique)))]
        return QA(qtype, f"what shape is the {objs[i].colour} object ?", objs[i].shape, i)
    if qtype == "position":
        i = int(rng.integers(len(objs)))
        return QA(qtype, f"where is the {objs[i].colour} {objs[i].shape} ?", objs[i].position, i)
    if qtype == "exists":
        if rng.random() < 0.5:
            i = int(rng.integers(len(objs)))
            return QA(qtype, f"is there a {objs[i].colour} {objs[i].shape} ?", "yes", i)
        present = {(o.colour, o.shape) for o in objs}
        # Hard negatives: share the colour or the shape of an object that is there.
        near = sorted(
            {(o.colour, s) for o in objs for s in SHAPES}
            | {(c, o.shape) for o in objs for c in COLOURS}
        )
        near = [p for p in near if p not in present]
        pool = (
            near
            if near and rng.random() < 0.8
            else [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        )
        colour, shape = pool[int(rng.integers(len(pool)))]
        return QA(qtype, f"is there a {colour} {shape} ?", "no")
    if qtype == "count":
        # Ask about a present shape 80 % of the time (otherwise "0" would dominate).
        if rng.random() < 0.8:
            shape = objs[int(rng.integers(len(objs)))].shape
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return QA(qtype, f"how many {PLURALS[shape]} are there ?", str(scene.count(shape)))
    if qtype == "count_all":
        return QA(qtype, "how many shapes are there ?", str(len(objs)))
    if qtype == "background":
        return QA(qtype, "what colour is the background ?", scene.background)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


@dataclasses.dataclass(frozen=True)
class Example:
    scene: Scene
    qa: QA

    @property
    def prompt(self) -> str:
        return chat_prompt(self.qa.question)

    def image(self) -> Image.Image:
        return render(self.scene)


def example(split: str, index: int) -> Example:
    """Evaluation item `index` of `split`: scene `index` with one question.

    Types cycle through QUESTION_TYPES (balanced per-type counts); a type the scene
    cannot support (e.g. no unique shape) falls through to the next one.
    """
    scene = make_scene(split, index)
    rng = _rng(split, index, stream=1)
    start = index % len(QUESTION_TYPES)
    for k in range(len(QUESTION_TYPES)):
        qa = ask(scene, QUESTION_TYPES[(start + k) % len(QUESTION_TYPES)], rng)
        if qa is not None:
            return Example(scene, qa)
    raise AssertionError("unreachable: position/exists/count questions always exist")


def examples(split: str, n: int, start: int = 0) -> list[Example]:
    return [example(split, i) for i in range(start, start + n)]


def training_qas(scene: Scene, n: int, rng: np.random.Generator) -> list[QA]:
    """`n` questions about one training scene, types drawn uniformly (invalid ones redrawn)."""
    out: list[QA] = []
    while len(out) < n:
        qa = ask(scene, QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))], rng)
        if qa is not None:
            out.append(qa)
    return out


def vocabulary() -> list[str]:
    """Every word any question, answer, caption or template can produce (sorted, no specials)."""
    words = set(SYSTEM.split()) | {"user", ":", "assistant"} | set(CAPTION_QUESTION.split())
    words |= {
        "what",
        "colour",
        "is",
        "the",
        "?",
        "shape",
        "object",
        "where",
        "there",
        "a",
        "how",
        "many",
        "are",
    }
    words |= {"shapes", "background", "yes", "no", "on", "at", ",", "."}
    words |= (
        set(SHAPES)
        | set(PLURALS.values())
        | set(COLOURS)
        | set(BACKGROUNDS)
        | set(POSITIONS)
        | set(COUNT_WORDS)
    )
    return sorted(words)


def answer_words() -> dict[str, tuple[str, ...]]:
    """The possible answers of each question type."""
    return {
        "colour": tuple(COLOURS),
        "shape": SHAPES,
        "position": POSITIONS,
        "exists": ("yes", "no"),
        "count": COUNT_WORDS,
        "count_all": COUNT_WORDS[1:],
        "background": tuple(BACKGROUNDS),
    }


def iter_train(start: int = 0) -> Iterator[Scene]:
    i = start
    while True:
        yield make_scene("train", i)
        i += 1
