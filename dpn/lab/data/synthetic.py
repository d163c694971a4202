"""A procedurally generated fine-grained VQA benchmark, written in the LLaVA data format.

Each image has a background colour, one large shape in the middle, and four small objects, one
in each corner: three small shapes and one digit drawn with Pillow's built-in font. The small
objects' colours may repeat (two to four distinct colours per image). Questions come in families
tagged with a difficulty:

- easy: global properties (the background colour, the large shape's colour);
- medium: coarse properties (the large shape's kind, which side the digit is on);
- hard: details of small objects (the colour or kind of the object in a given corner, how many
  small objects have a given colour or shape, whether two corners share a colour, reading the
  digit, left/right of two small objects named by colour).

Small objects are 16 px (two patches of the tiny model) wide: sharp at full resolution, blurred
into one token with their surroundings once the grid is pooled 2x2 twice.

``DEFAULT_FAMILIES`` (the background's and the large shape's colour, the large shape's kind, the
colour of the small object in a named corner) are the families the tiny reference model learns in
CPU time; the others stay available by name (``families=`` / ``dpn data synth --families``) for
larger models and longer training (see ``dpn/lab/assets/tiny-llava-base/TRAINING.md``).

Everything is deterministic from the seed. The output is a JSON list per split in the LLaVA
format (``{id, image, conversations: [{from: human, value: "<image>\\n..."}, {from: gpt, value}]}``
plus ``difficulty`` and ``family``) and an image folder, so the same loader serves real data.
Training images may carry a multi-turn conversation instead of one question (``turns``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96
LARGE_RADIUS = (17, 22)  # half-size of the large shape, in pixels
SMALL_SIZE = 16  # side of a small object, in pixels: two patches wide, so pooling 2x2 twice blurs it
CORNER_MARGIN = (2, 7)  # a small object's offset from the image edge, in pixels
DIGIT_FONT_SIZE = 20  # glyphs about 12 x 14 pixels, inside the small object's box
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
CORNERS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
DIGIT_KIND = "number"
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}

# family -> (difficulty, question templates)
FAMILIES = {
    "background_color": ("easy", ["What color is the background?", "Which color is the background of the image?"]),
    "large_color": ("easy", ["What color is the big shape?", "What is the color of the large shape?"]),
    "large_shape": ("medium", ["What shape is the big object?", "Which shape is the large object?"]),
    "digit_side": ("medium", ["Is the number on the left or the right?", "On which side is the digit, left or right?"]),
    "small_color": ("hard", ["What color is the small object in the {corner} corner?"]),
    "small_kind": ("hard", ["What is the small object in the {corner} corner?"]),
    "count_circles": ("hard", ["How many small circles are there?", "Count the small circles."]),
    "read_digit": ("hard", ["What digit is written in the image?", "Which number is shown?"]),
    "relative": ("hard", ["Is the small {a} object left or right of the small {b} object?"]),
    "count_color": ("hard", ["How many small objects are {a}?", "How many of the small objects are {a}?"]),
    "same_color": ("hard", ["Do the small objects in the {corner} and {corner2} corners have the same color?"]),
}
DEFAULT_FAMILIES = ("background_color", "large_color", "large_shape", "small_color")
SMALL_PALETTE_SIZES = (2, 3, 4)  # distinct colours among an image's four small objects
ABSENT_COLOR_SHARE = 0.2  # share of count_color questions about a colour no small object has
# same_color asks about a same-coloured pair this often when the scene has one (two thirds of scenes
# do), so that "yes" and "no" come out about even
SAME_PAIR_SHARE = 0.75


@dataclass
class SmallObject:
    kind: str  # a shape name or DIGIT_KIND
    color: str
    corner: str
    digit: int | None = None


@dataclass
class Scene:
    background: str
    large_shape: str
    large_color: str
    small: list[SmallObject]


def random_scene(rng: random.Random) -> Scene:
    background, large_color, *others = rng.sample(list(COLORS), len(COLORS))
    palette = others[: rng.choice(SMALL_PALETTE_SIZES)]
    # every palette colour is used once, the remaining corners repeat some of them
    small_colors = palette + [rng.choice(palette) for _ in range(len(CORNERS) - len(palette))]
    rng.shuffle(small_colors)
    corners = list(CORNERS)
    digit_corner = rng.choice(corners)
    small = []
    for corner, color in zip(corners, small_colors):
        if corner == digit_corner:
            small.append(SmallObject(DIGIT_KIND, color, corner, digit=rng.randrange(10)))
        else:
            small.append(SmallObject(rng.choice(SHAPES), color, corner))
    return Scene(background, rng.choice(SHAPES), large_color, small)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    center = IMAGE_SIZE // 2
    radius = rng.randint(*LARGE_RADIUS)
    cx, cy = center + rng.randint(-3, 3), center + rng.randint(-3, 3)
    _draw_shape(draw, scene.large_shape, (cx - radius, cy - radius, cx + radius, cy + radius), COLORS[scene.large_color])
    font = ImageFont.load_default(size=DIGIT_FONT_SIZE)
    for obj in scene.small:
        right, bottom = CORNERS[obj.corner]
        offset_x, offset_y = rng.randint(*CORNER_MARGIN), rng.randint(*CORNER_MARGIN)
        x0 = IMAGE_SIZE - SMALL_SIZE - offset_x if right else offset_x
        y0 = IMAGE_SIZE - SMALL_SIZE - offset_y if bottom else offset_y
        if obj.kind == DIGIT_KIND:
            left, top, text_right, text_bottom = font.getbbox(str(obj.digit))
            x = x0 + (SMALL_SIZE - (text_right - left)) / 2 - left
            y = y0 + (SMALL_SIZE - (text_bottom - top)) / 2 - top
            draw.text((x, y), str(obj.digit), fill=COLORS[obj.color], font=font)
        else:
            _draw_shape(draw, obj.kind, (x0, y0, x0 + SMALL_SIZE - 1, y0 + SMALL_SIZE - 1), COLORS[obj.color])
    return image


def ask(scene: Scene, family: str, rng: random.Random) -> tuple[str, str]:
    """A question of ``family`` about ``scene`` and its one-word answer."""
    template = rng.choice(FAMILIES[family][1])
    by_corner = {obj.corner: obj for obj in scene.small}
    digit = next(obj for obj in scene.small if obj.kind == DIGIT_KIND)
    if family == "background_color":
        return template, scene.background
    if family == "large_color":
        return template, scene.large_color
    if family == "large_shape":
        return template, scene.large_shape
    if family == "digit_side":
        return template, "right" if CORNERS[digit.corner][0] else "left"
    if family in ("small_color", "small_kind"):
        corner = rng.choice(list(CORNERS))
        obj = by_corner[corner]
        return template.format(corner=corner), obj.color if family == "small_color" else obj.kind
    if family == "count_circles":
        return template, str(sum(obj.kind == "circle" for obj in scene.small))
    if family == "read_digit":
        return template, str(digit.digit)
    if family == "relative":
        a, b = rng.choice(_relative_pairs(scene))
        side = "left" if CORNERS[a.corner][0] < CORNERS[b.corner][0] else "right"
        return template.format(a=a.color, b=b.color), side
    if family == "count_color":
        present = sorted({obj.color for obj in scene.small})
        absent = [c for c in COLORS if c not in present and c not in (scene.background, scene.large_color)]
        color = rng.choice(absent) if rng.random() < ABSENT_COLOR_SHARE else rng.choice(present)
        return template.format(a=color), str(sum(obj.color == color for obj in scene.small))
    if family == "same_color":
        pairs = [(a, b) for i, a in enumerate(scene.small) for b in scene.small[i + 1:]]
        same = [(a, b) for a, b in pairs if a.color == b.color]
        pool = same if same and rng.random() < SAME_PAIR_SHARE else [p for p in pairs if p not in same]
        a, b = rng.choice(pool)
        return template.format(corner=a.corner, corner2=b.corner), "yes" if a.color == b.color else "no"
    raise ValueError(f"unknown question family {family!r}; known: {sorted(FAMILIES)}")


def _relative_pairs(scene: Scene) -> list[tuple[SmallObject, SmallObject]]:
    """Pairs of small objects that a colour names uniquely and that sit on different sides."""
    unique = [obj for obj in scene.small if sum(o.color == obj.color for o in scene.small) == 1]
    return [(a, b) for a in unique for b in unique if CORNERS[a.corner][0] != CORNERS[b.corner][0]]


def answerable(scene: Scene, family: str) -> bool:
    """Whether ``scene`` has a well-defined answer to every question of ``family``."""
    return family != "relative" or bool(_relative_pairs(scene))


def generate_split(
    out_dir: Path, split: str, size: int, seed: int, families: list[str] | None = None, turns: int = 1
) -> list[dict]:
    """Write ``size`` images of ``split`` (under ``out_dir/images/split``) and return their records.

    With ``turns`` = 1 each image gets one question, families in rotation: the shape of an
    evaluation sample, and of the fine-tuning data a per-sample router learns from. With
    ``turns`` > 1 each image gets a multi-turn conversation about that many different families
    (tagged ``difficulty: multi``), like LLaVA's instruction data: many answers per encoded image,
    the dense supervision that trains a base model from scratch in CPU time.
    """
    families = list(families or DEFAULT_FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown question families {unknown}; known: {sorted(FAMILIES)}")
    if not 1 <= turns <= len(families):
        raise ValueError(f"turns must be between 1 and the number of question families ({len(families)}), got {turns}")
    rng = random.Random(seed * 1000 + SPLIT_SEEDS.get(split, len(SPLIT_SEEDS)))
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(size):
        asked = [families[index % len(families)]] if turns == 1 else rng.sample(families, turns)
        scene = random_scene(rng)
        while not all(answerable(scene, family) for family in asked):
            scene = random_scene(rng)
        conversation = []
        for family in asked:
            question, answer = ask(scene, family, rng)
            prefix = "<image>\n" if not conversation else ""
            conversation += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        image_path = image_dir / f"{index:06d}.png"
        render(scene, rng).save(image_path)
        records.append({
            "id": f"{split}-{index:06d}",
            "image": str(image_path.relative_to(out_dir)),
            "conversations": conversation,
            "difficulty": FAMILIES[asked[0]][0] if turns == 1 else "multi",
            "family": "+".join(asked),
        })
    (out_dir / f"{split}.json").write_text(json.dumps(records, indent=1))
    return records


def generate(
    out_dir: str | Path, train: int, val: int, test: int, seed: int = 0, progress: bool = True, turns: int = 1,
    families: list[str] | None = None,
) -> Path:
    """Write the train / val / test splits into ``out_dir`` and return it.

    ``turns`` questions per training image (see ``generate_split``); val and test always ask one.
    ``families`` defaults to ``DEFAULT_FAMILIES``.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    families = list(families or DEFAULT_FAMILIES)
    sizes = {"train": train, "val": val, "test": test}
    for split in tqdm(sizes, desc="benchmark splits", disable=not progress):
        generate_split(out_dir, split, sizes[split], seed, families, turns=turns if split == "train" else 1)
    info = {"seed": seed, "sizes": sizes, "image_size": IMAGE_SIZE, "train_turns": turns, "families": families}
    (out_dir / "benchmark.json").write_text(json.dumps(info, indent=1))
    return out_dir


def answer_vocabulary() -> list[str]:
    """Every answer the benchmark can produce (used to seed the tiny tokenizer's corpus)."""
    return sorted({*COLORS, *SHAPES, DIGIT_KIND, "left", "right", "yes", "no", *(str(d) for d in range(10))})


def question_corpus() -> list[str]:
    """Every question template, filled in, for the tiny tokenizer's corpus."""
    lines = []
    for _, templates in FAMILIES.values():
        for template in templates:
            for corner in CORNERS:
                for a in COLORS:
                    lines.append(template.format(corner=corner, corner2=corner, a=a, b=a))
    return sorted(set(lines))
