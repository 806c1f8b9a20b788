"""A prepared dataset follows its sources: rebuilt when the `.rec` files change, bad records named by source file."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from merr1_jax import config as cfglib
from merr1_jax.data import fingerprint, pipeline, schema, synth
from merr1_jax.data import tfds_builders as tb
from merr1_jax.training import setup as run_setup

SYNTH = synth.SynthConfig(n_train=8, n_validation=2, n_test=4)


@pytest.fixture(scope="module")
def tok():
  return synth.build_tokenizer(SYNTH, vocab_size=512)


def _write(root, split, rec):
  path = root / split / f"{rec.id}.rec"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(schema.to_bytes(rec))
  return path


def _records_dir(root):
  """records/{train,test}/*.rec from MER-Synth clips (closed labels: synth.EMOTIONS)."""
  for split in ("train", "test"):
    for rec in synth.generate_split(SYNTH, split):
      _write(root, split, rec)
  return root


def _config(records_dir):
  c = cfglib.load("configs/base.py")
  c.data.name = "mer_features"
  c.data.records_dir = str(records_dir)
  return c


def _open(c, workdir):
  """The trainer's and the evaluate CLI's way in: run_setup.open_data (prepares W/data if needed)."""
  return run_setup.open_data(c, workdir, None, None)


def _labels(source):
  return {r.id: r.openset for r in (schema.from_bytes(source.read(i)) for i in range(len(source)))}


def _eval_cfg():
  return pipeline.PipelineConfig(kind="eval", batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False,
                                 label_vocab=synth.EMOTIONS, video_dim=SYNTH.video_dim, audio_dim=SYNTH.audio_dim)


def _relabel(rec):
  other = next(e for e in synth.EMOTIONS if e not in rec.openset)
  return dataclasses.replace(rec, openset=(other,), onehot=other)


def test_relabelled_records_are_read_after_reopening_not_the_stale_copy(tmp_path, caplog):
  recs = _records_dir(tmp_path / "recs")
  c = _config(recs)
  before = _labels(_open(c, tmp_path / "w").sources["test"])
  want = {}
  for rec in synth.generate_split(SYNTH, "test"):  # relabel every test record
    new = _relabel(rec)
    _write(recs, "test", new)
    want[rec.id] = new.openset
  assert before != want
  with caplog.at_level(logging.WARNING):
    data = _open(c, tmp_path / "w")
  assert _labels(data.sources["test"]) == want
  assert _labels(data.sources["train"]) == {r.id: r.openset for r in synth.generate_split(SYNTH, "train")}
  line = next(r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage())
  assert "4 changed" in line and "test/mer_synth-test-000000.rec" in line and str(recs) in line


def _nan_audio(rec):
  audio = rec.audio.copy()
  audio[1, 3] = np.nan  # a record that decodes but fails the content check when the pipeline reads it
  return dataclasses.replace(rec, audio=audio)


def test_bad_record_error_names_the_source_rec_file_and_record(tmp_path, tok):
  recs = _records_dir(tmp_path / "recs")
  good = synth.generate_clip(SYNTH, "test", 2)
  bad_path = _write(recs, "test", _nan_audio(good))
  data = _open(_config(recs), tmp_path / "w")
  for policy in ("raise", "skip"):
    cfg = dataclasses.replace(_eval_cfg(), on_bad_record=policy)
    if policy == "raise":
      with pytest.raises(schema.BadRecordError, match="non-finite") as e:
        list(pipeline.build(data.sources["test"], tok, cfg))
      err = e.value
    else:  # the skip is counted as before, and its message names the same file
      p = pipeline.build(data.sources["test"], tok, cfg)
      assert p.bad.count == 1 and p.n_examples == SYNTH.n_test - 1
      err = p.bad.examples[0]
    assert str(bad_path) in str(err)  # the file to fix, not (only) the ArrayRecord copy in W/data
    assert "prepared copy" in str(err) and "mer_features-test.array_record" in str(err)
  assert e.value.record == good.id and e.value.field == "audio"
  assert e.value.source.startswith(f"{bad_path} (prepared copy: {tmp_path / 'w' / 'data'}")


def test_fixing_the_bad_record_rebuilds_the_copy_and_the_error_is_gone(tmp_path, tok):
  recs = _records_dir(tmp_path / "recs")
  good = synth.generate_clip(SYNTH, "test", 2)
  _write(recs, "test", _nan_audio(good))
  c = _config(recs)
  with pytest.raises(schema.BadRecordError, match="non-finite"):
    list(pipeline.build(_open(c, tmp_path / "w").sources["test"], tok, _eval_cfg()))
  _write(recs, "test", good)  # the user fixes the record: the next run rebuilds the copy
  batches = list(pipeline.build(_open(c, tmp_path / "w").sources["test"], tok, _eval_cfg()))
  assert sorted(i for b in batches for i, m in zip(b["ids"], b["example_mask"]) if m) == [
      r.id for r in synth.generate_split(SYNTH, "test")]


# ---------------------------------------------------------------------------------- the builder itself


def _builder(tmp_path, **kw):
  return tb.MerFeatures(records_dir=tmp_path / "recs", data_dir=str(tmp_path / "data"), **kw)


def _copy_files(b):
  """{file name: inode} of the prepared copy: new inodes mean it was rebuilt."""
  return {p.name: os.stat(p).st_ino for p in b.data_path.iterdir()}


def _age_fingerprint(b):
  """Moves the recorded fingerprint time past the files' times, as if they had been written long before."""
  meta_path = b.data_path / "metadata.json"
  meta = json.loads(meta_path.read_text())
  meta["fingerprint"]["taken_ns"] += 10 * fingerprint.RACY_NS
  meta_path.write_text(json.dumps(meta))


def test_unchanged_records_are_reused_unread_and_a_same_size_rewrite_is_caught_by_its_hash(tmp_path, monkeypatch):
  recs = _records_dir(tmp_path / "recs")
  b = _builder(tmp_path)
  tb.prepare(b)
  _age_fingerprint(b)
  before = _copy_files(b)
  hashed = []
  real = fingerprint.sha256
  monkeypatch.setattr(fingerprint, "sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
  b = _builder(tmp_path)
  tb.prepare(b)
  assert hashed == [] and _copy_files(b) == before  # same size and times: not read, not rebuilt
  # Rewritten with the same bytes: its ctime moves, so it is hashed; the hash matches, so nothing is rebuilt.
  rec = synth.generate_clip(SYNTH, "test", 1)
  _write(recs, "test", rec)
  b = _builder(tmp_path)
  tb.prepare(b)
  assert hashed == [f"{rec.id}.rec"] and _copy_files(b) == before
  # The same size, other bytes (a label of the same length): only the hash can tell, and it does.
  word = next(e for e in synth.EMOTIONS if len(e) == len(rec.openset[0]) and e not in rec.openset)
  relabelled = dataclasses.replace(rec, openset=(word,) + rec.openset[1:])
  assert len(schema.to_bytes(relabelled)) == len(schema.to_bytes(rec))
  _write(recs, "test", relabelled)
  b = _builder(tmp_path)
  tb.prepare(b)
  assert _copy_files(b).keys() == before.keys() and _copy_files(b) != before
  assert _labels(tb.TfdsSource(b, "test"))[rec.id] == relabelled.openset


def test_added_and_removed_records_are_named_and_rebuilt(tmp_path, caplog):
  recs = _records_dir(tmp_path / "recs")
  b = _builder(tmp_path)
  tb.prepare(b)
  os.remove(recs / "test" / "mer_synth-test-000003.rec")
  extra = dataclasses.replace(synth.generate_clip(SYNTH, "test", 3), id="extra-clip")
  _write(recs, "test", extra)
  with caplog.at_level(logging.WARNING):
    tb.prepare(b)  # the same builder object: it reads the rebuilt copy afterwards
  (line,) = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
  assert "1 added (test/extra-clip.rec)" in line and "1 removed (test/mer_synth-test-000003.rec)" in line
  assert "changed (" not in line
  assert sorted(_labels(tb.TfdsSource(b, "test"))) == sorted(
      ["extra-clip"] + [f"mer_synth-test-00000{i}" for i in range(3)])
  assert b.info.metadata["sources"]["splits"]["test"]["extra-clip"] == "test/extra-clip.rec"


def test_a_failed_rebuild_keeps_the_old_copy(tmp_path):
  recs = _records_dir(tmp_path / "recs")
  b = _builder(tmp_path)
  tb.prepare(b)
  before, labels = _copy_files(b), _labels(tb.TfdsSource(b, "test"))
  broken = recs / "test" / "mer_synth-test-000001.rec"
  broken.write_bytes(broken.read_bytes()[:-7])  # truncated msgpack: the rebuild fails on it
  b = _builder(tmp_path)
  with pytest.raises(schema.BadRecordError, match="not a msgpack record") as e:
    tb.prepare(b)
  assert e.value.source == str(broken) and e.value.record == 0
  assert _copy_files(b) == before and _labels(tb.TfdsSource(b, "test")) == labels
  assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no staging folder left


def test_data_prepared_before_fingerprints_is_rebuilt_once(tmp_path, caplog):
  _records_dir(tmp_path / "recs")
  b = _builder(tmp_path)
  tb.prepare(b)
  meta_path = b.data_path / "metadata.json"
  meta = json.loads(meta_path.read_text())
  del meta["fingerprint"], meta["sources"]  # what the builders wrote before they recorded their sources
  meta_path.write_text(json.dumps(meta))
  old = _copy_files(b)
  order = [list(_labels(tb.TfdsSource(b, s))) for s in ("train", "test")]
  b = _builder(tmp_path)
  with caplog.at_level(logging.WARNING):
    tb.prepare(b)
  assert any("prepared before datasets recorded what they were built from" in r.getMessage()
             for r in caplog.records)
  assert set(b.info.metadata["fingerprint"]["files"]) == {
      f"{s}/{r.id}.rec" for s in ("train", "test") for r in synth.generate_split(SYNTH, s)}
  rebuilt = _copy_files(b)
  assert rebuilt != old
  # The same records in the same order (TFDS orders by clip id), so a run resumed mid-epoch reads on unchanged.
  assert [list(_labels(tb.TfdsSource(b, s))) for s in ("train", "test")] == order
  tb.prepare(_builder(tmp_path))
  assert _copy_files(b) == rebuilt  # once


def test_a_copy_built_skipping_bad_records_is_rebuilt_under_raise(tmp_path):
  recs = _records_dir(tmp_path / "recs")
  bad = recs / "train" / "zz-bad.rec"
  bad.write_bytes(b"not a record")
  b = _builder(tmp_path, on_bad_record="skip")
  tb.prepare(b)
  assert b.bad.count == 1
  tb.prepare(_builder(tmp_path, on_bad_record="skip"))  # the same policy: reused
  with pytest.raises(schema.BadRecordError, match="zz-bad.rec"):
    tb.prepare(_builder(tmp_path))  # 'raise' no longer accepts the copy that left it out


def test_mer_synth_without_recorded_settings_is_rebuilt_and_other_settings_name_the_fields(tmp_path):
  b = tb.MerSynth(config=tb.MerSynthConfig(name="tiny", synth=SYNTH), data_dir=str(tmp_path))
  tb.prepare(b)
  meta_path = b.data_path / "metadata.json"
  meta = json.loads(meta_path.read_text())
  del meta["synth_config"]
  meta_path.write_text(json.dumps(meta))
  b = tb.MerSynth(config=tb.MerSynthConfig(name="tiny", synth=SYNTH), data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="records no MER-Synth generator settings"):
    tb.TfdsSource(b, "test")  # read without preparing: refused, never read unverified
  tb.prepare(b)
  assert b.info.metadata["synth_config"] == dataclasses.asdict(SYNTH)
  src = tb.TfdsSource(b, "test")
  assert {schema.from_bytes(src.read(i)).id: src.read(i) for i in range(len(src))} == {
      r.id: schema.to_bytes(r) for r in synth.generate_split(SYNTH, "test")}
  other = dataclasses.replace(SYNTH, p_sarcasm=0.5)
  with pytest.raises(ValueError, match=r"\(p_sarcasm 0\.3 -> 0\.5; built with"):
    tb.prepare(tb.MerSynth(config=tb.MerSynthConfig(name="tiny", synth=other), data_dir=str(tmp_path)))


def test_mer_manual_follows_its_label_file_and_names_it(tmp_path, tok, caplog):
  manual = tmp_path / "manual"
  (manual / "features").mkdir(parents=True)
  for name in ("c1", "c2"):
    np.savez(manual / "features" / f"{name}.npz", video=np.ones((3, 4), np.float32), audio=np.ones((5, 4), np.float32))
  (manual / "label.csv").write_text("name,openset\nc1,[happy]\nc2,[sad]\n")
  b = tb.MerManual(config="ovmerd", data_dir=str(tmp_path / "data"))
  tb.prepare(b, manual_dir=manual)
  assert _labels(tb.TfdsSource(b, "test")) == {"c1": ("happy",), "c2": ("sad",)}
  (manual / "label.csv").write_text("name,openset\nc1,[angry]\nc2,[qwertyuiop]\n")
  with caplog.at_level(logging.WARNING):
    tb.prepare(b, manual_dir=manual)
  assert any("label.csv" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
  src = tb.TfdsSource(b, "test")
  assert _labels(src) == {"c1": ("angry",), "c2": ("qwertyuiop",)}
  # A label-only record whose words map to no emotion: the error names the label file to fix.
  cfg = pipeline.PipelineConfig(kind="eval", batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False,
                                video_dim=4, audio_dim=4)
  with pytest.raises(schema.BadRecordError, match="no label word maps") as e:
    list(pipeline.build(src, tok, cfg))
  assert e.value.record == "c2" and e.value.source.startswith(f"{manual / 'label.csv'} (prepared copy: ")
  # Without manual_dir (the evaluate CLI opens prepared sets that way) the copy is used as built.
  with caplog.at_level(logging.WARNING):
    tb.prepare(b)
  assert any("cannot be checked" in r.getMessage() for r in caplog.records)
  assert _labels(tb.TfdsSource(b, "test")) == {"c1": ("angry",), "c2": ("qwertyuiop",)}
