"""grain pipeline: bucketed shapes, epochs, sharding, checkpoint/resume."""

import json

import numpy as np
import pytest

from eijax.data.byte_tokenizer import ByteTokenizer
from eijax.data.pipeline import DataConfig, build_examples, make_iterator

TOK = ByteTokenizer()
S, L, B = 8, 64, 3
BUCKETS = [2, 4, 8, 16]


def config(**overrides):
    base = dict(
        sources=[{"type": "synthetic", "task": "passkey", "num_samples": 20, "context_tokens": 300},
                 {"type": "synthetic", "task": "multikey", "num_samples": 14, "context_tokens": 700}],
        sink=S, segment=L, buckets=BUCKETS, batch_size=B, seed=5, num_epochs=1,
        process_index=0, process_count=1)
    base.update(overrides)
    return base


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_have_bucket_shapes_and_dtypes():
    batches = list(make_iterator(config(), TOK))
    assert batches
    allowed = {(B, S + n * L) for n in BUCKETS}
    for b in batches:
        assert b["tokens"].shape in allowed
        shape = b["tokens"].shape
        assert b["valid"].shape == b["labels"].shape == b["loss_mask"].shape == shape
        assert b["tokens"].dtype == np.int32 and b["labels"].dtype == np.int32
        assert b["valid"].dtype == bool and b["loss_mask"].dtype == np.float32
        assert b["n_segments"].shape == (B,) and b["n_segments"].dtype == np.int32
        n_bucket = (shape[1] - S) // L
        assert (b["n_segments"] <= n_bucket).all() and (b["n_segments"] > 0).all()
        # no row could have used a smaller bucket
        smaller = [n for n in BUCKETS if n < n_bucket]
        if smaller:
            assert (b["n_segments"] > smaller[-1]).all()
        assert (b["tokens"][~b["valid"]] == TOK.pad_token_id).all()
        assert (b["loss_mask"][~b["valid"]] == 0).all()
    assert len({b["tokens"].shape for b in batches}) > 1  # the two tasks land in different buckets


def rows(batches):
    """Each real row as the bytes of its valid tokens."""
    return [b["tokens"][i][b["valid"][i]].tobytes()
            for b in batches for i in range(len(b["tokens"])) if b["valid"][i].any()]


def test_one_epoch_without_drop_yields_every_record_once_with_padding_rows():
    batches = list(make_iterator(config(drop_remainder=False), TOK))
    got = rows(batches)
    assert len(got) == 34 and len(set(got)) == 34
    padding_rows = sum(int(not b["valid"][i].any()) for b in batches for i in range(B))
    assert padding_rows == len(batches) * B - 34
    assert all(b["n_segments"][i] == 0 for b in batches for i in range(B) if not b["valid"][i].any())


def test_epochs_reshuffle_and_drop_remainder():
    two = rows(list(make_iterator(config(num_epochs=2, drop_remainder=False), TOK)))
    assert len(two) == 68 and len(set(two)) == 34 and two[:34] != two[34:]
    dropped = list(make_iterator(config(), TOK))
    assert all(b["valid"].any(axis=1).all() for b in dropped)  # no padding rows
    assert 34 - 2 * (B - 1) <= len(rows(dropped)) <= 34


def test_seed_changes_order_and_same_seed_repeats():
    a = rows(list(make_iterator(config(), TOK)))
    assert a == rows(list(make_iterator(config(), TOK)))
    assert a != rows(list(make_iterator(config(seed=6), TOK)))


def test_shards_are_disjoint_and_cover_the_data():
    def shard(i):
        return rows(list(make_iterator(config(process_index=i, process_count=2,
                                              drop_remainder=False), TOK)))
    a, b = shard(0), shard(1)
    assert not set(a) & set(b) and len(set(a) | set(b)) == 34 and abs(len(a) - len(b)) <= 1


@pytest.mark.parametrize("steps", [0, 1, 3, 6])
def test_state_restore_continues_identically(steps):
    cfg = config(num_epochs=None)  # infinite stream
    it = make_iterator(cfg, TOK)
    take(it, steps)
    state = json.loads(json.dumps(it.get_state()))  # what orbax writes and reads
    if steps:  # these steps leave examples waiting in a bucket: the tricky part of the state
        assert state["waiting"]
    expected = take(it, 6)
    resumed = make_iterator(cfg, TOK)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), expected)


def test_orbax_checkpoint_roundtrip(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = config(num_epochs=None)
    it = make_iterator(cfg, TOK)
    take(it, 4)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 5)
    resumed = make_iterator(cfg, TOK)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as mngr:
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_batches_equal(take(resumed, 5), expected)


def test_jsonl_source_and_layout_skip(tmp_path):
    recs = [{"context": "word " * n, "instruction": "Count?", "answer": str(n)} for n in range(1, 30)]
    recs.append({"context": "c", "instruction": "q" * 2000, "answer": "a"})  # query cannot fit
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken\n")
    cfg = config(sources=[{"type": "files", "paths": [str(path)]}], on_error="skip",
                 drop_remainder=False, batch_size=4)
    got = rows(list(make_iterator(cfg, TOK)))
    assert len(got) == 29
    with pytest.raises(Exception):
        list(make_iterator(config(sources=[{"type": "files", "path": str(path)}]), TOK))


def test_examples_match_layout_of_their_record():
    ex = build_examples(config(shuffle=False), TOK)
    first = ex[0]
    n = int(first["n_segments"])
    assert first["tokens"].shape[0] == S + min(b for b in BUCKETS if b >= n) * L
    # the answer tokens (loss positions' labels) decode to the sample's answer + eos
    answer_ids = first["labels"][first["loss_mask"] > 0]
    assert TOK.decode(answer_ids).startswith("The pass key is ")
    assert answer_ids[-1] == TOK.eos_token_id


def test_config_validation():
    with pytest.raises(ValueError, match="unknown data config key"):
        DataConfig.from_dict(config(batchsize=3))
    with pytest.raises(ValueError, match="max_segments"):
        DataConfig.from_dict(config(max_segments=17))
    with pytest.raises(ValueError, match="buckets"):
        DataConfig.from_dict(config(buckets=[4, 2]))


@pytest.mark.slow
def test_worker_processes_give_same_records_and_resume(tmp_path):
    cfg = config(num_epochs=None, worker_count=2)
    it = make_iterator(cfg, TOK)
    first = take(it, 8)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    it.close()
    resumed = make_iterator(cfg, TOK)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)
    resumed.close()
    assert len(set(rows(first))) == len(rows(first))
