"""Label readers (metrics.md §7): safe layouts, the list-string parse, bad rows, duplicate ids, non-UTF-8
text, refused pickles, the float16 range of to_record."""

import csv
import json

import numpy as np
import pytest

from merr1_jax.data import labels, schema


@pytest.mark.parametrize("value,want", [
    ("[happy, relieved]", ["happy", "relieved"]),
    ("['Happy', \"relieved\"]", ["happy", "relieved"]),
    ("[happy, sad].", ["happy", "sad]."]),  # only one leading '[' and one trailing ']' are stripped
    ("[[happy]]", ["[happy]"]),
    ("  Angry  ", ["angry"]),
    ("", []),
    ("[]", []),
    (float("nan"), []),
    (None, []),
    (["Happy ", "", "sad"], ["happy", "sad"]),
])
def test_parse_label_list(value, want):
  assert labels.parse_label_list(value) == want


def _csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


def test_onehot_npz_strings_ints_and_corpora(tmp_path):
  p = tmp_path / "label-6way.npz"
  np.savez(p, test1_corpus_name=np.array(["s1", "s2"]), test1_corpus_emo=np.array(["Happy", "worried"]),
           test1_corpus_val=np.array([1.5, -2.0]))
  got = labels.read_onehot_npz(p, corpus="test1_corpus")
  assert got == [labels.Annotation("s1", ("happy",), "happy", 1.5),
                 labels.Annotation("s2", ("worried",), "worried", -2.0)]
  q = tmp_path / "label.npz"
  np.savez(q, name=np.array(["a", "b"]), label=np.array([0, 2]))
  got = labels.read_onehot_npz(q, classes=labels.ONEHOT_CLASSES["iemocap4"])
  assert [a.onehot for a in got] == ["happy", "neutral"]
  # A `classes` array in the file overrides the default order.
  np.savez(q, name=np.array(["a"]), label=np.array([1]), classes=np.array(["x", "y"]))
  assert labels.read_onehot_npz(q, classes=labels.ONEHOT_CLASSES["meld"])[0].onehot == "y"
  with pytest.raises(schema.BadRecordError, match="no corpus 'test2_corpus'.*`test2_corpus_name`.*`name`") as e:
    labels.read_onehot_npz(p, corpus="test2_corpus")
  assert "test1_corpus" in str(e.value) and str(p) in str(e.value)


def test_onehot_npz_plain_and_prefixed_layouts_resolve_the_same(tmp_path):
  rows = dict(name=np.array(["s1", "s2"]), emo=np.array(["happy", "sad"]), val=np.array([1.0, -1.0]))
  want = [labels.Annotation("s1", ("happy",), "happy", 1.0), labels.Annotation("s2", ("sad",), "sad", -1.0)]
  plain, prefixed, two = tmp_path / "plain.npz", tmp_path / "prefixed.npz", tmp_path / "two.npz"
  np.savez(plain, **rows)
  np.savez(prefixed, **{f"test1_corpus_{k}": v for k, v in rows.items()})
  np.savez(two, **{f"{c}_{k}": v for c in ("train_corpus", "test1_corpus") for k, v in rows.items()})
  for path in (plain, prefixed, two):  # asked for a corpus: its prefixed arrays, or a plain one-corpus file
    assert labels.read_onehot_npz(path, corpus="test1_corpus") == want, path
  for path in (plain, prefixed):  # asked for none: the plain arrays, or the only corpus
    assert labels.read_onehot_npz(path) == want, path
  with pytest.raises(schema.BadRecordError, match=r"corpora present: \['test1_corpus', 'train_corpus'\]"):
    labels.read_onehot_npz(two)
  # A converted dict whose `emo` held integer class ids reads them in the class order.
  ints = tmp_path / "ints.npz"
  np.savez(ints, test_corpus_name=np.array(["m1"]), test_corpus_emo=np.array([1]))
  assert labels.read_onehot_npz(ints, classes=labels.ONEHOT_CLASSES["meld"], corpus="test_corpus")[0].onehot == "joy"


class _Trap:
  """Unpickling this would create a file: the reader must refuse before that can happen."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_pickled_npz_is_refused_without_unpickling(tmp_path):
  trap = tmp_path / "unpickled.txt"
  p = tmp_path / "label-6way.npz"
  corpus = np.empty((), object)
  corpus[()] = {"s1": {"emo": "happy", "val": 1.0}, "trap": _Trap(str(trap))}
  np.savez(p, train_corpus=corpus)
  with pytest.raises(schema.BadRecordError, match="pickled") as e:
    labels.read_onehot_npz(p, corpus="train_corpus")
  assert str(p) in str(e.value)
  assert not trap.exists()


def test_onehot_bad_rows_raise_or_skip(tmp_path):
  p = tmp_path / "label.npz"
  np.savez(p, name=np.array(["a", "b", "c", "d"]), label=np.array([0, 9, 3, -1]))
  with pytest.raises(schema.BadRecordError) as e:
    labels.read_onehot_npz(p, classes=labels.ONEHOT_CLASSES["meld"])
  assert e.value.record == "b" and e.value.field == "label" and str(p) in str(e.value)
  log = schema.BadRecordLog()
  got = labels.read_onehot_npz(p, classes=labels.ONEHOT_CLASSES["meld"], on_bad_record="skip", log=log)
  assert [a.id for a in got] == ["a", "c"] and log.count == 2 and log.by_field["label"] == 2
  with pytest.raises(ValueError, match="BadRecordLog"):
    labels.read_onehot_npz(p, classes=labels.ONEHOT_CLASSES["meld"], on_bad_record="skip")


def test_valence_csv_and_npz(tmp_path):
  p = _csv(tmp_path / "label.csv", ["name", "valence"], [["v1", "0.6"], ["v2", "-1.2"], ["v3", "nan"], ["v4", "x"]])
  log = schema.BadRecordLog()
  got = labels.read_valence(p, on_bad_record="skip", log=log)
  assert [(a.id, a.valence) for a in got] == [("v1", 0.6), ("v2", -1.2)]
  assert log.count == 2 and log.by_field["valence"] == 2
  with pytest.raises(schema.BadRecordError, match="non-finite") as e:
    labels.read_valence(p)
  assert e.value.record == "v3"
  q = tmp_path / "label.npz"
  np.savez(q, name=np.array(["n1"]), val=np.array([-0.25]))
  assert labels.read_valence(q) == [labels.Annotation("n1", valence=-0.25)]
  r = _csv(tmp_path / "noval.csv", ["name", "score"], [["a", "1"]])
  with pytest.raises(schema.BadRecordError, match="no valence column"):
    labels.read_valence(r)


def test_openset_csv_empty_list_is_a_bad_row(tmp_path):
  p = _csv(tmp_path / "track2_train_a.csv", ["name", "openset"],
           [["c1", "[happy, relieved]"], ["c2", "[]"], ["c3", "['angry']"], ["", "[sad]"]])
  with pytest.raises(schema.BadRecordError, match="empty label list") as e:
    labels.read_openset_csv(p)
  assert e.value.record == "c2" and "track2_train_a.csv" in str(e.value)
  log = schema.BadRecordLog()
  got = labels.read_openset_csv(p, on_bad_record="skip", log=log)
  assert [(a.id, a.openset) for a in got] == [("c1", ("happy", "relieved")), ("c3", ("angry",))]
  assert log.count == 2 and dict(log.by_field) == {"openset": 1, "name": 1}
  missing_col = _csv(tmp_path / "x.csv", ["name", "labels"], [["a", "[b]"]])
  with pytest.raises(schema.BadRecordError, match=r"missing columns \['openset'\]"):
    labels.read_openset_csv(missing_col)


def test_subtitles_and_mme_json(tmp_path):
  p = _csv(tmp_path / "subtitle_chieng.csv", ["name", "chinese", "english"], [["a", "", "hi"], ["b", "", ""]])
  assert labels.read_subtitles_csv(p) == {"a": "hi", "b": ""}
  dup = _csv(tmp_path / "dup.csv", ["name", "english"], [["a", "x"], ["a", "y"]])
  with pytest.raises(schema.BadRecordError, match="duplicate"):
    labels.read_subtitles_csv(dup)
  j = tmp_path / "items.json"
  j.write_text(json.dumps([{"video_id": "v1", "label": "Happy", "label_set": ["happy", "sad"]},
                           {"video_id": "v2", "label": "[worried, sad]", "label_set": []},
                           {"video_id": "v3", "label": ""}]))
  log = schema.BadRecordLog()
  got = labels.read_mme_json(j, on_bad_record="skip", log=log)
  assert [(a.id, a.openset) for a in got] == [("v1", ("happy",)), ("v2", ("worried", "sad"))]
  assert log.count == 1
  j.write_text("{not json")
  with pytest.raises(schema.BadRecordError, match="not valid JSON"):
    labels.read_mme_json(j)


def test_duplicate_clip_ids_name_the_file_and_the_id(tmp_path):
  npz = tmp_path / "label.npz"
  np.savez(npz, name=np.array(["a", "b", "a"]), emo=np.array(["happy", "sad", "angry"]))
  csv_path = _csv(tmp_path / "label.csv", ["name", "openset"], [["c1", "[happy]"], ["c2", "[sad]"], ["c1", "[sad]"]])
  val = _csv(tmp_path / "val.csv", ["name", "valence"], [["v1", "0.5"], ["v1", "0.5"]])
  j = tmp_path / "items.json"
  j.write_text(json.dumps([{"video_id": "x", "label": "happy"}, {"video_id": "x", "label": "sad"}]))
  cases = [(lambda **kw: labels.read_onehot_npz(npz, **kw), npz, "a", "name", ["a", "b"]),
           (lambda **kw: labels.read_openset_csv(csv_path, **kw), csv_path, "c1", "name", ["c1", "c2"]),
           (lambda **kw: labels.read_valence(val, **kw), val, "v1", "name", ["v1"]),
           (lambda **kw: labels.read_mme_json(j, **kw), j, "x", "video_id", ["x"])]
  for read, path, dup, field, kept in cases:
    with pytest.raises(schema.BadRecordError, match=f"duplicate clip id '{dup}'") as e:
      read()
    assert str(path) in str(e.value) and e.value.record == dup and e.value.field == field
    log = schema.BadRecordLog()
    assert [a.id for a in read(on_bad_record="skip", log=log)] == kept  # the first one is kept, the second counted
    assert log.count == 1 and log.by_field[field] == 1


@pytest.mark.parametrize("reader,name", [(labels.read_openset_csv, "label.csv"), (labels.read_valence, "v.csv"),
                                         (labels.read_subtitles_csv, "subtitle_chieng.csv"),
                                         (labels.read_mme_json, "items.json")])
def test_non_utf8_text_names_the_file_and_the_byte(tmp_path, reader, name):
  path = tmp_path / name
  if name.endswith(".json"):
    good = '[{"video_id": "v1", "label": "happy"},\n {"video_id": "v2", "label": "sad"}]'
  else:
    header, value = {"label.csv": ("name,openset", "[sad]"), "v.csv": ("name,valence", "0.5"),
                     "subtitle_chieng.csv": ("name,english", "hello")}[name]
    good = f"{header}\nc1,{value}\nc2,{value}\n"
  lines = good.encode().split(b"\n")
  lines[1] = lines[1][:3] + "é".encode("latin-1") + lines[1][3:]  # a Latin-1 byte on line 2: not UTF-8
  data = b"\n".join(lines)
  path.write_bytes(data)
  offset = data.index(b"\xe9")
  for policy in ("raise", "skip"):  # a file-level error: the skip policy cannot leave part of a byte out
    kw = {} if reader is labels.read_subtitles_csv else {"on_bad_record": policy, "log": schema.BadRecordLog()}
    with pytest.raises(schema.BadRecordError, match=f"not UTF-8.*0xe9 at byte offset {offset} \\(line 2\\)") as e:
      reader(path, **kw)
    assert str(path) in str(e.value) and e.value.field == "<encoding>"
  # A UTF-8 BOM (Excel's "CSV UTF-8") is fine.
  path.write_bytes(b"\xef\xbb\xbf" + good.encode())
  assert reader(path)


def test_missing_file_names_the_path(tmp_path):
  for reader in (labels.read_onehot_npz, labels.read_valence, labels.read_openset_csv, labels.read_mme_json,
                 labels.read_subtitles_csv):
    with pytest.raises(FileNotFoundError, match="nope.file"):
      reader(tmp_path / "nope.file")


def test_to_record_round_trips_through_the_schema():
  ann = labels.Annotation("c1", ("happy",), "happy", 0.5, "hello")
  video = np.arange(6, dtype=np.float32).reshape(2, 3)
  rec = labels.to_record(ann, dataset="mer2023", video=video, audio=np.ones((4, 2)))
  back = schema.from_bytes(schema.to_bytes(rec))
  assert schema.records_equal(rec, back) and back.video.dtype == np.float16 and back.n_audio == 4
  np.testing.assert_array_equal(back.video, video)
  label_only = labels.to_record(ann, dataset="mer2023")
  assert label_only.n_audio == 0
  with pytest.raises(schema.BadRecordError, match="no audio rows"):
    schema.check(label_only, video_dim=None, audio_dim=None)


def test_to_record_refuses_values_beyond_float16_instead_of_making_inf():
  import ml_dtypes
  ann = labels.Annotation("c7", ("happy",))
  ok = np.ones((2, 3), np.float32)
  for big in (np.array([[1.0, 7.0e4], [2.0, 3.0]], np.float32),
              np.array([[1.0, 2.0], [-1.0e5, 3.0]]).astype(ml_dtypes.bfloat16)):
    with np.errstate(over="ignore"):
      assert not np.isfinite(big.astype(np.float16)).all()  # what a blind cast would have stored
    with pytest.raises(schema.BadRecordError, match="exceed the float16 range") as e:
      labels.to_record(ann, dataset="d", video=ok, audio=big, source="feats/c7.npz")
    assert (e.value.record, e.value.field, e.value.source) == ("c7", "audio", "feats/c7.npz")
    kept = labels.to_record(ann, dataset="d", video=ok, audio=big, feature_dtype=None)  # keep the dtype
    assert kept.audio.dtype == big.dtype and np.isfinite(kept.audio.astype(np.float32)).all()
    schema.check(kept, video_dim=3, audio_dim=2)
  # At the limit is fine; float16 input is not re-checked; an unknown dtype is a config error.
  edge = labels.to_record(ann, dataset="d", video=ok, audio=np.array([[65504.0, -65504.0]], np.float32))
  assert np.isfinite(edge.audio.astype(np.float32)).all() and edge.audio.dtype == np.float16
  with pytest.raises(ValueError, match="feature_dtype"):
    labels.to_record(ann, dataset="d", video=ok, audio=ok, feature_dtype="int8")
