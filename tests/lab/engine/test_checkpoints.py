"""Which checkpoints a run resumes from: the newest complete one; half-written or emptied ones are skipped."""

from __future__ import annotations

import json

from dpn.lab.engine.checkpoints import is_finished, last_complete_checkpoint


def _checkpoint(root, step: int, state: str | None = '{"global_step": 1}', weights: dict[str, bytes] | None = None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    for name, data in (weights if weights is not None else {"model.safetensors": b"w"}).items():
        (folder / name).write_bytes(data)
    return folder


def test_the_newest_checkpoint_with_its_state_and_weights_is_resumed(tmp_path):
    complete = _checkpoint(tmp_path, 2)
    no_weights = _checkpoint(tmp_path, 4, weights={})
    no_state = _checkpoint(tmp_path, 6, state=None)
    bad_state = _checkpoint(tmp_path, 8, state="{")
    last, skipped = last_complete_checkpoint(tmp_path)
    assert last == complete
    assert skipped == [bad_state, no_state, no_weights]


def test_adapters_and_sharded_weights_count_when_every_shard_is_there(tmp_path):
    adapter = _checkpoint(tmp_path, 1, weights={"adapter_model.safetensors": b"a"})
    assert last_complete_checkpoint(tmp_path) == (adapter, [])
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    shards = {"model.safetensors.index.json": json.dumps(index).encode(), "model-00001-of-00002.safetensors": b"1"}
    missing_shard = _checkpoint(tmp_path, 3, weights=shards)
    assert last_complete_checkpoint(tmp_path) == (adapter, [missing_shard])
    (missing_shard / "model-00002-of-00002.safetensors").write_bytes(b"2")
    assert last_complete_checkpoint(tmp_path) == (missing_shard, [])


def test_a_run_is_finished_when_its_record_covers_what_is_asked(tmp_path):
    assert not is_finished(tmp_path, 4, 3.0)
    (tmp_path / "train_options.json").write_text(json.dumps({"global_step": 4, "training_args": {"max_steps": 4}}))
    assert is_finished(tmp_path, 4, 3.0) and not is_finished(tmp_path, 6, 3.0)
