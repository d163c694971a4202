"""What produced a results folder, so that a resumed evaluation never mixes two runs.

``dpn eval`` writes ``run.json`` beside its predictions: the model (path and a fingerprint of its
weight files), the pyramid and inference settings, the data (path and content hash) and the
generation settings. Resuming into a folder whose ``run.json`` differs is an error that names the
differences (``--overwrite`` starts over); predictions without a ``run.json`` are refused too.

The weights fingerprint reads, per ``*.safetensors`` file, its size, its header (names, shapes,
dtypes, offsets) and ``SAMPLED_CHUNKS`` chunks spread over the data: a fine-tuned model changes
nearly every weight, and a 15 GB checkpoint is not read whole before each evaluation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
SAMPLED_CHUNKS = 16
CHUNK_BYTES = 1 << 16
HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its header's length (little-endian u64)


def weights_fingerprint(model_dir: str | Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as file:
            header_length = int.from_bytes(file.read(HEADER_LENGTH_BYTES), "little")
            digest.update(file.read(min(header_length, size)))
            for k in range(SAMPLED_CHUNKS):
                file.seek(size * k // SAMPLED_CHUNKS)
                digest.update(file.read(CHUNK_BYTES))
    return digest.hexdigest()


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ, each with both values."""
    keys = sorted(set(recorded) | set(current))
    return [f"{key}: {recorded.get(key)!r} then, {current.get(key)!r} now" for key in keys
            if recorded.get(key) != current.get(key)]


def claim(output_dir: Path, identity: dict[str, Any], results: list[str], overwrite: bool) -> None:
    """Make ``output_dir`` this run's: resume if it is already, start over with ``overwrite``, or
    refuse when another run's ``results`` (file names) are there."""
    record = output_dir / RUN_FILE
    present = [name for name in results if (output_dir / name).exists()]
    identity = json.loads(json.dumps(identity, default=str))  # as it will read back
    if overwrite:
        for name in [*present, RUN_FILE]:
            (output_dir / name).unlink(missing_ok=True)
    elif record.is_file():
        changed = differences(json.loads(record.read_text()), identity)
        if changed:
            raise ValueError(f"{output_dir} holds the results of another run ({'; '.join(changed)}); "
                             "use another --output, or --overwrite to start over")
        return
    elif present:
        raise ValueError(f"{output_dir} holds {', '.join(present)} without a {RUN_FILE} saying what made them; "
                         "use another --output, or --overwrite to start over")
    output_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity, indent=1))
