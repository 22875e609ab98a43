"""The synthetic image-text corpus: images with known content and questions with ground-truth answers.

Every image is a 3x3 grid of cells. One to three shapes (distinct colours, distinct kinds) sit in cells;
sometimes a word is written across the middle row (then shapes use the top and bottom rows only).
Answers follow one fixed grammar, so a small drafter can predict the function words while the content
words (colour, shape, position, count, the written word) need the image.

Everything is a pure function of (seed, index): `sample(seed, i)` is deterministic, and the train,
validation and test splits use disjoint seeds (SPLIT_SEEDS).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96
CELL = IMAGE_SIZE // 3
SPLIT_SEEDS = {"train": 1000, "validation": 2000, "test": 3000}
TASKS = ("caption", "vqa", "position", "ocr")
VQA_KINDS = ("count", "color", "shape", "exists")  # a vqa question is one of these; a mix may name one of them

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 7, "large": 13}
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
WORDS = (
    "apple", "river", "stone", "cloud", "house", "light", "tiger", "green", "music", "bread",
    "chair", "ocean", "plant", "smile", "train", "water", "zebra", "night", "paper", "horse",
    "lemon", "storm", "candy", "field", "honey", "mouse", "sugar", "table", "glass", "dream",
    "cat", "dog", "sun", "map", "box", "key", "pen", "cup", "owl", "fox",
    "12", "25", "37", "48", "53", "64", "71", "86", "90", "99",
)
PROMPTS = {
    "caption": "Describe the image.",
    "ocr": "What does the text say?",
    "count": "How many shapes are there?",
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "exists": "Is there {article} {color} {shape}?",
    "position": "Where is the {color} {shape}?",
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    cell: int  # index into POSITIONS

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    word: str | None
    background: tuple[int, int, int]
    jitter: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Sample:
    key: str
    task: str
    question: str
    answer: str
    image: Image.Image
    scene: Scene  # what the image shows: which shape a question asks about, and which others are there


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    word = rng.choice(WORDS) if rng.random() < 0.4 else None
    cells = [0, 1, 2, 6, 7, 8] if word else list(range(9))
    n = rng.randint(1, max_shapes)
    kinds = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    chosen = sorted(rng.sample(cells, n))  # reading order: captions list shapes top-left to bottom-right
    shapes = tuple(Shape(k, c, rng.choice(sorted(SIZES)), cell) for k, c, cell in zip(kinds, colors, chosen))
    background = tuple(rng.randint(0, 60) for _ in range(3))
    jitter = tuple((rng.randint(-3, 3), rng.randint(-3, 3)) for _ in shapes)
    return Scene(shapes, word, background, jitter)


_FONT = None


def _font() -> ImageFont.FreeTypeFont:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=18)
    return _FONT


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for shape, (dx, dy) in zip(scene.shapes, scene.jitter):
        cx = (shape.cell % 3) * CELL + CELL // 2 + dx
        cy = (shape.cell // 3) * CELL + CELL // 2 + dy
        r = SIZES[shape.size]
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    if scene.word:
        font = _font()
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
        x = (IMAGE_SIZE - (right - left)) // 2 - left
        y = IMAGE_SIZE // 2 - (bottom + top) // 2
        draw.text((x, y), scene.word, fill=(255, 255, 255), font=font)
    return image


def caption(scene: Scene) -> str:
    n = len(scene.shapes)
    parts = [f"a {s.size} {s.color} {s.kind} at the {POSITIONS[s.cell]}" for s in scene.shapes]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shape" if n == 1 else "shapes"
    text = f"{NUMBER_WORDS[n].capitalize()} {noun}: {listed}."
    if scene.word:
        text += f' The text says "{scene.word}".'
    return text


def question(scene: Scene, task: str, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """A (question, answer) pair of the given task about the scene; `kind` (one of VQA_KINDS) fixes a vqa
    question's kind, else it is drawn."""
    if task == "caption":
        return PROMPTS["caption"], caption(scene)
    if task == "ocr":
        assert scene.word is not None
        return PROMPTS["ocr"], f'The text says "{scene.word}".'
    target = rng.choice(scene.shapes)
    if task == "position":
        q = PROMPTS["position"].format(color=target.color, shape=target.kind)
        return q, f"The {target.name} is at the {POSITIONS[target.cell]}."
    drawn = rng.choice(VQA_KINDS)  # drawn either way, so a fixed kind leaves the rest of the stream as it was
    kind = kind or drawn
    if kind == "count":
        n = len(scene.shapes)
        return PROMPTS["count"], f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}."
    if kind == "color":
        return PROMPTS["color"].format(shape=target.kind), f"The {target.kind} is {target.color}."
    if kind == "shape":
        return PROMPTS["shape"].format(color=target.color), f"The {target.color} object is a {target.kind}."
    # exists: half the time ask about a shape that is there, else a colour/kind pair that is not
    if rng.random() < 0.5:
        color, kind_ = target.color, target.kind
    else:
        present = {(s.color, s.kind) for s in scene.shapes}
        absent = [(c, k) for c in sorted(COLORS) for k in SHAPES if (c, k) not in present]
        color, kind_ = rng.choice(absent)
    q = PROMPTS["exists"].format(article=article(color), color=color, shape=kind_)
    if any(s.color == color and s.kind == kind_ for s in scene.shapes):
        return q, f"Yes, there is {article(color)} {color} {kind_}."
    return q, f"No, there is no {color} {kind_}."


def sample(seed: int, index: int, task: str | None = None, max_shapes: int = 3) -> Sample:
    """The index-th sample of the stream for this seed; task=None picks one (ocr only when text is drawn); a task
    that is one of VQA_KINDS is a vqa question of that kind. `max_shapes` < 3: scenes of at most that many shapes
    (a curriculum's first stages); 3 is the stream itself."""
    kind = task if task in VQA_KINDS else None
    task = "vqa" if kind else task
    rng = random.Random(seed * 1_000_003 + index)
    scene = make_scene(rng, max_shapes)
    if task is None:
        choices = ["caption", "vqa", "vqa", "position"] + (["ocr", "ocr"] if scene.word else [])
        task = rng.choice(choices)
    elif task == "ocr" and scene.word is None:
        # keep the stream deterministic: draw scenes from a sub-stream until one carries text
        sub = random.Random(rng.random())
        while scene.word is None:
            scene = make_scene(sub, max_shapes)
    q, a = question(scene, task, rng, kind)
    return Sample(key=f"{seed:05d}-{index:07d}", task=task, question=q, answer=a, image=render(scene),
                  scene=scene)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def vocabulary_text() -> list[str]:
    """Every word the grammar can emit, for tokenizer training alongside sampled answers."""
    words = list(COLORS) + list(SHAPES) + list(SIZES) + list(POSITIONS) + list(WORDS)
    words += list(NUMBER_WORDS.values()) + list(PROMPTS.values())
    return words
