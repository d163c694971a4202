"""A local lmms-eval task over LLaVA-format data (``dpn data lmms-task``), scored as ``dpn eval`` scores.

``write_task`` writes a folder for ``lmms-eval --include_path DIR --tasks NAME``: the task YAML,
the documents as JSONL (one question and its answer per sample, absolute image paths; read by
the ``json`` dataset builder, nothing from a hub) and the functions the YAML names, which score an
answer as correct when ``normalize_answer`` of it equals that of the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpn.lab.data.llava import IMAGE_PLACEHOLDER, image_files

DEFAULT_TASK_MAX_NEW_TOKENS = 8  # as dpn eval answers

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function {module}.doc_to_visual
doc_to_text: !function {module}.doc_to_text
doc_to_target: answer
process_results: !function {module}.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  until: []
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

TASK_UTILS_SOURCE = '''"""Written by dpn.lab.lmms.write_task: documents, images and dpn eval's scoring."""

from PIL import Image

from dpn.lab.evaluate import normalize_answer


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
'''


def write_task(data: str | Path, out_dir: str | Path, name: str = "dpn_synth", limit: int | None = None,
               max_new_tokens: int = DEFAULT_TASK_MAX_NEW_TOKENS) -> Path:
    """An lmms-eval task folder for the one-question samples of LLaVA-format ``data``: its YAML, the
    documents as JSONL (absolute image paths) and the functions it names. Returns the folder."""
    data, out_dir = Path(data).resolve(), Path(out_dir)
    records = json.loads(data.read_text())[:limit] if limit else json.loads(data.read_text())
    docs = []
    for index, record in enumerate(records):
        turns = record["conversations"]
        if len(turns) != 2 or turns[-1]["from"] not in ("gpt", "assistant"):
            raise ValueError(f"sample {record.get('id', index)}: a task takes one question and one answer per sample")
        docs.append({"id": str(record.get("id", index)), "difficulty": record.get("difficulty", "all"),
                     "question": turns[0]["value"].replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(IMAGE_PLACEHOLDER, ""),
                     "images": [str(data.parent / file) for file in image_files(record)],
                     "answer": turns[1]["value"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    module = f"{name}_utils"
    (out_dir / f"{module}.py").write_text(TASK_UTILS_SOURCE)
    (out_dir / f"{name}.yaml").write_text(TASK_YAML.format(
        name=name, docs=(out_dir / f"{name}.jsonl").resolve(), module=module, max_new_tokens=max_new_tokens))
    return out_dir
