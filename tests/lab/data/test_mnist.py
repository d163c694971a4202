"""dpn data mnist: real digits, questions from their label and ink, the LLaVA format the lab reads."""

from __future__ import annotations

import gzip
import json

import pytest
from PIL import Image

from dpn.lab.cli import main
from dpn.lab.data.mnist import SIDE, read_digits


def _digit(label: int, rows: range, cols: range) -> list[int]:
    """A digit drawn as an inked rectangle: ``rows`` x ``cols`` of grey level 255."""
    pixels = [255 if r in rows and c in cols else 0 for r in range(SIDE) for c in range(SIDE)]
    return [*pixels, label]


@pytest.fixture
def digits_csv(tmp_path):
    rows = [_digit(d % 10, range(4, 24), range(12, 12 + 2 + d)) for d in range(12)]  # ever wider and inkier
    path = tmp_path / "digits.csv.gz"
    with gzip.open(path, "wt") as file:
        file.write("\n".join(",".join(map(str, row)) for row in rows) + "\n")
    return path


def test_questions_follow_each_images_label_and_ink(digits_csv, tmp_path, capsys):
    assert main(["data", "mnist", "--out", str(tmp_path / "out"), "--csv", str(digits_csv), "--train", "6",
                 "--test", "6", "--seed", "1"]) == 0
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    test = json.loads((tmp_path / "out" / "test.json").read_text())
    assert len(train) == len(test) == 6
    assert not {r["mnist_index"] for r in train} & {r["mnist_index"] for r in test}  # disjoint images
    assert [r["family"] for r in test] == ["ink", "shape", "digit"] * 2
    assert [r["difficulty"] for r in test[:3]] == ["easy", "medium", "hard"]
    for record in train + test:
        index, answer = record["mnist_index"], record["conversations"][1]["value"]
        expected = {"digit": str(index % 10), "ink": "thick" if index >= 6 else "thin",  # medians at 5.5
                    "shape": "wide" if index >= 6 else "narrow"}[record["family"]]
        assert answer == expected, record
        assert record["conversations"][0]["value"].startswith("<image>\n")
    image = Image.open(tmp_path / "out" / test[0]["image"])
    assert image.size == (96, 96) and image.mode == "RGB"


def test_a_malformed_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="line 1: 3 values"):
        read_digits(bad)
    assert main(["data", "mnist", "--out", str(tmp_path / "o"), "--csv", str(bad)]) == 2
    assert "784 grey levels" in capsys.readouterr().err
