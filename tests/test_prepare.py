"""train.prepare: a user's corpus or image folder becomes a TFDS dataset the trainer reads."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _util import REPO, cpu_env, tiny_lm, tiny_vit, train_hf_bpe

from train.data import prepare as prepare_lib
from train.errors import UserError

DOCS = {  # relative path -> the documents it holds
    "notes/a.txt": ["plain text file, one document\n"],
    "notes/b.md": ["# markdown\n\nalso one document, ünïcode kept"],
    "records/c.jsonl": ["first record", "second record"],
    "records/d.json": ["a .json file read as JSON lines"],
    "records/e.jsonl.gz": ["gzip record one", "gzip record two"],
    "records/f.jsonl.zst": ["zstd record"],
    "tables/g.parquet": ["parquet row one", "parquet row two", "parquet row three"],
    "notes/h.txt.gz": ["a compressed text document"],
}
BAD = {"notes/latin1.txt": "caf\xe9".encode("latin-1"),  # not UTF-8: skipped
       "records/broken.jsonl": b'{"text": "kept"}\n{not json\n{"other": "no text key"}\n',
       # One line with a byte that is not UTF-8 costs that line only; blank documents are dropped.
       "records/mixed.jsonl": b'{"text": "before the bad byte"}\n{"text": "caf\xe9"}\n{"text": " \\n\\t "}\n'
                              b'{"text": ""}\n{"text": "after the bad byte"}\n',
       "tables/blank.jsonl.zst": b""}  # filled in write_corpus (zstd of a whitespace-only record)
KEPT_FROM_BAD = ["kept", "before the bad byte", "after the bad byte"]


def write_corpus(root):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    for rel, docs in DOCS.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
            continue
        body = ("".join(json.dumps({"text": d, "meta": 1}) + "\n" for d in docs) if ".json" in rel
                else docs[0]).encode()
        if rel.endswith(".gz"):
            body = gzip.compress(body)
        elif rel.endswith(".zst"):
            body = zstandard.ZstdCompressor().compress(body)
        with open(path, "wb") as f:
            f.write(body)
    for rel, body in BAD.items():
        if rel.endswith(".zst"):
            body = zstandard.ZstdCompressor().compress(b'{"text": "   "}\n')
        with open(os.path.join(root, rel), "wb") as f:
            f.write(body)


def read_split(name, data_dir, split):
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, data_dir=str(data_dir), split=split)
    return [source[i] for i in range(len(source))]


def texts(records):
    return [r["text"].decode() for r in records]


def test_every_text_input_kind_once_deterministic_and_idempotent(tmp_path):
    write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    s = prepare_lib.prepare(str(tmp_path / "in"), "my_corpus", str(out), validation_fraction=0.3)
    expected = sorted([d for docs in DOCS.values() for d in docs] + KEPT_FROM_BAD)
    train, val = texts(read_split("my_corpus", out, "train")), texts(read_split("my_corpus", out, "validation"))
    assert sorted(train + val) == expected  # every document once, bytes as written
    assert (s["train"], s["validation"]) == (len(train), len(val)) and val
    # The latin-1 file, the bad line, the line without "text", the line with a latin-1 byte.
    assert len(s["skipped"]) == 4, s["skipped"]
    assert any("latin1.txt: not UTF-8" in p for p in s["skipped"])
    assert any("mixed.jsonl:2: not UTF-8" in p for p in s["skipped"])

    # Same input, a glob instead of the directory, 2 worker processes: the same records and split.
    again = tmp_path / "again"
    prepare_lib.prepare(str(tmp_path / "in" / "**" / "*"), "my_corpus", str(again),
                        validation_fraction=0.3, num_workers=2)
    assert texts(read_split("my_corpus", again, "train")) == train
    assert texts(read_split("my_corpus", again, "validation")) == val

    def files_and_times():
        return sorted((os.path.join(r, f), os.stat(os.path.join(r, f)).st_mtime_ns) for r, _, fs in os.walk(out) for f in fs)

    before = files_and_times()
    assert prepare_lib.prepare(str(tmp_path / "in"), "my_corpus", str(out), validation_fraction=0.3)["already_prepared"]
    assert files_and_times() == before  # not rewritten
    with pytest.raises(UserError, match="made from other input or options"):
        prepare_lib.prepare(str(tmp_path / "in" / "notes"), "my_corpus", str(out), validation_fraction=0.3)
    edited = tmp_path / "in" / "notes" / "a.txt"  # the same size, other content: other input
    edited.write_text(edited.read_text().replace("plain", "PLAIN"))
    with pytest.raises(UserError, match="made from other input or options"):
        prepare_lib.prepare(str(tmp_path / "in"), "my_corpus", str(out), validation_fraction=0.3)


def test_a_small_input_still_gets_a_validation_split(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"{i}.txt").write_text(f"document {i}")
    s = prepare_lib.prepare(str(tmp_path / "in"), "tiny", str(tmp_path / "out"), validation_fraction=0.01)
    assert (s["train"], s["validation"]) == (4, 1)
    assert len(read_split("tiny", tmp_path / "out", "validation")) == 1


def test_image_folder_with_classes_and_a_corrupt_file(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for c, cls in enumerate(["cat", "dog", "emu"]):
        os.makedirs(tmp_path / "in" / cls)
        for i in range(4):
            array = rng.integers(0, 256, (6 + i, 5, 3), dtype=np.uint8)
            mode = ("RGB", "L", "RGBA", "RGB")[i]
            image = Image.fromarray(array).convert(mode)
            image.save(tmp_path / "in" / cls / f"{i}.png")
            pixels[array.shape[0], c, i] = np.asarray(image.convert("RGB"))
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "in" / cls / "j.jpg")
    (tmp_path / "in" / "dog" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    s = prepare_lib.prepare(str(tmp_path / "in"), "pets", str(out), kind="image", validation_fraction=0.25)
    assert s["train"] + s["validation"] == 15 and len(s["skipped"]) == 1 and "truncated.png" in s["skipped"][0]

    import tensorflow_datasets as tfds

    assert tfds.builder("pets", data_dir=str(out)).info.features["label"].names == ["cat", "dog", "emu"]
    records = read_split("pets", out, "train") + read_split("pets", out, "validation")
    pngs = [r for r in records if r["image"].shape[1] == 5]
    assert len(pngs) == 12 and all(r["image"].dtype == np.uint8 and r["image"].shape[2] == 3 for r in records)
    for r in pngs:  # lossless: the pixels as saved (grey and RGBA converted to RGB)
        height, label = r["image"].shape[0], int(r["label"])
        np.testing.assert_array_equal(r["image"], pixels[height, label, height - 6])


def run_prepare(*args):
    return subprocess.run([sys.executable, "-m", "train.data.prepare", *args], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_exit_2_and_nothing_half_written(tmp_path):
    write_corpus(tmp_path / "in")
    (tmp_path / "tfr").mkdir()
    (tmp_path / "tfr" / "c4-train.tfrecord-00000-of-01024").write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    cases = [
        ([f"--input={tmp_path / 'nothing' / '*.jsonl'}"], "matches no files"),
        ([f"--input={tmp_path / 'tfr'}"], "tfds build NAME --file_format=array_record"),
        ([f"--input={tmp_path / 'in'}", "--on_bad_input=stop"], "not UTF-8"),
        ([f"--input={tmp_path / 'in' / 'records' / 'broken.jsonl'}", "--text_key=body"], "no documents in 1 files"),
        ([f"--input={tmp_path / 'in'}", "--kind=video"], "--kind must be one of"),
        ([f"--input={tmp_path / 'in'}", "--validation_fraction=1.5"], "--validation_fraction must be in"),
    ]
    for extra, message in cases:
        result = run_prepare("--name=corpus", f"--data_dir={out}", *extra)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not (out / "corpus").exists(), extra  # no dataset, no temporary directory
    result = run_prepare("--name=corpus", f"--data_dir={out}", f"--input={tmp_path / 'in'}")
    assert result.returncode == 0 and "prepared corpus" in result.stdout, result.stderr[-2000:]
    assert "warning: skipped 4 unusable" in result.stderr
    result = run_prepare("--name=corpus", f"--data_dir={out}", f"--input={tmp_path / 'in' / 'notes'}")
    assert result.returncode == 2 and "made from other input" in result.stderr


def test_trainer_reads_the_prepared_corpus_with_a_hugging_face_tokenizer(tmp_path):
    from train import trainer

    write_corpus(tmp_path / "in")
    prepare_lib.prepare(str(tmp_path / "in"), "my_corpus", str(tmp_path / "out"), validation_fraction=0.3)
    train_hf_bpe(tmp_path / "tokenizer.json", vocab_size=400)
    config = tiny_lm(num_steps=2, eval_every=2, checkpoint_every=0, **{
        "data.name": "my_corpus", "data.data_dir": str(tmp_path / "out"), "data.seq_len": 16,
        "data.tokenizer": str(tmp_path / "tokenizer.json"), "data.vocab_size": 400, "data.document_mask": True})
    last = trainer.run(config, str(tmp_path / "run"))
    assert np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])


def test_trainer_reads_the_prepared_image_folder(tmp_path):
    from PIL import Image

    from train import trainer

    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "in" / cls)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "in" / cls / f"{i}.png")
    prepare_lib.prepare(str(tmp_path / "in"), "ab", str(tmp_path / "out"), kind="image", validation_fraction=0.25)
    def config(classes):
        return tiny_vit(num_steps=2, eval_every=2, checkpoint_every=0, **{
            "data.name": "ab", "data.data_dir": str(tmp_path / "out"), "data.eval_split": "validation",
            "data.num_classes": classes})

    with pytest.raises(UserError, match="has 2 classes but data.num_classes=1; set --config.data.num_classes=2"):
        trainer.run(config(1), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    last = trainer.run(config(2), str(tmp_path / "run"))
    assert np.isfinite(last["loss"]) and 0 <= last["eval_accuracy"] <= 1


def test_key_hash_is_uniform_enough():
    hashes = np.array([prepare_lib.key_hash(f"file{i}.txt#0") for i in range(20000)])
    assert abs((hashes < 0.01).mean() - 0.01) < 0.003 and 0 <= hashes.min() and hashes.max() < 1
