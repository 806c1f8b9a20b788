"""TFDS builders over ArrayRecord: round trip without TensorFlow, corrupt/truncated files, manual_dir errors."""

import csv
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from merr1_jax.data import pipeline, schema, synth
from merr1_jax.data import tfds_builders as tb

SYNTH = synth.SynthConfig(n_train=24, n_validation=6, n_test=6)


def _synth_builder(data_dir, name="tiny", config=SYNTH):
  b = tb.MerSynth(config=tb.MerSynthConfig(name=name, synth=config), data_dir=str(data_dir))
  tb.prepare(b)
  return b


@pytest.fixture(scope="module")
def tok():
  return synth.build_tokenizer(SYNTH, vocab_size=512)


def test_mer_synth_round_trip_without_tensorflow(tmp_path):
  # A fresh interpreter, so no other test can have imported TensorFlow: build, read back, compare bytes.
  code = (
      "import sys\n"
      "from merr1_jax.data import tfds_builders as tb, synth, schema\n"
      f"cfg = synth.SynthConfig(n_train=24, n_validation=6, n_test=6)\n"
      f"b = tb.MerSynth(config=tb.MerSynthConfig(name='tiny', synth=cfg), data_dir={str(tmp_path)!r})\n"
      "tb.prepare(b)\n"
      "for split in synth.SPLITS:\n"
      "  src = tb.TfdsSource(b, split)\n"
      "  got = {schema.from_bytes(src.read(i)).id: src.read(i) for i in range(len(src))}\n"
      "  want = {r.id: schema.to_bytes(r) for r in synth.generate_split(cfg, split)}\n"
      "  assert got == want, split\n"
      "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
      "print('OK', b.info.splits['train'].num_examples)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"PYTHONPATH": os.getcwd()})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines()[-1] == "OK 24"
  assert list((tmp_path / "mer_synth" / "tiny" / "1.0.0").glob("*.array_record-*"))


def test_building_and_reading_leave_no_temporary_directories(tmp_path, monkeypatch):
  # TFDS's bucket lookup at construction made an empty tmp*tfds directory per builder and left it behind.
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  b = _synth_builder(tmp_path / "data")
  again = tb.MerSynth(config=tb.MerSynthConfig(name="tiny", synth=SYNTH), data_dir=str(tmp_path / "data"))
  assert len(tb.TfdsSource(again, "train")) == len(tb.TfdsSource(b, "train")) == 24
  assert sorted(p.name for p in scratch.iterdir()) == []


def test_stale_synth_config_is_refused(tmp_path):
  _synth_builder(tmp_path)
  other = tb.MerSynth(config=tb.MerSynthConfig(name="tiny", synth=synth.SynthConfig(n_train=25, n_validation=6,
                                                                                     n_test=6)),
                      data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="n_train': 24"):
    tb.prepare(other)


def test_synth_versions_are_told_apart_and_data_prepared_before_versions_reads_as_version_1(tmp_path):
  import dataclasses
  import json
  b = _synth_builder(tmp_path)
  v2 = tb.MerSynth(config=tb.MerSynthConfig(name="tiny", synth=dataclasses.replace(SYNTH, version=2)),
                   data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="'version': 1"):
    tb.prepare(v2)
  # Metadata written before SynthConfig had a version: the same knobs without it still load as version 1.
  meta = b.data_path / "metadata.json"
  old = json.loads(meta.read_text())
  del old["synth_config"]["version"]
  meta.write_text(json.dumps(old))
  again = tb.MerSynth(config=tb.MerSynthConfig(name="tiny", synth=SYNTH), data_dir=str(tmp_path))
  tb.prepare(again)
  assert len(tb.TfdsSource(again, "train")) == 24


def _corrupt(path, how):
  data = bytearray(path.read_bytes())
  if how == "truncate":
    path.write_bytes(bytes(data[: len(data) // 2]))
  else:  # flip bytes inside the first chunk: its header hash no longer matches
    data[40:80] = bytes(b ^ 0xFF for b in data[40:80])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,match", [("truncate", "truncated"), ("flip", "unreadable ArrayRecord")])
def test_corrupt_array_record_file(tmp_path, tok, how, match):
  b = _synth_builder(tmp_path)
  (path,) = (tmp_path / "mer_synth" / "tiny" / "1.0.0").glob("mer_synth-train.array_record-*")
  _corrupt(path, how)
  src = tb.TfdsSource(b, "train")
  with pytest.raises(schema.BadRecordError, match=match) as e:
    [src.read(i) for i in range(len(src))]
  assert path.name in str(e.value)
  # Under "raise" the pipeline fails naming the file; under "skip" every unreadable record is counted.
  cfg = pipeline.PipelineConfig(kind="rl", batch_size=4, num_epochs=1)
  with pytest.raises(schema.BadRecordError, match=path.name):
    list(pipeline.build(src, tok, cfg))
  p = pipeline.build(src, tok, pipeline.PipelineConfig(kind="rl", batch_size=4, num_epochs=1,
                                                       on_bad_record="skip"))
  unreadable = 0
  for i in range(len(src)):
    try:
      src.read(i)
    except schema.BadRecordError:
      unreadable += 1
  assert unreadable >= 1 and p.bad.count == unreadable and p.n_examples == len(src) - unreadable


def _write_rec(path, rec):
  path.write_bytes(schema.to_bytes(rec))


def test_mer_features_builder_and_skipped_bad_file(tmp_path):
  recs = list(synth.generate_split(SYNTH, "test"))
  for split, chunk in (("train", recs[:4]), ("test", recs[4:])):
    (tmp_path / "recs" / split).mkdir(parents=True)
    for r in chunk:
      _write_rec(tmp_path / "recs" / split / f"{r.id}.rec", r)
  bad_path = tmp_path / "recs" / "train" / "zz-bad.rec"
  bad_path.write_bytes(schema.to_bytes(recs[0])[:-7])  # truncated msgpack
  with pytest.raises(schema.BadRecordError, match="zz-bad.rec"):
    tb.prepare(tb.MerFeatures(records_dir=tmp_path / "recs", data_dir=str(tmp_path / "d1")))
  b = tb.MerFeatures(records_dir=tmp_path / "recs", data_dir=str(tmp_path / "d2"), on_bad_record="skip")
  tb.prepare(b)
  assert b.bad.count == 1
  reloaded = tb.MerFeatures(records_dir=tmp_path / "recs", data_dir=str(tmp_path / "d2"))
  assert reloaded.info.metadata["bad_records"]["count"] == 1  # the skip survives in the dataset's metadata
  src = tb.TfdsSource(reloaded, "train")
  assert sorted(schema.from_bytes(src.read(i)).id for i in range(len(src))) == [r.id for r in recs[:4]]
  assert len(tb.TfdsSource(reloaded, "test")) == 2


def _ovmerd_manual_dir(root, n=4, with_features=True):
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  names = [f"sample_{i:03d}" for i in range(n)]
  with open(root / "label.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "openset"])
    for i, name in enumerate(names):
      w.writerow([name, "[happy, relieved]" if i % 2 else "['Sad', \"worried\"]"])
  with open(root / "subtitle_chieng.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "chinese", "english"])
    for name in names:
      w.writerow([name, "", f"line of {name}"])
  if with_features:
    (root / "features").mkdir()
    for name in names:
      np.savez(root / "features" / f"{name}.npz", video=rng.standard_normal((3, 8)).astype(np.float32),
               audio=rng.standard_normal((5, 4)).astype(np.float32))
  return names


def test_mer_manual_builds_labels_features_and_subtitles(tmp_path):
  names = _ovmerd_manual_dir(tmp_path / "manual")
  b = tb.MerManual(config="ovmerd", data_dir=str(tmp_path / "data"))
  tb.prepare(b, manual_dir=tmp_path / "manual")
  src = tb.TfdsSource(b, "test")
  recs = {r.id: r for r in (schema.from_bytes(src.read(i)) for i in range(len(src)))}
  assert sorted(recs) == names
  r1 = recs["sample_001"]
  assert r1.openset == ("happy", "relieved") and recs["sample_000"].openset == ("sad", "worried")
  assert r1.subtitle == "line of sample_001" and r1.dataset == "ovmerd"
  with np.load(tmp_path / "manual" / "features" / "sample_001.npz") as z:
    np.testing.assert_array_equal(r1.video, z["video"].astype(np.float16))
    np.testing.assert_array_equal(r1.audio, z["audio"].astype(np.float16))


def test_mer_manual_missing_files(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "unrelated.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"missing manual_dir file .*label-6way\.npz"):
    tb.prepare(tb.MerManual(config="mer2023", data_dir=str(tmp_path / "data")), manual_dir=tmp_path / "manual")
  # A missing per-clip feature file: an error naming it, or a counted skip.
  _ovmerd_manual_dir(tmp_path / "m2")
  os.remove(tmp_path / "m2" / "features" / "sample_002.npz")
  with pytest.raises(schema.BadRecordError, match="sample_002.npz"):
    tb.prepare(tb.MerManual(config="ovmerd", data_dir=str(tmp_path / "d1")), manual_dir=tmp_path / "m2")
  b = tb.MerManual(config="ovmerd", data_dir=str(tmp_path / "d2"), on_bad_record="skip")
  tb.prepare(b, manual_dir=tmp_path / "m2")
  assert b.bad.count == 1 and b.info.splits["test"].num_examples == 3


def test_mer_manual_onehot_npz(tmp_path):
  (tmp_path / "manual").mkdir()
  np.savez(tmp_path / "manual" / "label.npz", name=np.array(["a", "b", "c"]), label=np.array([1, 6, 3]))
  b = tb.MerManual(config="meld", data_dir=str(tmp_path / "data"))
  tb.prepare(b, manual_dir=tmp_path / "manual")
  src = tb.TfdsSource(b, "test")
  got = {r.id: r.onehot for r in (schema.from_bytes(src.read(i)) for i in range(len(src)))}
  assert got == {"a": "joy", "b": "surprise", "c": "neutral"}  # MELD order: anger joy sadness neutral ...


def _records(builder, split="test"):
  src = tb.TfdsSource(builder, split)
  return {r.id: r for r in (schema.from_bytes(src.read(i)) for i in range(len(src)))}


@pytest.mark.parametrize("layout", ["prefixed", "plain"])
def test_mer2023_builds_from_the_documented_safe_layout(tmp_path, layout):
  # docs/data.md's conversion writes every MERTools corpus as `{corpus}_name`, `{corpus}_emo`, `{corpus}_val`;
  # the builder's test split is `test1_corpus`. A file converted for that corpus alone may use plain arrays.
  (tmp_path / "manual").mkdir()
  test1 = {"name": np.array(["s2", "s1"]), "emo": np.array(["worried", "happy"]), "val": np.array([-1.0, 2.0])}
  train = {"name": np.array(["t1"]), "emo": np.array(["sad"]), "val": np.array([-2.0])}
  arrays = ({f"{c}_{k}": v for c, d in (("train_corpus", train), ("test1_corpus", test1)) for k, v in d.items()}
            if layout == "prefixed" else test1)
  np.savez(tmp_path / "manual" / "label-6way.npz", **arrays)
  b = tb.MerManual(config="mer2023", data_dir=str(tmp_path / "data"))
  tb.prepare(b, manual_dir=tmp_path / "manual")
  recs = _records(b)
  assert {k: (r.onehot, r.openset, r.valence, r.dataset) for k, r in recs.items()} == {
      "s1": ("happy", ("happy",), 2.0, "mer2023"), "s2": ("worried", ("worried",), -1.0, "mer2023")}


def test_mer2023_pickled_original_is_refused_with_the_conversion_hint(tmp_path):
  (tmp_path / "manual").mkdir()
  corpus = np.empty((), object)
  corpus[()] = {"s1": {"emo": "happy", "val": 1.0}}
  np.savez(tmp_path / "manual" / "label-6way.npz", test1_corpus=corpus)
  with pytest.raises(schema.BadRecordError, match="pickled.*`{corpus}_name`.*docs/data.md") as e:
    tb.prepare(tb.MerManual(config="mer2023", data_dir=str(tmp_path / "data")), manual_dir=tmp_path / "manual")
  assert "label-6way.npz" in str(e.value)


def test_duplicate_clip_ids_across_files_are_bad_records_not_a_tfds_crash(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name, rows in (("track2_train_a.csv", [["c1", "[happy]"], ["c2", "[sad]"]]),
                     ("track2_train_b.csv", [["c3", "[angry]"], ["c2", "[worried]"]])):
    with open(manual / name, "w", newline="") as f:
      csv.writer(f).writerows([["name", "openset"]] + rows)
  with pytest.raises(schema.BadRecordError, match=r"duplicate clip id 'c2'; first seen in .*track2_train_a\.csv") as e:
    tb.prepare(tb.MerManual(config="mer2025_track2", data_dir=str(tmp_path / "d1")), manual_dir=manual)
  assert "track2_train_b.csv" in str(e.value)
  b = tb.MerManual(config="mer2025_track2", data_dir=str(tmp_path / "d2"), on_bad_record="skip")
  tb.prepare(b, manual_dir=manual)
  assert b.bad.count == 1 and b.info.metadata["bad_records"]["by_field"] == {"id": 1}
  assert {k: r.openset for k, r in _records(b, "train").items()} == {"c1": ("happy",), "c2": ("sad",),
                                                                      "c3": ("angry",)}
  # The same for preprocessed records: two .rec files holding one clip id.
  rec = synth.generate_clip(SYNTH, "test", 0)
  (tmp_path / "recs" / "test").mkdir(parents=True)
  for name in ("a.rec", "b.rec"):
    _write_rec(tmp_path / "recs" / "test" / name, rec)
  with pytest.raises(schema.BadRecordError, match=r"duplicate clip id .*first seen in .*a\.rec") as e:
    tb.prepare(tb.MerFeatures(records_dir=tmp_path / "recs", data_dir=str(tmp_path / "d3")))
  assert "b.rec" in str(e.value)


def test_features_beyond_float16_name_the_feature_file(tmp_path):
  _ovmerd_manual_dir(tmp_path / "manual", n=3)
  path = tmp_path / "manual" / "features" / "sample_001.npz"
  np.savez(path, video=np.full((3, 8), 1.0e5, np.float32), audio=np.ones((5, 4), np.float32))
  with pytest.raises(schema.BadRecordError, match="float16 range") as e:
    tb.prepare(tb.MerManual(config="ovmerd", data_dir=str(tmp_path / "d1")), manual_dir=tmp_path / "manual")
  assert e.value.source == str(path) and e.value.record == "sample_001" and e.value.field == "video"
  b = tb.MerManual(config="ovmerd", data_dir=str(tmp_path / "d2"), on_bad_record="skip")
  tb.prepare(b, manual_dir=tmp_path / "manual")
  assert b.bad.count == 1 and sorted(_records(b)) == ["sample_000", "sample_002"]


def test_the_run_names_prepared_synth_data_after_its_version(tmp_path):
  from merr1_jax import config as cfglib
  from merr1_jax.training import setup as run_setup
  c = cfglib.load("configs/base.py")
  v1 = run_setup._builder(c, str(tmp_path)).builder_config
  assert v1.name == "s0_n640_64_128_noise1p0" and v1.synth.version == 1  # the name data prepared before had
  c.data.synth_version = 2
  v2 = run_setup._builder(c, str(tmp_path)).builder_config
  assert v2.name == v1.name + "_v2" and v2.synth.version == 2
