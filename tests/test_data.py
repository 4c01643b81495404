"""Input pipeline: TFDS builders, grain determinism/state, packing, eval, sharding."""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _util import train_hf_bpe
from jax.sharding import NamedSharding, PartitionSpec

from configs.data import data_config
from train import data
from train.data import images, pack
from train.data import tokenize as tokenizer
from train import mesh as mesh_lib
from train.data import digits, python_stdlib_text
from train.data.sources import DataError, dataset_builder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    dataset_builder("digits", d)
    dataset_builder("python_stdlib_text", d)
    return d


def image_cfg(data_dir, **kw):
    cfg = data_config("digits")
    cfg.data_dir = data_dir
    cfg.update(kw)
    return cfg


def text_cfg(data_dir, seq_len=32, **kw):
    cfg = data_config("python_stdlib_text")
    cfg.data_dir, cfg.seq_len = data_dir, seq_len
    cfg.update(kw)
    return cfg


def augmented(data_dir):
    cfg = image_cfg(data_dir, image_size=12)
    cfg.augment.update(random_resized_crop=True, crop_scale=(0.3, 1.0), flip=True)
    return cfg


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- builders
def test_builders_write_array_record_with_expected_splits(data_dir):
    b = dataset_builder("digits", data_dir)
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 1437, "test": 360}
    assert glob.glob(os.path.join(b.data_dir, "digits-train.array_record-*"))
    assert glob.glob(os.path.join(b.data_dir, "digits-test.array_record-*"))
    train, test = (b.as_data_source(s) for s in ("train", "test"))
    idx = [train[i]["index"] for i in range(len(train))] + [test[i]["index"] for i in range(len(test))]
    assert sorted(idx) == list(range(1797))  # Disjoint and complete.

    t = dataset_builder("python_stdlib_text", data_dir)
    files = python_stdlib_text.stdlib_files()
    sizes = {k: v.num_examples for k, v in t.info.splits.items()}
    assert sizes["train"] + sizes["validation"] == len(files) > 300
    assert 0.005 < sizes["validation"] / len(files) < 0.06
    assert glob.glob(os.path.join(t.data_dir, "python_stdlib_text-validation.array_record-*"))
    assert platform.python_version() in t.info.description
    assert python_stdlib_text.interpreter_tag() in t.data_dir


def test_prepare_is_idempotent_and_safe_when_concurrent(tmp_path):
    d = str(tmp_path / "fresh")
    code = "import sys; from train.data.sources import dataset_builder; dataset_builder('digits', sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, d], cwd=REPO, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    b = dataset_builder("digits", d)  # Third call: reuses.
    assert len(b.as_data_source("train")) == 1437
    assert len(glob.glob(os.path.join(d, "digits", "*"))) == 1  # No leftover incomplete dirs.


def test_digits_pixels_match_sklearn(data_dir):
    from sklearn.datasets import load_digits

    sk = load_digits()
    src = dataset_builder("digits", data_dir).as_data_source("test")
    for i in (0, 7, 359):
        ex = src[i]
        j = int(ex["index"])
        assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"][..., 0], np.rint(sk.images[j] * 255 / 16))
        assert ex["label"] == sk.target[j]
    assert set(digits.split_indices()["test"]) == {int(src[i]["index"]) for i in range(len(src))}


def test_stdlib_text_examples_equal_file_contents(data_dir):
    root = python_stdlib_text.stdlib_root()
    for split in ("train", "validation"):
        src = dataset_builder("python_stdlib_text", data_dir).as_data_source(split)
        for i in (0, len(src) // 2, len(src) - 1):
            ex = src[i]
            path = ex["path"].decode()
            assert python_stdlib_text.split_of(path) == split
            with open(os.path.join(root, path), encoding="utf-8") as f:
                assert ex["text"].decode("utf-8") == f.read()


def test_missing_real_dataset_raises_one_line_data_error(tmp_path):
    for name in ("imagenet2012", "no_such_dataset_xyz"):
        with pytest.raises(DataError) as e:
            dataset_builder(name, str(tmp_path))
        msg = str(e.value)
        assert "\n" not in msg and name in msg and str(tmp_path) in msg
        assert isinstance(e.value, ValueError)
    cfg = data_config("imagenet2012")
    cfg.data_dir = str(tmp_path)
    with pytest.raises(DataError, match="imagenet2012"):
        data.make_train_iterator(cfg, 8, seed=0)
    assert not os.listdir(tmp_path) or "downloads" not in os.listdir(tmp_path)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_batches_different_seed_different(data_dir):
    cfg = augmented(data_dir)
    a, b = take(data.make_train_iterator(cfg, 16, 3), 3), take(data.make_train_iterator(cfg, 16, 3), 3)
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    c = take(data.make_train_iterator(cfg, 16, 4), 3)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    x = a[0]
    assert x["image"].shape == (16, 12, 12, 1) and x["image"].dtype == np.float32
    assert x["label"].shape == (16,) and x["label"].dtype == np.int32
    assert -1.0 <= x["image"].min() and x["image"].max() <= 1.0


@pytest.mark.parametrize("kind", ["image", "text"])
def test_global_batch_is_independent_of_process_count(data_dir, kind):
    cfg = augmented(data_dir) if kind == "image" else text_cfg(data_dir)
    B = 16
    one = data.make_train_batches(cfg, B, 7, process_index=0, process_count=1)
    shards = {P: [data.make_train_batches(cfg, B, 7, process_index=p, process_count=P)
                  for p in range(P)] for P in (2, 4)}
    for step in (0, 1, 89, 90):  # 89 straddles the first digits epoch (1437 examples).
        for P, parts in shards.items():
            local = [parts[p][step] for p in range(P)]
            assert all(len(v) == B // P for x in local for v in x.values())
            joined = {k: np.concatenate([x[k] for x in local]) for k in local[0]}
            assert_batches_equal(one[step], joined)
    it = data.make_train_iterator(cfg, B, 7, process_index=1, process_count=2)
    assert_batches_equal(next(it), shards[2][1][0])


def test_epochs_are_reshuffled_permutations(data_dir):
    cfg = image_cfg(data_dir)  # No augmentation: images are exact normalized pixels.
    epochs = data.make_train_batches(cfg, 1437, 0, process_index=0, process_count=1)
    src = dataset_builder("digits", data_dir).as_data_source("train")
    ref = sorted(images.normalize(src[i]["image"]).tobytes() for i in range(len(src)))
    e0, e1 = epochs[0]["image"], epochs[1]["image"]
    assert sorted(x.tobytes() for x in e0) == ref == sorted(x.tobytes() for x in e1)
    assert not np.array_equal(e0, e1)


# ----------------------------------------------------------------------------- state
def test_get_state_set_state_and_start_step_resume(data_dir):
    cfg = augmented(data_dir)
    it = data.make_train_iterator(cfg, 8, 1)
    take(it, 3)
    state = it.get_state()
    assert state == {"step": 3}
    expected = take(it, 2)
    fresh = data.make_train_iterator(cfg, 8, 1)
    fresh.set_state(state)
    for x, y in zip(expected, take(fresh, 2)):
        assert_batches_equal(x, y)
    for x, y in zip(expected, take(data.make_train_iterator(cfg, 8, 1, start_step=3), 2)):
        assert_batches_equal(x, y)


def test_orbax_checkpoint_manager_saves_and_restores_iterator(data_dir, tmp_path):
    cfg = text_cfg(data_dir)
    it = data.make_train_iterator(cfg, 8, 5)
    take(it, 4)
    params = {"w": np.arange(6.0).reshape(2, 3), "step": np.array(4, np.int32)}
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(4, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = take(it, 2)

    it2 = data.make_train_iterator(cfg, 8, 5)
    restored = mngr.restore(4, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(it2)))
    np.testing.assert_array_equal(restored["params"]["w"], params["w"])
    assert restored["data"] is it2 and it2.get_state() == {"step": 4}
    for x, y in zip(expected, take(it2, 2)):
        assert_batches_equal(x, y)
    assert os.path.exists(tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json")
    mngr.close()


def test_multiprocess_workers_give_identical_batches_and_state(data_dir):
    cfg = augmented(data_dir)
    ref = data.make_train_batches(cfg, 16, 2, process_index=0, process_count=1)
    cfg.num_workers = 2
    it = data.make_train_iterator(cfg, 16, 2, start_step=5)
    try:
        for s, x in enumerate(take(it, 3), start=5):
            assert_batches_equal(x, ref[s])
        assert it.get_state() == {"step": 8}
        it.set_state({"step": 2})
        assert_batches_equal(next(it), ref[2])
    finally:
        it.close()


# ----------------------------------------------------------------------------- text
def test_lm_packing_from_token_cache(data_dir):
    L = 48
    cfg = text_cfg(data_dir, seq_len=L)
    batch = next(data.make_train_iterator(cfg, 8, 0))
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (8, L)
    assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert batch["mask"].min() == 1.0

    # The cached stream is every train file's bytes followed by EOS, in path order.
    files = [t for p, t in python_stdlib_text.stdlib_files()
             if python_stdlib_text.split_of(p) == "train"]
    tok = tokenizer.ByteTokenizer()
    stream = np.load(pack.token_cache_path(
        dataset_builder("python_stdlib_text", data_dir).data_dir, "train", tok))
    np.testing.assert_array_equal(stream, pack.pack_documents(files, tok))
    assert (stream == data.BYTE_EOS_ID).sum() == len(files) and stream.max() == 256
    # Every training window is a contiguous (seq_len + 1)-slice of that stream.
    windows = {stream[i:i + L + 1].tobytes() for i in range(0, len(stream) - L, L + 1)}
    full = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1).astype(np.uint16)
    assert all(w.tobytes() in windows for w in full)
    assert data.num_examples(cfg) == len(stream) // (L + 1)
    assert data.get_vocab_size(cfg) == data.BYTE_VOCAB_SIZE == 257


def test_streaming_packing_with_grain_and_resume(data_dir):
    cfg = text_cfg(data_dir, seq_len=64, pack_mode="stream")
    it = data.make_train_iterator(cfg, 4, 0)
    first = take(it, 3)
    for b in first:
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        assert b["inputs"].shape == (4, 64)
    # Windows, in order, are consecutive 65-token slices of the seeded document stream
    # (each document's bytes followed by EOS).
    windows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in first])
    src = dataset_builder("python_stdlib_text", data_dir).as_data_source("train")
    docs = grain.MapDataset.source(src).seed(0).shuffle()
    tok = tokenizer.ByteTokenizer()
    stream = pack.pack_documents([docs[i]["text"] for i in range(20)], tok)
    assert len(stream) >= windows.size
    np.testing.assert_array_equal(windows.reshape(-1), stream[:windows.size])
    state = it.get_state()
    expected = take(it, 3)
    it2 = data.make_train_iterator(cfg, 4, 0)
    it2.set_state(state)
    for x, y in zip(expected, take(it2, 3)):
        assert_batches_equal(x, y)
    with pytest.raises(ValueError):
        data.make_train_iterator(cfg, 4, 0, start_step=1)


def test_hugging_face_tokenizer_json_roundtrip_and_pipeline(data_dir, tmp_path):
    from train.errors import UserError

    reference = train_hf_bpe(tmp_path / "tokenizer.json")
    tok = tokenizer.make_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == reference.get_vocab_size() == 400
    assert tok.eos_id == reference.token_to_id("<|end_of_text|>")
    for _, text in python_stdlib_text.stdlib_files()[:5]:
        chunk = text[:3000]
        ids = tok.encode(chunk)
        assert ids.dtype == np.int32 and len(ids) < len(chunk)
        assert ids.tolist() == reference.encode(chunk, add_special_tokens=False).ids
        assert tok.decode(ids) == chunk
    assert tokenizer.make_tokenizer(str(tmp_path)).cache_tag == tok.cache_tag  # the directory works too
    bos = reference.token_to_id("<|begin_of_text|>")
    assert tok.encode_document("x = 1").tolist() == tok.encode("x = 1").tolist() + [tok.eos_id]
    with_bos = tokenizer.make_tokenizer(str(tmp_path / "tokenizer.json"), add_bos=True)
    assert with_bos.encode_document("x = 1").tolist() == [bos] + tok.encode("x = 1").tolist() + [tok.eos_id]
    assert with_bos.cache_tag != tok.cache_tag and not tok.add_bos  # the cached one is not changed
    with pytest.raises(UserError, match="no beginning-of-text token"):
        tokenizer.make_tokenizer("bytes", add_bos=True)
    # A document that mentions a special token holds its text, not the token: no eos, no bos
    # (hence no segment break or masked target) in the middle of a document.
    mention = 'EOS = "<|end_of_text|>"  # and <|begin_of_text|>'
    ids = with_bos.encode_document(mention).tolist()
    assert ids[0] == bos and ids[-1] == tok.eos_id and {bos, tok.eos_id}.isdisjoint(ids[1:-1]), ids
    assert tok.decode(ids[1:-1]) == mention
    # transformers' tokenizer_config.json beside it names the eos token.
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|begin_of_text|>"}')
    assert tokenizer.HFTokenizer(str(tmp_path / "tokenizer.json")).eos_id == reference.token_to_id("<|begin_of_text|>")
    (tmp_path / "tokenizer_config.json").unlink()

    cfg = text_cfg(data_dir, seq_len=32, tokenizer=str(tmp_path / "tokenizer.json"), vocab_size=400)
    batch = next(iter(data.make_eval_batches(cfg, 16)))
    assert batch["inputs"].shape == (16, 32) and batch["inputs"].max() < 400
    assert (batch["inputs"] == tok.eos_id).any()  # documents end with the tokenizer's eos
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


@pytest.mark.parametrize("pack_mode", ["cache", "stream"])
def test_document_mask_fields_follow_the_end_of_document_ids(data_dir, pack_mode):
    cfg = text_cfg(data_dir, seq_len=64, pack_mode=pack_mode, document_mask=True)
    eos = tokenizer.ByteTokenizer.eos_id
    batch = next(b for b in data.make_eval_batches(cfg, 8) if (b["inputs"] == eos).any())  # a document ends
    inputs, seg, pos, mask = batch["inputs"], batch["segment_ids"], batch["positions"], batch["mask"]
    for row in range(len(inputs)):
        for t in range(1, inputs.shape[1]):
            if seg[row, t] == 0:  # padding
                continue
            new_doc = inputs[row, t - 1] == eos
            assert seg[row, t] == seg[row, t - 1] + new_doc and pos[row, t] == (0 if new_doc else pos[row, t - 1] + 1)
        assert (mask[row][inputs[row] == eos] == 0).all()
    off = text_cfg(data_dir, seq_len=64, pack_mode=pack_mode, document_mask=False)
    plain = next(b for b in data.make_eval_batches(off, 8)
                 if (b["inputs"] == eos).any())
    np.testing.assert_array_equal(plain["inputs"], inputs)  # the same windows, only the extra fields
    assert "segment_ids" not in plain


def test_hugging_face_tokenizer_errors_are_one_line(tmp_path):
    from train.errors import UserError

    (tmp_path / "not_a_tokenizer.json").write_text('{"hello": 1}')
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        tokenizer.HFTokenizer(str(tmp_path / "not_a_tokenizer.json"))
    with pytest.raises(UserError, match="cannot be read"):
        tokenizer.HFTokenizer(str(tmp_path / "missing.json"))
    train_hf_bpe(tmp_path / "no_eos.json", special=("<pad>",))
    with pytest.raises(UserError, match="no end-of-text token"):
        tokenizer.HFTokenizer(str(tmp_path / "no_eos.json"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="without tokenizer.json"):
        tokenizer.make_tokenizer(str(tmp_path / "empty_dir"))


def test_sentencepiece_tokenizer_roundtrip_and_pipeline(data_dir, tmp_path):
    import sentencepiece as spm

    files = python_stdlib_text.stdlib_files()
    sample = "".join(t for _, t in files[:30])[:200_000]
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample.splitlines()), model_prefix=prefix, vocab_size=300,
        model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["\n"], minloglevel=2, num_threads=1)
    tok = tokenizer.make_tokenizer(prefix + ".model")
    assert tok.vocab_size == 300 and tok.eos_id >= 0
    for _, text in files[:5]:
        chunk = text[:3000]
        ids = tok.encode(chunk)
        assert ids.dtype == np.int32 and len(ids) < len(chunk)
        assert tok.decode(ids) == chunk

    cfg = text_cfg(data_dir, seq_len=32, tokenizer=prefix + ".model")
    assert data.get_vocab_size(cfg) == 300
    with pytest.raises(ValueError, match="vocab_size"):  # 257 < 300: model would be too small.
        data.make_eval_batches(cfg, 16)
    cfg.vocab_size = 300
    ev = data.make_eval_batches(cfg, 16)
    batch = next(iter(ev))
    assert batch["inputs"].shape == (16, 32) and batch["inputs"].max() < 300
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


# ----------------------------------------------------------------------------- eval
def test_eval_batches_cover_split_exactly_once(data_dir):
    cfg = image_cfg(data_dir)
    B = 64
    single = list(data.make_eval_batches(cfg, B))
    assert len(single) == len(data.make_eval_batches(cfg, B)) == 6  # ceil(360 / 64)
    pixels = np.concatenate([b["image"] for b in single])
    mask = np.concatenate([b["mask"] for b in single])
    assert mask.dtype == np.float32 and mask.sum() == 360 and mask[:360].all()
    src = dataset_builder("digits", data_dir).as_data_source("test")
    expect = np.stack([images.normalize(src[i]["image"]) for i in range(360)])
    np.testing.assert_array_equal(pixels[:360], expect)

    parts = [list(data.make_eval_batches(cfg, B, process_index=p, process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == 6
    for k, ref in enumerate(single):
        assert_batches_equal(ref, {key: np.concatenate([parts[0][k][key], parts[1][k][key]])
                                   for key in ref})

    tcfg = text_cfg(data_dir, seq_len=32, document_mask=False)  # every target counted
    n = data.num_examples(tcfg, "validation")
    tb = list(data.make_eval_batches(tcfg, 32))
    assert len(tb) == -(-n // 32)
    assert sum(b["mask"].sum() for b in tb) == n * 32
    capped = data.make_eval_batches(text_cfg(data_dir, eval_max_batches=2), 32)
    assert len(capped) == 2 == len(list(capped))


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_and_determinism():
    cfg = data_config("synthetic")
    cfg.image_size, cfg.num_classes = 16, 7
    a, b = next(data.make_train_iterator(cfg, 8, 0)), next(data.make_train_iterator(cfg, 8, 0))
    assert a["image"].shape == (8, 16, 16, 3) and a["image"].dtype == np.float32
    assert a["label"].dtype == np.int32 and a["label"].max() < 7
    assert_batches_equal(a, b)
    assert not np.array_equal(a["image"], next(data.make_train_iterator(cfg, 8, 1))["image"])
    one = data.make_train_batches(cfg, 8, 0, process_index=0, process_count=1)[3]
    two = [data.make_train_batches(cfg, 8, 0, process_index=p, process_count=2)[3] for p in (0, 1)]
    np.testing.assert_array_equal(one["label"], np.concatenate([t["label"] for t in two]))

    cfg.kind, cfg.seq_len, cfg.vocab_size = "text", 24, 50
    t = next(data.make_train_iterator(cfg, 4, 0))
    assert t["inputs"].shape == t["targets"].shape == (4, 24) and t["inputs"].max() < 50
    np.testing.assert_array_equal(t["targets"][:, :-1], t["inputs"][:, 1:])
    ev = data.make_eval_batches(cfg, 64)
    assert len(ev) == 8 and next(iter(ev))["mask"].shape == (64, 24)


# ----------------------------------------------------------------------------- preprocessing
def test_image_ops():
    rng = np.random.default_rng(0)
    for _ in range(50):
        y, x, h, w = images.random_resized_crop_box(40, 60, rng, (0.2, 1.0))
        assert 0 <= y and y + h <= 40 and 0 <= x and x + w <= 60
        assert 0.15 <= h * w / 2400 <= 1.05 and 0.7 <= w / h <= 1.45
    const = np.full((30, 50, 3), 77, np.uint8)
    np.testing.assert_allclose(images.resize(const, 9, 13), 77, rtol=1e-5)
    img = rng.integers(0, 256, (8, 8, 1)).astype(np.uint8)
    np.testing.assert_array_equal(images.resize(img, 8, 8), img.astype(np.float32))
    ev = images.EvalImageTransform(4, 3, crop_fraction=0.5)({"image": img, "label": 3})
    assert ev["image"].shape == (4, 4, 3) and ev["label"] == 3
    np.testing.assert_allclose(ev["image"][..., 0], images.normalize(img[2:6, 2:6, 0]))
    tr = images.TrainImageTransform(8, 1, random_resized_crop=False, crop_scale=(1, 1),
                                        aspect_ratio=(1, 1), flip=True)
    outs = {tr({"image": img, "label": 0}, np.random.default_rng(s))["image"].tobytes()
            for s in range(8)}
    assert outs == {images.normalize(img).tobytes(), images.normalize(img[:, ::-1]).tobytes()}


def test_default_config_presets():
    c = data_config()
    assert (c.name, c.kind, c.image_size, c.channels, c.num_classes) == ("digits", "image", 8, 1, 10)
    assert c.data_dir is None and c.tokenizer == "bytes" and c.num_workers == 0
    assert tuple(c.augment.crop_scale) == (0.08, 1.0)
    i = data_config("imagenet2012")
    assert (i.image_size, i.channels, i.num_classes, i.eval_split) == (224, 3, 1000, "validation")
    assert i.augment.random_resized_crop and i.augment.flip
    t = data_config("python_stdlib_text")
    assert t.kind == "text" and t.eval_split == "validation"
    t.data_dir = "/somewhere"  # None-valued fields accept strings later.
    with pytest.raises(ValueError, match="tokenizer"):
        tokenizer.make_tokenizer("")


# ----------------------------------------------------------------------------- devices
def test_to_global_batch_shards_batch_dim_over_data_and_fsdp(data_dir):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    local = next(data.make_train_iterator(image_cfg(data_dir), 16, 0))
    arrays = mesh_lib.to_global_batch(local, mesh)
    expected = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    for k, arr in arrays.items():
        assert isinstance(arr, jax.Array) and arr.shape == local[k].shape
        assert arr.sharding.is_equivalent_to(expected, arr.ndim)
        assert {s.data.shape[0] for s in arr.addressable_shards} == {4}
        np.testing.assert_array_equal(np.asarray(arr), local[k])
    text = next(data.make_train_iterator(text_cfg(data_dir), 8, 0))
    arr = mesh_lib.to_global_batch(text, mesh, PartitionSpec("data"))["inputs"]
    assert arr.sharding.spec == PartitionSpec("data") and arr.shape == (8, 32)
