"""Tests of drt_jax.data: tokenizers, sources (pydoc, text, jsonl, parquet, datasets, tfds), the
PG19 recipe on a stand-in, grain pipelines, resuming."""

import gzip
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from configs import drt_pg19
from configs import tiny
from drt_jax import config as config_lib
from drt_jax import metrics as metrics_lib
from drt_jax import train as train_main
from drt_jax.data import DataError
from drt_jax.data import pipeline
from drt_jax.data import sources
from drt_jax.data import tokenizer as tokenizer_lib

UNICODE_TEXT = "Héllo wörld — ✓ 日本語 🙂\n\ttabs and\r\nnewlines"


def _config(cache_dir, **data):
  """configs/tiny.py (seq_len 240, global batch 16, byte tokenizer, pydoc), cached in cache_dir."""
  config = tiny.get_config()
  config.data.cache_dir = str(cache_dir)
  config.data.update(data)
  return config


def _take(iterator, n):
  return [next(iterator)["inputs"] for _ in range(n)]


def _bpe_json(tmp_path, special_tokens):
  """A byte-level BPE tokenizer trained on a few strings, saved as tokenizers JSON."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the cat sat on the mat", "the dog ate the cat", UNICODE_TEXT], trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return str(path)


@pytest.fixture
def text_dir(tmp_path):
  """Text files in nested folders, plus files the text source must skip."""
  root = tmp_path / "texts"
  (root / "sub").mkdir(parents=True)
  (root / ".hidden").mkdir()
  for k in range(5):
    (root / f"doc{k}.txt").write_text(f"Document {k}. {UNICODE_TEXT}\n" * (k + 1), encoding="utf-8")
  (root / "sub" / "nested.md").write_text("# nested\n" + UNICODE_TEXT, encoding="utf-8")
  (root / "empty.txt").write_text("")
  (root / "image.bin").write_bytes(b"\x89PNG\0\1\2")
  (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (root / ".hidden" / "secret.txt").write_text("never read")
  return root


def _expected_text_tokens(root):
  """The text source's stream, written out: sorted readable files, each followed by eos."""
  tok = tokenizer_lib.ByteTokenizer()
  names = ["doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt", "doc4.txt", "sub/nested.md"]
  return np.concatenate([np.append(tok.encode((root / n).read_bytes().decode()), tok.eos_id)
                         for n in names])


def _stream(corpus):
  return np.concatenate([corpus.train.array(), corpus.eval.array()])


class TestTokenizers:

  def test_byte_roundtrip(self):
    tok = tokenizer_lib.make_tokenizer("byte")
    ids = tok.encode(UNICODE_TEXT)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode(np.append(ids, [tok.eos_id, 258])) == UNICODE_TEXT  # specials dropped

  @pytest.mark.parametrize("eos", ["<|endoftext|>", "</s>"])
  def test_hf_roundtrip_and_eos(self, tmp_path, eos):
    path = _bpe_json(tmp_path, ["<pad>", eos])
    tok = tokenizer_lib.make_tokenizer(path)
    assert isinstance(tok, tokenizer_lib.HFTokenizer)
    assert tok.eos_id == tokenizers.Tokenizer.from_file(path).token_to_id(eos) == 1
    ids = tok.encode(UNICODE_TEXT)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.decode(np.append(ids, tok.eos_id)) == UNICODE_TEXT
    assert [list(x) for x in tok.encode_batch(["the cat", "sat"])] == [
        list(tok.encode("the cat")), list(tok.encode("sat"))]

  def test_hf_without_eos_token(self, tmp_path):
    with pytest.raises(DataError, match="no end-of-document token"):
      tokenizer_lib.make_tokenizer(_bpe_json(tmp_path, ["<pad>"]))

  def test_bad_paths(self, tmp_path):
    missing = str(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no such file") as err:
      tokenizer_lib.make_tokenizer(missing)
    assert missing in str(err.value) and "\n" not in str(err.value)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(DataError, match="not a HuggingFace tokenizers JSON") as err:
      tokenizer_lib.make_tokenizer(str(garbage))
    assert str(garbage) in str(err.value) and "\n" not in str(err.value)


class TestSources:

  def test_pydoc(self, tmp_path):
    config = _config(tmp_path)
    corpus = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    stream = _stream(corpus)
    assert stream.dtype == np.uint16 and len(stream) > 400_000
    assert (stream == 256).sum() > 50  # one eos per topic
    assert corpus.train.stop == corpus.eval.start == len(stream) - int(len(stream) * 0.05)

  def test_pystdlib(self, tmp_path):
    config = _config(tmp_path, source="pystdlib")
    corpus = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    stream = _stream(corpus)
    files = sources.python_stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") and "-packages" not in f for f in files)
    assert len(stream) > 2_000_000
    # Held out by file: whole files, about 5% of them, spread over the library.
    train, held_out = sources.stdlib_split(files, 0.05)
    assert sorted(train + held_out) == files and not set(train) & set(held_out)
    assert len(held_out) == int(np.ceil(0.05 * len(files)))
    assert held_out != files[-len(held_out):]  # not the alphabetical tail
    for span, first_file in ((corpus.train, train[0]), (corpus.eval, held_out[0])):
      first = open(first_file, "rb").read()
      if b"\0" in first or not first:
        continue
      np.testing.assert_array_equal(span.array()[:len(first) + 1], list(first) + [256])
    assert len(corpus.eval) < 0.2 * len(corpus.train)

  def test_text_folder(self, tmp_path, text_dir):
    config = _config(tmp_path, source="text", path=str(text_dir), eval_fraction=0.25)
    corpus = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    expected = _expected_text_tokens(text_dir)
    np.testing.assert_array_equal(_stream(corpus), expected)
    assert len(corpus.eval) == int(len(expected) * 0.25)

  def test_single_file(self, tmp_path, text_dir):
    config = _config(tmp_path, source="text", path=str(text_dir / "doc0.txt"))
    stream = _stream(sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer()))
    text = (text_dir / "doc0.txt").read_bytes().decode()
    assert tokenizer_lib.ByteTokenizer().decode(stream) == text

  def test_cache_is_reused_and_keyed_by_files(self, tmp_path, text_dir):
    config = _config(tmp_path, source="text", path=str(text_dir))
    first = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())

    class NoEncoding(tokenizer_lib.ByteTokenizer):
      def encode_batch(self, texts):
        raise AssertionError("re-tokenized a cached corpus")

    assert sources.load_corpus(config.data, NoEncoding()) == first
    (text_dir / "doc9.txt").write_text("a new file")
    assert sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer()) != first
    assert not list((tmp_path).glob("*.tmp-*"))

  @pytest.mark.parametrize("case, message", [
      ("missing", "no such file or folder"),
      ("empty", "no files in this folder"),
      ("binary.bin", "no non-empty UTF-8 text"),
  ])
  def test_text_errors(self, tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.bin").write_bytes(b"\0\1")
    path = str(tmp_path / case)
    config = _config(tmp_path / "cache", source="text", path=path)
    with pytest.raises(DataError, match=message) as err:
      sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    assert path in str(err.value) and "\n" not in str(err.value)

  def test_tfds_builder_matches_text_source(self, tmp_path, text_dir):
    from drt_jax.data import text_files_tfds

    data_dir = str(tmp_path / "tfds")
    text_files_tfds.prepare(str(text_dir), data_dir)
    config = _config(tmp_path / "cache", source="tfds", tfds_name="drt_text_files",
                     tfds_data_dir=data_dir)
    corpus = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    np.testing.assert_array_equal(_stream(corpus), _expected_text_tokens(text_dir))
    # The last of the sorted files is the validation split.
    nested = (text_dir / "sub" / "nested.md").read_bytes().decode()
    assert tokenizer_lib.ByteTokenizer().decode(corpus.eval.array()) == nested

  def test_tfds_missing_dataset(self, tmp_path):
    config = _config(tmp_path, source="tfds", tfds_name="drt_text_files",
                     tfds_data_dir=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="cannot open split 'train'") as err:
      sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    assert "\n" not in str(err.value)


class TestTrainIterator:

  def test_deterministic_and_seeded(self, tmp_path):
    config = _config(tmp_path)
    first = _take(pipeline.make_train_iterator(config), 3)
    assert first[0].shape == (16, 240) and first[0].dtype == np.int32
    for a, b in zip(first, _take(pipeline.make_train_iterator(config), 3)):
      np.testing.assert_array_equal(a, b)
    config.seed = 1
    assert not np.array_equal(first[0], _take(pipeline.make_train_iterator(config), 1)[0])

  def test_windows_follow_the_reference_sampler(self, tmp_path):
    config = _config(tmp_path)
    train = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer()).train.array()
    batches = _take(pipeline.make_train_iterator(config), 2)
    for step, batch in enumerate(batches):
      for row, window in enumerate(batch):
        i = step * 16 + row
        start = np.random.default_rng([config.seed, i]).integers(0, len(train) - 240 - 1)
        assert start + 240 < len(train)  # inside the train range, never in the held-out tail
        np.testing.assert_array_equal(window, train[start:start + 240])

  def test_process_sharding_keeps_the_global_batch(self, tmp_path):
    config = _config(tmp_path)
    whole = _take(pipeline.make_train_iterator(config), 3)
    parts = [_take(pipeline.make_train_iterator(config, process_index=p, process_count=2), 3)
             for p in range(2)]
    for step in range(3):
      assert parts[0][step].shape == (8, 240)
      np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), whole[step])

  def test_resume_from_state(self, tmp_path):
    config = _config(tmp_path)
    uninterrupted = _take(pipeline.make_train_iterator(config), 4)
    iterator = pipeline.make_train_iterator(config)
    _take(iterator, 3)
    state = iterator.get_state()
    resumed = pipeline.make_train_iterator(config)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["inputs"], uninterrupted[3])

  def test_resume_through_orbax(self, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    config = _config(tmp_path)
    uninterrupted = _take(pipeline.make_train_iterator(config), 3)
    iterator = pipeline.make_train_iterator(config)
    _take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
      manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
      manager.wait_until_finished()
    resumed = pipeline.make_train_iterator(config)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
      manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(next(resumed)["inputs"], uninterrupted[2])

  def test_worker_processes_give_the_same_batches(self, tmp_path):
    config = _config(tmp_path)
    expected = _take(pipeline.make_train_iterator(config), 3)
    config.data.worker_count = 2
    iterator = pipeline.make_train_iterator(config)
    try:
      for a, b in zip(_take(iterator, 3), expected):
        np.testing.assert_array_equal(a, b)
    finally:
      iterator.close()

  def test_too_short_corpus(self, tmp_path, text_dir):
    config = _config(tmp_path, source="text", path=str(text_dir), seq_len=15 * 1000)
    with pytest.raises(DataError, match="too short for windows of data.seq_len=15000"):
      pipeline.make_train_iterator(config)


class TestEvalBatches:

  def test_consecutive_held_out_windows(self, tmp_path):
    config = _config(tmp_path)
    corpus = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    held_out = corpus.eval.array()
    batches = pipeline.make_eval_batches(config, 4)
    assert len(batches) == 4 and batches[0]["inputs"].shape == (16, 240)
    windows = np.concatenate([b["inputs"] for b in batches])
    np.testing.assert_array_equal(windows.reshape(-1), held_out[:4 * 16 * 240])
    assert corpus.train.stop == corpus.eval.start  # held out: after every training window's end
    again = pipeline.make_eval_batches(config, 4)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, again))

  def test_process_sharding_and_cap(self, tmp_path):
    config = _config(tmp_path)
    whole = pipeline.make_eval_batches(config, 2)
    parts = [pipeline.make_eval_batches(config, 2, process_index=p, process_count=2)
             for p in range(2)]
    for b in range(2):
      for name in ("inputs", "target_weights"):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][b][name], parts[1][b][name]]), whole[b][name])
    held_out = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer()).eval
    windows = len(held_out) // 240
    every = pipeline.make_eval_batches(config, 10_000)
    assert len(every) == -(-windows // 16) and windows % 16  # the last batch is padded
    weights = np.concatenate([b["target_weights"] for b in every])
    assert weights[:windows].all() and not weights[windows:].any()

  def test_small_held_out_set_and_own_batch_size(self, tmp_path):
    held_out = tmp_path / "valid.txt"
    held_out.write_text("Held-out text, a few windows long. " * 20)  # 700 bytes: 2 windows + eos
    config = _config(tmp_path, source="text", path=str(tmp_path / "valid.txt"),
                     eval_path=str(held_out))
    config.train.eval_batch_size = 4
    batches = pipeline.make_eval_batches(config, 16)
    assert len(batches) == 1 and batches[0]["inputs"].shape == (4, 240)
    expected = np.append(tokenizer_lib.ByteTokenizer().encode(held_out.read_text()), 256)
    np.testing.assert_array_equal(batches[0]["inputs"][:2].reshape(-1), expected[:480])
    np.testing.assert_array_equal(batches[0]["target_weights"][:, 0], [1, 1, 0, 0])
    assert not batches[0]["inputs"][2:].any()

  def test_held_out_too_short(self, tmp_path):
    config = _config(tmp_path, eval_fraction=0.0001)
    message = r"held-out stream has \d+ tokens = 0 windows of data.seq_len=240: raise data.eval_"
    with pytest.raises(DataError, match=message):
      pipeline.make_eval_batches(config, 1)


class TestValidation:

  @pytest.mark.parametrize("field, value, message", [
      ("source", "web",
       "data.source='web': must be one of 'pydoc', 'pystdlib', 'text', 'jsonl', 'parquet'"),
      ("tokenizer", "/no/such.json", "data.tokenizer='/no/such.json': must be 'byte' or"),
      ("eval_fraction", 0.0, r"data.eval_fraction=0.0: must be in \(0, 1\)"),
      ("eval_fraction", 1.0, r"data.eval_fraction=1.0: must be in \(0, 1\)"),
      ("worker_count", -1, "data.worker_count=-1"),
      ("seq_len", 0, "data.seq_len=0"),
  ])
  def test_bad_field(self, tmp_path, field, value, message):
    config = _config(tmp_path)
    config.data[field] = value
    with pytest.raises(DataError, match=message):
      pipeline.validate_data_config(config.data)

  def test_source_specific_fields(self, tmp_path):
    with pytest.raises(DataError, match="data.path=''"):
      pipeline.validate_data_config(_config(tmp_path, source="text").data)
    with pytest.raises(DataError, match="data.tfds_name=''"):
      pipeline.validate_data_config(_config(tmp_path, source="tfds").data)
    pipeline.validate_data_config(_config(tmp_path).data)

  def test_vocab_must_fit_the_model(self, tmp_path):
    config = _config(tmp_path, tokenizer=_bpe_json(tmp_path, ["<|endoftext|>"]))
    with pytest.raises(DataError, match="model.vocab_size=259: smaller than the vocabulary"):
      pipeline.make_train_iterator(config)

  def test_batch_must_split_over_processes(self, tmp_path):
    with pytest.raises(ValueError, match="train.global_batch_size=16: must be a positive multiple"):
      pipeline.make_train_iterator(_config(tmp_path), process_index=0, process_count=3)


class TestTaskEvalBatches:

  def test_answers_sit_at_answer_start_at_spread_depths(self, tmp_path):
    config = _config(tmp_path, task_fraction=0.5, tasks="passkey,multihop")
    batches = pipeline.make_task_eval_batches(config)
    assert list(batches) == ["passkey", "multihop"]
    tokenizer = tokenizer_lib.ByteTokenizer()
    for task, batch in batches.items():
      assert batch["inputs"].shape == (16, 240) and batch["answer_start"].shape == (16,)
      for tokens, start, answer in zip(batch["inputs"], batch["answer_start"], batch["answer"]):
        assert start % config.model.chunk_len == 1
        np.testing.assert_array_equal(tokens[start:start + len(answer)], answer)
        assert tokenizer.decode(tokens[:start]).endswith(" is ")
    needles = [tokenizer.decode(t).find("|The passkey is ") for t in batches["passkey"]["inputs"]]
    assert needles == sorted(needles) and needles[0] == 0 and needles[-1] > 150  # depths 0 .. 1
    again = pipeline.make_task_eval_batches(config)["passkey"]
    np.testing.assert_array_equal(again["inputs"], batches["passkey"]["inputs"])

  def test_process_rows_make_the_global_batch(self, tmp_path):
    config = _config(tmp_path, task_fraction=1.0)
    whole = pipeline.make_task_eval_batches(config)["passkey"]
    parts = [pipeline.make_task_eval_batches(config, process_index=p, process_count=2)["passkey"]
             for p in range(2)]
    for name in whole:
      np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), whole[name])

  def test_none_without_tasks(self, tmp_path):
    assert pipeline.make_task_eval_batches(_config(tmp_path)) == {}


RECORDS = [f"Record {k}: {UNICODE_TEXT} " * (k + 1) for k in range(6)]


def _expected_tokens(texts, tok=tokenizer_lib.ByteTokenizer()):
  return np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in texts])


def _write_jsonl(path, texts, field="text", compress=False):
  # A blank line after the second record: skipped.
  lines = "".join(json.dumps({"id": k, field: t}) + "\n" * (1 + (k == 1))
                  for k, t in enumerate(texts))
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(lines)
  else:
    path.write_text(lines, encoding="utf-8")


def _write_parquet(path, texts, field="text"):
  pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=2)


@pytest.fixture
def record_sources(tmp_path):
  """The same six records as a jsonl folder (one plain, one gzipped file), a parquet folder and
  a datasets DatasetDict (train: the six; validation: two more); held-out files of each kind."""
  # The `datasets` extra (part of `dev`), imported where used so that a machine without it (the
  # GPU image, `make test-gpu`) still collects this file.
  import datasets
  held_out = ["Held out one. " * 30, "Held out two. " * 30]
  (tmp_path / "jsonl" / "sub").mkdir(parents=True)
  _write_jsonl(tmp_path / "jsonl" / "a.jsonl", RECORDS[:4])
  _write_jsonl(tmp_path / "jsonl" / "sub" / "b.jsonl.gz", RECORDS[4:], compress=True)
  (tmp_path / "jsonl" / "notes.txt").write_text("not a jsonl file: skipped")
  _write_jsonl(tmp_path / "valid.jsonl", held_out)
  (tmp_path / "parquet").mkdir()
  _write_parquet(tmp_path / "parquet" / "part-0.parquet", RECORDS[:3])
  _write_parquet(tmp_path / "parquet" / "part-1.parquet", RECORDS[3:])
  _write_parquet(tmp_path / "valid.parquet", held_out)
  datasets.DatasetDict({
      "train": datasets.Dataset.from_dict({"text": RECORDS, "id": list(range(6))}),
      "validation": datasets.Dataset.from_dict({"text": held_out, "id": [6, 7]}),
  }).save_to_disk(str(tmp_path / "hf"))
  return {"jsonl": (str(tmp_path / "jsonl"), str(tmp_path / "valid.jsonl")),
          "parquet": (str(tmp_path / "parquet"), str(tmp_path / "valid.parquet")),
          "datasets": (str(tmp_path / "hf"), str(tmp_path / "hf"))}, held_out


class TestRecordSources:

  @pytest.mark.parametrize("source", ["jsonl", "parquet", "datasets"])
  def test_records_in_order_with_eos(self, tmp_path, record_sources, source):
    paths, held_out = record_sources
    config = _config(tmp_path / "cache", source=source, path=paths[source][0], eval_fraction=0.25)
    corpus = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    expected = _expected_tokens(RECORDS)
    np.testing.assert_array_equal(_stream(corpus), expected)
    assert len(corpus.eval) == int(len(expected) * 0.25)
    config.data.eval_path = paths[source][1]
    corpus = sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    np.testing.assert_array_equal(corpus.train.array(), expected)  # all of data.path trains
    np.testing.assert_array_equal(corpus.eval.array(), _expected_tokens(held_out))

  def test_a_plain_dataset_and_another_text_field(self, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": RECORDS[:2]}).save_to_disk(str(tmp_path / "hf"))
    config = _config(tmp_path / "cache", source="datasets", path=str(tmp_path / "hf"),
                     text_field="body")
    np.testing.assert_array_equal(
        _stream(sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())),
        _expected_tokens(RECORDS[:2]))

  @pytest.mark.parametrize("source, write, message", [
      ("jsonl", lambda p: p.write_text('{"text": "fine"}\n{"text": oops}\n'),
       r"bad.jsonl:2: not a JSON object"),
      ("jsonl", lambda p: p.write_text('{"body": "no text field"}\n'),
       r"bad.jsonl:1: no data.text_field='text' in the record \(it has \['body'\]\)"),
      ("jsonl", lambda p: p.write_text('{"text": 7}\n'),
       r"bad.jsonl:1: data.text_field='text' is a int, not a string"),
      ("parquet", lambda p: _write_parquet(p, ["x"], field="body"),
       r"bad.parquet: no column data.text_field='text' \(columns: id, body\)"),
      ("parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
       r"bad.parquet: column data.text_field='text' has type int64, not string"),
      ("parquet", lambda p: p.write_text("not parquet"), r"bad.parquet: not a Parquet file"),
  ])
  def test_bad_records(self, tmp_path, source, write, message):
    path = tmp_path / f"bad.{source}"
    write(path)
    config = _config(tmp_path / "cache", source=source, path=str(path))
    with pytest.raises(DataError, match=message) as err:
      sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    assert "\n" not in str(err.value)

  def test_folder_without_such_files(self, tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("text")
    config = _config(tmp_path / "cache", source="parquet", path=str(tmp_path / "texts"))
    with pytest.raises(DataError, match=r"data.path='.*texts': no \*.parquet files"):
      sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())

  def test_datasets_errors(self, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(tmp_path / "hf"))
    config = _config(tmp_path / "cache", source="datasets", path=str(tmp_path / "hf"),
                     eval_path=str(tmp_path / "hf"))
    with pytest.raises(DataError, match="data.eval_path=.*a DatasetDict without a 'validation' "
                                        r"split \(it has train\)"):
      sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())
    config = _config(tmp_path / "cache", source="datasets", path=str(tmp_path / "hf"),
                     text_field="body")
    with pytest.raises(DataError, match=r"no column data.text_field='body' \(columns: text\)"):
      sources.load_corpus(config.data, tokenizer_lib.ByteTokenizer())


class TestNewSourceValidation:

  @pytest.mark.parametrize("data, message", [
      (dict(source="jsonl", path="/no/such"), "data.path='/no/such': no such file or folder "
                                              r"\(data.source='jsonl'\)"),
      (dict(source="text", path=".", eval_path="/no/such"), "data.eval_path='/no/such': no such"),
      (dict(source="parquet", path=".", text_field=""), "data.text_field='': must name"),
      (dict(source="pydoc", eval_path="."), "data.eval_path='.': only for data.source 'text', "
                                            "'jsonl', 'parquet', 'datasets'"),
      (dict(source="tfds", tfds_name="pg19", eval_path="."), "reads the 'validation' split"),
      (dict(source="datasets", path="."), "data.path='.': not a folder written by datasets' "
                                          "save_to_disk"),
  ])
  def test_bad_fields(self, tmp_path, data, message):
    with pytest.raises(DataError, match=message) as err:
      pipeline.validate_data_config(_config(tmp_path, **data).data)
    assert "\n" not in str(err.value)

  def test_bad_eval_batch_size(self):
    config = tiny.get_config()
    config.train.eval_batch_size = -2
    with pytest.raises(config_lib.ConfigError,
                       match="train.eval_batch_size=-2: must be an integer"):
      config_lib.validate(config)


class TestTokenizerFiles:

  def test_vocab_size_zero_takes_the_tokenizers(self, tmp_path):
    path = _bpe_json(tmp_path, ["<|endoftext|>"])
    config = _config(tmp_path, tokenizer=path)
    config.model.vocab_size = 0
    model = config_lib.validate(config)
    size = tokenizers.Tokenizer.from_file(path).get_vocab_size()
    assert model.vocab_size == config.model.vocab_size == size and 257 < size <= 300
    config.model.vocab_size, config.data.tokenizer = 0, str(tmp_path / "missing.json")
    with pytest.raises(config_lib.ConfigError, match="model.vocab_size=0 takes the vocabulary"):
      config_lib.validate(config)

  def test_eos_from_tokenizer_config(self, tmp_path):
    path = _bpe_json(tmp_path, ["<|endoftext|>", "</s>"])
    assert tokenizer_lib.make_tokenizer(path).eos_id == 0  # EOS_TOKENS order without a config
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "special": True}}))
    assert tokenizer_lib.make_tokenizer(path).eos_id == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"}))
    with pytest.raises(DataError, match="names eos_token '<eot>', which is not in its vocabulary"):
      tokenizer_lib.make_tokenizer(path)


def _train_briefly(config, workdir):
  """Two training steps and an eval of the tests' small model on config.data; the eval row."""
  from tests.helpers import small_config

  run = small_config()
  run.data = config.data
  run.model.vocab_size = config.model.vocab_size
  run.data.seq_len = 7 * 6
  train = run.train
  train.global_batch_size, train.num_train_steps, train.warmup_steps = 4, 2, 1
  train.log_every = train.eval_every = train.checkpoint_every = 2
  train_main.train(run, str(workdir), progress=False)
  return [r for r in metrics_lib.read_metrics(str(workdir)) if "eval_loss" in r][-1]


@pytest.mark.parametrize("source", ["jsonl", "parquet", "datasets"])
def test_record_sources_train(tmp_path, record_sources, source):
  paths, _ = record_sources
  config = _config(tmp_path / "cache", source=source, path=paths[source][0],
                   eval_path=paths[source][1])
  row = _train_briefly(config, tmp_path / "run")
  assert row["step"] == 2 and 0 < row["eval_loss"] < 10


def _pg19_stand_in(root):
  """A few tiny books in the PG19 release's layout: <split>/<book id>.txt."""
  books = {"train": {10001: "The first book. " * 40, 10002: "A second, longer book. " * 60,
                     10003: "Chapter I.\nIt was a dark night. " * 30},
           "validation": {20001: "A held-out book to evaluate on. " * 20},
           "test": {30001: "A test book, never read here. " * 20}}
  for split, split_books in books.items():
    (root / split).mkdir(parents=True)
    for book_id, text in split_books.items():
      (root / split / f"{book_id}.txt").write_text(text, encoding="utf-8")
  return books


def test_pg19_recipe_on_a_stand_in(tmp_path):
  books = _pg19_stand_in(tmp_path / "pg19")
  tokenizer_path = _bpe_json(tmp_path, ["<|endoftext|>"])
  config = drt_pg19.get_config()
  config.data.path = str(tmp_path / "pg19" / "train")
  config.data.eval_path = str(tmp_path / "pg19" / "validation")
  config.data.tokenizer = tokenizer_path
  config.data.cache_dir = str(tmp_path / "cache")
  tok = tokenizer_lib.make_tokenizer(tokenizer_path)
  corpus = sources.load_corpus(config.data, tok)
  np.testing.assert_array_equal(corpus.train.array(), _expected_tokens(
      [books["train"][k] for k in sorted(books["train"])], tok))
  np.testing.assert_array_equal(corpus.eval.array(),
                                _expected_tokens(books["validation"].values(), tok))
  assert config.model.vocab_size == 0  # the tokenizer's, resolved by validate()
  config_lib.validate(config)
  assert config.model.vocab_size == tok.vocab_size
  row = _train_briefly(config, tmp_path / "run")
  assert row["step"] == 2 and 0 < row["eval_loss"] < 10


def test_other_processes_wait_for_process_zeros_tokens(tmp_path, text_dir, monkeypatch):
  """Process 0 tokenizes; a second process that asks meanwhile waits for the file and reads it
  without tokenizing (here as two threads; jax.process_index faked per thread)."""
  config = _config(tmp_path / "cache", source="text", path=str(text_dir))
  index = threading.local()
  monkeypatch.setattr(sources, "_process_index", lambda: getattr(index, "value", 0))
  calls = {0: 0, 1: 0}

  class SlowTokenizer(tokenizer_lib.ByteTokenizer):
    def __init__(self, process):
      self.process = process

    def encode_batch(self, texts):
      calls[self.process] += 1
      time.sleep(1.0)  # the other process asks while this one tokenizes
      return super().encode_batch(texts)

  spans = {}

  def load(process):
    index.value = process
    spans[process] = sources.load_corpus(config.data, SlowTokenizer(process)).train

  first = threading.Thread(target=load, args=(0,))
  first.start()
  time.sleep(0.3)
  load(1)
  first.join()
  assert calls == {0: 1, 1: 0}
  assert spans[0] == spans[1]
  np.testing.assert_array_equal(_stream(sources.load_corpus(
      config.data, tokenizer_lib.ByteTokenizer())), _expected_text_tokens(text_dir))
