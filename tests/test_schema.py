"""ClipRecord serialisation and the bad-record checks (issue 6: schema round trip and bad input)."""

import logging

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import ml_dtypes
import msgpack
import numpy as np
import pytest

from merr1_jax.data import schema


def _record(**kw):
  rng = np.random.default_rng(0)
  base = dict(id="clip-7", dataset="toy", video=rng.standard_normal((5, 8)).astype(np.float16),
              audio=rng.standard_normal((3, 4)).astype(np.float16), subtitle="Oh no, not again.",
              openset=("sad", "angry"), feature_space="raw")
  base.update(kw)
  return schema.ClipRecord(**base)


# Arbitrary bit patterns (NaN payloads included) viewed as each feature dtype: the bytes must survive exactly.
_FEATURE = st.sampled_from([(np.uint16, np.float16), (np.uint16, ml_dtypes.bfloat16), (np.uint32, np.float32)]
                           ).flatmap(lambda dts: hnp.arrays(dts[0], hnp.array_shapes(
                               min_dims=2, max_dims=2, min_side=0, max_side=6)).map(lambda a: a.view(dts[1])))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(video=_FEATURE, audio=_FEATURE, subtitle=st.text(max_size=40),
                  openset=st.lists(st.text(max_size=8), max_size=4), onehot=st.none() | st.text(max_size=6),
                  valence=st.none() | st.floats(allow_nan=False), with_pos=st.booleans(),
                  media_layout=st.none() | st.text(max_size=12))
def test_round_trip_is_exact(video, audio, subtitle, openset, onehot, valence, with_pos, media_layout):
  pos = np.arange(3 * 5, dtype=np.int32).reshape(3, 5) if with_pos else None
  rec = _record(video=video, audio=audio, subtitle=subtitle, openset=openset, onehot=onehot, valence=valence,
                position_ids=pos, demo_slow="<think>x</think><answer>sad</answer>", media_layout=media_layout)
  data = schema.to_bytes(rec)
  back = schema.from_bytes(data, source="mem")
  assert schema.records_equal(rec, back)
  assert back.video.dtype == video.dtype and back.audio.shape == audio.shape
  assert schema.to_bytes(back) == data  # stable bytes: a second pass changes nothing


def test_bytes_are_plain_msgpack_with_version_and_raw_arrays():
  rec = _record(position_ids=np.zeros((3, 2), np.int32))
  obj = msgpack.unpackb(schema.to_bytes(rec), raw=False)  # an independent reader: plain msgpack, no pickle
  assert obj["v"] == schema.SCHEMA_VERSION
  assert obj["video"]["dtype"] == "float16" and obj["video"]["shape"] == [5, 8]
  assert obj["video"]["data"] == rec.video.astype("<f2").tobytes()
  assert obj["openset"] == ["sad", "angry"]
  assert obj["demo_fast"] is None


def test_records_equal_detects_a_changed_value():
  rec = _record()
  video = rec.video.copy()
  video[0, 0] += 1
  assert not schema.records_equal(rec, _record(video=video))
  assert not schema.records_equal(rec, _record(openset=("sad",)))
  assert schema.records_equal(rec, _record())


def _tamper(rec, **changes):
  obj = msgpack.unpackb(schema.to_bytes(rec), raw=False)
  obj.update(changes)
  return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("make_bytes, field, fragment", [
    (lambda r: schema.to_bytes(r)[:-5], "<bytes>", "not a msgpack record"),
    (lambda r: b"\x93garbage", "<bytes>", "not a msgpack record"),
    (lambda r: msgpack.packb([1, 2]), "<bytes>", "not a map"),
    (lambda r: _tamper(r, v=99), "v", "schema version 99"),
    (lambda r: _tamper(r, extra=1), "extra", "unknown fields"),
    (lambda r: _tamper(r, subtitle=None), "subtitle", "expected a string"),
    (lambda r: _tamper(r, openset="sad"), "openset", "list of strings"),
    (lambda r: _tamper(r, valence="high"), "valence", "number or nil"),
    (lambda r: _tamper(r, video={"dtype": "object", "shape": [1], "data": b"x"}), "video", "not allowed"),
    (lambda r: _tamper(r, audio={"dtype": "float16", "shape": [3, 4], "data": b"\0" * 5}), "audio",
     "5 data bytes"),
    (lambda r: _tamper(r, audio=None), "audio", "missing"),
    (lambda r: _tamper(r, media_layout=58), "media_layout", "string or nil"),
])
def test_corrupt_bytes_name_source_record_and_field(make_bytes, field, fragment):
  with pytest.raises(schema.BadRecordError) as info:
    schema.from_bytes(make_bytes(_record()), source="shard-00003.array_record", index=41)
  err = info.value
  assert err.field == field and fragment in err.reason
  assert "shard-00003.array_record" in str(err)
  # Once the id could be read, the message names it; before that, the index.
  assert err.record == ("clip-7" if field != "<bytes>" else 41)


def _check(rec, **kw):
  kw = dict(video_dim=8, audio_dim=4, max_subtitle_chars=200, source="train.ar") | kw
  schema.check(rec, **kw)


def test_good_record_passes_check():
  _check(_record())
  _check(_record(video=np.zeros((0, 8), np.float16)))  # no frames is allowed (audio-only clip)


@pytest.mark.parametrize("rec, field, fragment", [
    (_record(video=np.array([[0, np.nan] * 4], np.float16)), "video", "NaN/Inf"),
    (_record(audio=np.array([[1, 2, 3, np.inf]], np.float16)), "audio", "NaN/Inf"),
    (_record(video=np.zeros((2, 9), np.float16)), "video", "differs from the configured 8"),
    (_record(audio=np.zeros((2, 5), np.float16)), "audio", "differs from the configured 4"),
    (_record(video=np.zeros((2, 2, 2), np.float16)), "video", "2-D"),
    (_record(audio=np.zeros((0, 4), np.float16)), "audio", "no audio rows"),
    (_record(video=np.zeros((2, 8), np.int32)), "video", "dtype"),
    (_record(openset=()), "openset", "empty label list"),
    (_record(openset=(" ", "")), "openset", "empty label list"),
    (_record(subtitle="x" * 100_000), "subtitle", "100000 characters"),
    (_record(feature_space="pixels"), "feature_space", "not one of"),
    (_record(position_ids=np.zeros((2, 5), np.int32)), "position_ids", "[3, L] int32"),
    (_record(valence=float("nan")), "valence", "non-finite"),
    # media_layout: the record has 5 video and 3 audio rows.
    (_record(media_layout=""), "media_layout", "not a placeholder runs string"),
    (_record(media_layout="V5A3\n"), "media_layout", "not a placeholder runs string"),
    (_record(media_layout="V5 A3"), "media_layout", "not a placeholder runs string"),
    (_record(media_layout="v5a3"), "media_layout", "not a placeholder runs string"),
    (_record(media_layout="V5X3"), "media_layout", "not a placeholder runs string"),
    (_record(media_layout="VA3"), "media_layout", "not a placeholder runs string"),
    (_record(media_layout="V2A1V2A2"), "media_layout", "4 video and 3 audio placeholders"),
    (_record(media_layout="V5A2"), "media_layout", "5 video and 2 audio placeholders"),
    (_record(media_layout="A3V5A1"), "media_layout", "5 video and 4 audio placeholders"),
])
def test_check_rejects_bad_content(rec, field, fragment):
  with pytest.raises(schema.BadRecordError) as info:
    _check(rec)
  assert info.value.field == field and fragment in info.value.reason
  assert "clip-7" in str(info.value) and "train.ar" in str(info.value)


def test_label_list_that_maps_to_nothing_through_the_emotion_wheels():
  emotion = pytest.importorskip("merr1_jax.emotion")
  wheel = emotion.load("2025")
  maps = lambda w: any(wheel.map_word(w, k) is not None for k in range(1, emotion.NUM_WHEELS + 1))  # noqa: E731
  _check(_record(openset=("sad", "qwertyuiop")), maps_word=maps)  # one mappable word is enough
  with pytest.raises(schema.BadRecordError, match="no label word maps") as info:
    _check(_record(openset=("neutral", "qwertyuiop")), maps_word=maps)  # neutral is dropped everywhere
  assert info.value.field == "openset"


def test_read_record_policy_raise_and_counted_skip(caplog):
  good = schema.to_bytes(_record())
  long_sub = schema.to_bytes(_record(id="long", subtitle="a" * 100_000))
  nan = schema.to_bytes(_record(id="nan", video=np.full((2, 8), np.nan, np.float16)))
  kw = dict(source="f.ar", video_dim=8, audio_dim=4, max_subtitle_chars=4096)
  with pytest.raises(schema.BadRecordError, match="long"):
    schema.read_record(long_sub, index=1, on_bad_record="raise", **kw)
  log = schema.BadRecordLog()
  with caplog.at_level(logging.WARNING, logger=schema.__name__):
    out = [schema.read_record(b, index=i, on_bad_record="skip", log=log, **kw)
           for i, b in enumerate([good, long_sub, nan, good[:10]])]
  assert out[0] is not None and schema.records_equal(out[0], _record())
  assert out[1:] == [None, None, None]
  assert log.count == 3 and dict(log.by_field) == {"subtitle": 1, "video": 1, "<bytes>": 1}
  assert "3 bad records skipped" in log.summary()
  assert sum("skipping" in r.getMessage() for r in caplog.records) == 3  # each skip is logged
  assert any("index 3" in m or "record 3" in m for m in log.examples)


def test_read_record_rejects_bad_policies():
  data = schema.to_bytes(_record())
  with pytest.raises(ValueError, match="on_bad_record"):
    schema.read_record(data, source="f", index=0, on_bad_record="ignore")
  with pytest.raises(ValueError, match="BadRecordLog"):
    schema.read_record(data, source="f", index=0, on_bad_record="skip")


def test_sentiment_and_one_hot_records_need_no_open_set():
  """MOSI/MOSEI/SIMS records carry only a valence, MER2023-style ones may carry only a one-hot label."""
  schema.check(_record(openset=(), valence=-0.5), video_dim=8, audio_dim=4)
  schema.check(_record(openset=(), onehot="happy"), video_dim=8, audio_dim=4)
  with pytest.raises(schema.BadRecordError, match="empty label list"):
    schema.check(_record(openset=()), video_dim=8, audio_dim=4)


def test_media_layout_is_optional_on_disk_and_round_trips():
  """Records without a layout keep the version-1 bytes (no key); with one, it is a plain msgpack string."""
  plain = msgpack.unpackb(schema.to_bytes(_record()), raw=False)
  assert "media_layout" not in plain
  assert schema.from_bytes(schema.to_bytes(_record())).media_layout is None
  assert schema.from_bytes(_tamper(_record(), media_layout=None)).media_layout is None  # an explicit nil loads
  rec = _record(media_layout="V2A1V3A2")
  obj = msgpack.unpackb(schema.to_bytes(rec), raw=False)
  assert obj["media_layout"] == "V2A1V3A2" and obj["v"] == schema.SCHEMA_VERSION
  del obj["media_layout"]  # the rest is exactly the layout-free record's map
  assert obj == plain
  back = schema.from_bytes(schema.to_bytes(rec))
  assert back.media_layout == "V2A1V3A2" and schema.records_equal(back, rec)
  assert not schema.records_equal(back, _record())


def test_check_accepts_layouts_that_place_every_row_once():
  for runs in ("V5A3", "A3V5", "V2A1V3A2", "V1V4A3", "V0V5A3"):  # 5 video and 3 audio rows, in any order
    _check(_record(media_layout=runs))
  _check(_record(video=np.zeros((0, 8), np.float16), media_layout="A3"))  # audio only
