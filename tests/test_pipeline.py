"""Grain pipelines: batch layout, exact resume (0 and 2 workers), disjoint shards, the bad-record policy."""

import collections
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from merr1_jax.data import pipeline, schema, synth, transforms
from merr1_jax.models import mllm
from merr1_jax.task import prompts

SYNTH = synth.SynthConfig(n_train=48, n_validation=8, n_test=8)


@pytest.fixture(scope="module")
def records():
  return list(synth.generate_split(SYNTH, "train"))


@pytest.fixture(scope="module")
def tok():
  return synth.build_tokenizer(SYNTH, vocab_size=512)


def _cfg(**kw):
  base = dict(kind="rl", batch_size=4, label_vocab=synth.EMOTIONS, video_dim=SYNTH.video_dim,
              audio_dim=SYNTH.audio_dim, seed=3)
  return pipeline.PipelineConfig(**(base | kw))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if x[k].dtype == object:
        assert list(x[k]) == list(y[k]), k
      else:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_rl_batch_layout(records, tok):
  b = next(iter(pipeline.build(pipeline.BytesSource(records), tok, _cfg())))
  by_id = {r.id: r for r in records}
  n_pad = 0
  for i, rid in enumerate(b["ids"]):
    rec = by_id[rid]
    for prefix, mode in (("", "slow"), ("fast_", "fast")):
      toks, mask, pos = b[f"{prefix}prompt_tokens"][i], b[f"{prefix}prompt_mask"][i], b[f"{prefix}positions"][i]
      # Left padding: the prompt ends in the last column, and its tokens are the rendered template's.
      assert mask[-1] and not mask[: len(mask) - mask.sum()].any()
      want = tok.encode(prompts.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, mode))
      assert toks[mask].tolist() == want
      assert (toks[~mask] == tok.pad_id).all()
      np.testing.assert_array_equal(pos[mask], np.arange(mask.sum()))
      assert (toks == tok.id_of(prompts.VIDEO_TOKEN)).sum() == b["video_mask"][i].sum() == rec.n_video
      assert (toks == tok.id_of(prompts.AUDIO_TOKEN)).sum() == b["audio_mask"][i].sum() == rec.n_audio
      n_pad += (~mask).sum()
    np.testing.assert_array_equal(b["video"][i, : rec.n_video], rec.video)
    assert not b["video"][i, rec.n_video:].any()
    assert b["openset"][i] == rec.openset
    assert [synth.EMOTIONS[j] for j in np.flatnonzero(b["label_multihot"][i])] == list(rec.openset)
    assert b["onehot"][i] == rec.onehot and b["valence"][i] == np.float32(rec.valence)
  assert b["prompt_tokens"].shape[1] in _cfg().prompt_buckets and b["example_mask"].all()
  assert n_pad > 0  # the batch really exercised padding


def test_sft_loss_mask_covers_the_completion_only(records, tok):
  p = pipeline.build(pipeline.BytesSource(records), tok, _cfg(kind="sft", batch_size=8))
  assert p.n_examples == 2 * len(records) and p.steps_per_epoch == 2 * len(records) // 8
  b = next(iter(p))
  by_id = {r.id: r for r in records}
  for i in range(8):
    rec, mode = by_id[b["ids"][i]], b["mode"][i]
    demo = rec.demo_slow if mode == "slow" else rec.demo_fast
    seq = b["tokens"][i][b["input_mask"][i]].tolist()
    prompt = tok.encode(prompts.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, mode))
    assert seq == prompt + tok.encode(demo) + [tok.eos_id]
    assert b["tokens"][i][b["loss_mask"][i]].tolist() == tok.encode(demo) + [tok.eos_id]
    assert b["prompt_len"][i] == len(prompt) and not b["loss_mask"][i][: len(prompt)].any()
    assert b["input_mask"][i][0]  # right padding


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(records, tok, workers):
  if workers:
    flags.FLAGS.mark_as_parsed()
  # 48 records / batch 4 = 12 steps an epoch: saving at step 10 and reading 5 more crosses an epoch boundary.
  cfg = _cfg(worker_count=workers)
  it = iter(pipeline.build(pipeline.BytesSource(records), tok, cfg))
  _take(it, 10)
  state = it.get_state()
  expected = _take(it, 5)
  del it
  # Restore through JSON, the form grain.checkpoint writes, onto a freshly built pipeline.
  fresh = iter(pipeline.build(pipeline.BytesSource(records), tok, cfg))
  fresh.set_state(json.loads(json.dumps(state)))
  _assert_batches_equal(_take(fresh, 5), expected)
  del fresh


def test_seed_determines_order(records, tok):
  ids = lambda seed: np.concatenate([b["ids"] for b in _take(iter(pipeline.build(  # noqa: E731
      pipeline.BytesSource(records), tok, _cfg(seed=seed))), 6)]).tolist()
  assert ids(1) == ids(1)
  assert ids(1) != ids(2)
  # Each epoch is a permutation: the first 12 batches hold every record exactly once.
  first_epoch = np.concatenate([b["ids"] for b in _take(iter(pipeline.build(
      pipeline.BytesSource(records), tok, _cfg())), 12)])
  assert sorted(first_epoch) == sorted(r.id for r in records)


@pytest.mark.parametrize("kind,n", [("rl", 48), ("eval", 47)])
def test_shards_are_disjoint_halves(records, tok, kind, n):
  recs = records[:n]
  eval_kw = dict(shuffle=False, num_epochs=1, drop_remainder=False) if kind == "eval" else dict(num_epochs=1)
  seen, steps = [], []
  for shard in range(2):
    p = pipeline.build(pipeline.BytesSource(recs), tok, _cfg(kind=kind, shard_index=shard, shard_count=2,
                                                            **eval_kw))
    batches = list(p)
    steps.append(len(batches))
    assert len(batches) == p.steps_per_epoch
    assert p.n_padding == (shard == 1 and n % 2) and p.n_repeated == 0
    seen.append([i for b in batches for i, m in zip(b["ids"], b["example_mask"]) if m])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(r.id for r in recs)
  assert steps[0] == steps[1]  # equal step counts, so multi-process loops stay in lock step


def test_two_processes_read_disjoint_halves(records, tmp_path):
  src = tmp_path / "recs.bin"
  src.write_bytes(b"".join(len(b).to_bytes(4, "little") + b for b in map(schema.to_bytes, records)))
  script = tmp_path / "worker.py"
  script.write_text(
      "import json, sys\n"
      "from merr1_jax.data import pipeline, synth\n"
      "raw, out = open(sys.argv[1], 'rb').read(), []\n"
      "i = 0\n"
      "while i < len(raw):\n"
      "  n = int.from_bytes(raw[i:i + 4], 'little'); out.append(raw[i + 4:i + 4 + n]); i += 4 + n\n"
      "cfg = pipeline.PipelineConfig(kind='rl', batch_size=4, num_epochs=1, shard_index=int(sys.argv[2]),\n"
      "                              shard_count=2, seed=5)\n"
      "tok = synth.build_tokenizer(synth.SynthConfig(n_train=48, n_validation=8, n_test=8), vocab_size=512)\n"
      "ids = [i for b in pipeline.build(pipeline.BytesSource(out), tok, cfg) for i in b['ids'].tolist()]\n"
      "print(json.dumps(ids))\n")
  env = os.environ | {"PYTHONPATH": os.getcwd()}
  procs = [subprocess.Popen([sys.executable, str(script), str(src), str(i)], stdout=subprocess.PIPE, env=env,
                            text=True) for i in range(2)]
  outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert len(outs[0]) == len(outs[1]) == len(records) // 2
  assert not set(outs[0]) & set(outs[1]) and set(outs[0]) | set(outs[1]) == {r.id for r in records}


def test_eval_pads_the_last_batch_with_masked_rows(records, tok):
  p = pipeline.build(pipeline.BytesSource(records[:10]), tok,
                     _cfg(kind="eval", batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False))
  batches = list(p)
  assert [b["example_mask"].sum() for b in batches] == [4, 4, 2]
  last = batches[-1]
  assert last["ids"].tolist()[2:] == ["", ""] and not last["prompt_mask"][2:].any()
  assert [i for b in batches for i in b["ids"] if i] == [r.id for r in records[:10]]
  assert (last["mode"] == "slow").all()


BAD_CASES = {
    "nan_video": (lambda r: dataclasses.replace(r, video=np.full_like(r.video, np.nan)), "video"),
    "inf_audio": (lambda r: dataclasses.replace(r, audio=np.full_like(r.audio, np.inf)), "audio"),
    "video_dim": (lambda r: dataclasses.replace(r, video=np.zeros((3, SYNTH.video_dim + 1), np.float16)), "video"),
    # No label at all: open-set, one-hot and valence all empty (any one of them makes a record usable).
    "empty_labels": (lambda r: dataclasses.replace(r, openset=(), onehot=None, valence=None), "openset"),
    "unmapped_labels": (lambda r: dataclasses.replace(r, openset=("sad].",)), "openset"),
    "long_subtitle": (lambda r: dataclasses.replace(r, subtitle="ha " * 34_000), "subtitle"),
    "marker_in_subtitle": (lambda r: dataclasses.replace(r, subtitle="look <|VIDEO|> here"), "subtitle"),
    "not_msgpack": (lambda r: b"\x00garbage", "<bytes>"),
    "layout_miscounts": (lambda r: dataclasses.replace(r, media_layout=f"V{r.n_video + 1}A{r.n_audio}"),
                         "media_layout"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raise_names_record_and_field(records, tok, case):
  corrupt, field = BAD_CASES[case]
  recs = list(records[:8])
  recs[5] = corrupt(recs[5])
  p = pipeline.build(pipeline.BytesSource(recs, name="toy.rec"), tok, _cfg(shuffle=False, num_epochs=1))
  with pytest.raises(schema.BadRecordError) as e:
    list(p)
  assert e.value.field == field and "toy.rec[5]" in str(e.value)
  assert e.value.record in (records[5].id, 5)


def test_bad_record_skip_is_counted_and_logged(records, tok, caplog):
  recs = list(records[:12])
  bad_ids = {}
  for i, case in zip((1, 4, 7, 10), ("nan_video", "empty_labels", "long_subtitle", "not_msgpack")):
    bad_ids[recs[i].id] = BAD_CASES[case][1]
    recs[i] = BAD_CASES[case][0](recs[i])
  with caplog.at_level("WARNING"):
    p = pipeline.build(pipeline.BytesSource(recs), tok, _cfg(kind="sft", on_bad_record="skip", num_epochs=1,
                                                             batch_size=2))
  assert p.bad.count == 4 and sorted(p.bad.by_field.elements()) == sorted(bad_ids.values())
  assert p.n_examples == 2 * 8  # 8 good records x 2 modes; a bad record is counted once, not per mode
  assert sum("skipping" in r.message for r in caplog.records) == 4
  ids = {i for b in p for i in b["ids"]}
  assert ids == {r.id for j, r in enumerate(records[:12]) if j not in (1, 4, 7, 10)}


def _raise_and_skip(recs, tok, bad_index, field, **kw):
  """Under 'raise' the bad record fails naming file, record and field; under 'skip' it is counted, the rest kept."""
  cfg = _cfg(shuffle=False, num_epochs=1, drop_remainder=False, **kw)
  src = pipeline.BytesSource(recs, name="toy.rec")
  with pytest.raises(schema.BadRecordError) as e:
    list(pipeline.build(src, tok, cfg))
  assert e.value.field == field and f"toy.rec[{bad_index}]" in e.value.source and e.value.record == recs[bad_index].id
  p = pipeline.build(src, tok, dataclasses.replace(cfg, on_bad_record="skip"))
  assert p.bad.count == 1 and p.bad.by_field[field] == 1 and f"toy.rec[{bad_index}]" in p.bad.examples[0]
  kept = [i for b in p for i, m in zip(b["ids"], b["example_mask"]) if m]
  assert kept == [r.id for j, r in enumerate(recs) if j != bad_index]
  return e.value


def test_open_vocabulary_labels_must_map_through_the_emotion_wheels(records, tok):
  # No closed label_vocab (a real open-set dataset): "[qwertyuiop]" would be an empty ground truth for the metric.
  open_set = [dataclasses.replace(r, onehot=None, valence=None) for r in records[:8]]
  recs = list(open_set)
  recs[3] = dataclasses.replace(recs[3], openset=("qwertyuiop",))
  err = _raise_and_skip(recs, tok, 3, "openset", label_vocab=None)
  assert "qwertyuiop" in str(err)
  # One mappable word is enough; a one-hot or valence record is scored on that field, so "neutral" is fine.
  ok = list(open_set)
  ok[2] = dataclasses.replace(ok[2], openset=("sad", "qwertyuiop"))
  ok[4] = dataclasses.replace(records[4], openset=("neutral",), onehot="neutral")
  p = pipeline.build(pipeline.BytesSource(ok), tok, _cfg(label_vocab=None, shuffle=False, num_epochs=1))
  assert p.bad.count == 0 and p.n_dropped == 0 and len([i for b in p for i in b["ids"]]) == 8
  # The check can be switched off, and its word test survives pickling (Grain workers).
  p = pipeline.build(pipeline.BytesSource(recs), tok, _cfg(label_vocab=None, check_label_wheels=False,
                                                           on_bad_record="skip"))
  assert p.bad.count == 0
  maps = pickle.loads(pickle.dumps(transforms.WheelMaps()))
  assert maps("happy") and not maps("qwertyuiop")


def test_closed_vocabulary_words_outside_it_are_bad_records_not_dropped_labels(records, tok):
  recs = list(records[:8])
  recs[6] = dataclasses.replace(recs[6], openset=(recs[6].openset[0], "qwertyuiop"))
  err = _raise_and_skip(recs, tok, 6, "openset")
  assert "['qwertyuiop'] are not in the closed label_vocab" in str(err)


def test_bad_position_ids_follow_the_policy(records, tok):
  recs = list(records[:8])
  rec = recs[5]
  n = len(tok.encode(prompts.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, "slow")))
  long = np.zeros((3, n + 4), np.int32)
  recs[5] = dataclasses.replace(rec, position_ids=long)
  for kind in ("rl", "eval"):
    err = _raise_and_skip(recs, tok, 5, "position_ids", kind=kind)
    assert f"cover {n + 4} tokens, the prompt has" in str(err)


def test_feature_width_mismatch_follows_the_policy_without_configured_dims(records, tok):
  # No video_dim/audio_dim: the first decodable record with rows sets the width every record must have.
  for name in ("video", "audio"):
    recs = list(records[:8])
    recs[0] = b"not a record"  # passed over by the reference, reported by the check
    x = getattr(recs[5], name)
    recs[5] = dataclasses.replace(recs[5], **{name: np.zeros((x.shape[0], x.shape[1] + 3), np.float16)})
    cfg = _cfg(shuffle=False, num_epochs=1, drop_remainder=False, video_dim=None, audio_dim=None)
    src = pipeline.BytesSource(recs, name="toy.rec")
    with pytest.raises(schema.BadRecordError) as e:
      list(pipeline.build(src, tok, dataclasses.replace(cfg, on_bad_record="raise")))
    assert e.value.field == "<bytes>"  # record 0 comes first
    p = pipeline.build(src, tok, dataclasses.replace(cfg, on_bad_record="skip"))
    assert p.bad.count == 2 and p.bad.by_field[name] == 1
    msg = next(m for m in p.bad.examples if f"field {name}" in m)
    assert "toy.rec[5]" in msg and repr(records[1].id) in msg  # the record that set the width
    kept = {i for b in p for i, m in zip(b["ids"], b["example_mask"]) if m}
    assert kept == {r.id for j, r in enumerate(records[:8]) if j not in (0, 5)}
    recs[0] = records[0]
    with pytest.raises(schema.BadRecordError, match=f"feature dim {x.shape[1] + 3} differs") as e:
      list(pipeline.build(pipeline.BytesSource(recs, name="toy.rec"), tok, cfg))
    assert e.value.field == name and e.value.source == "toy.rec[5]" and e.value.record == records[5].id


def test_training_shards_repeat_the_remainder_instead_of_dropping_it(records, tok, caplog):
  recs = records[:47]
  seen, steps, repeated = [], [], 0
  with caplog.at_level("INFO", logger="merr1_jax.data.pipeline"):
    for shard in range(2):
      p = pipeline.build(pipeline.BytesSource(recs), tok, _cfg(kind="rl", batch_size=2, shard_index=shard,
                                                              shard_count=2, num_epochs=1))
      batches = list(p)
      steps.append(len(batches))
      seen.append([i for b in batches for i in b["ids"]])
      repeated += p.n_repeated
      assert p.n_padding == 0 and p.n_examples == 24 and p.n_dropped == 0
  assert steps[0] == steps[1] == 12
  assert set(seen[0]) | set(seen[1]) == {r.id for r in recs}  # nothing dropped
  assert len(seen[0]) + len(seen[1]) == 48 and repeated == 1 and len(set(seen[0]) & set(seen[1])) == 1
  assert any("1 repeated records added" in r.getMessage() for r in caplog.records)
  # A finite run with drop_remainder loses its last partial batch: counted and logged, not silent.
  with caplog.at_level("INFO", logger="merr1_jax.data.pipeline"):
    p = pipeline.build(pipeline.BytesSource(records[:10]), tok, _cfg(batch_size=4, num_epochs=1))
  assert p.n_dropped == 2 and len([i for b in p for i in b["ids"]]) == 8
  assert any("drops the last 2 examples" in r.getMessage() for r in caplog.records)
  mine, fill = pipeline.shard_records(np.arange(5), 2, 3, fill="pad")
  assert mine.tolist() == [2, -1] and fill == 1


def test_sft_shards_hold_both_modes_of_their_records(records, tok):
  recs = records[:24]
  pairs = []
  for shard in range(2):
    p = pipeline.build(pipeline.BytesSource(recs), tok, _cfg(kind="sft", batch_size=4, shard_index=shard,
                                                            shard_count=2, num_epochs=1))
    mine = [(i, m) for b in p for i, m in zip(b["ids"], b["mode"])]
    assert {m for _, m in mine} == {"slow", "fast"}
    by_id = collections.Counter(i for i, _ in mine)
    assert set(by_id.values()) == {2}  # both modes of a record live on the same process
    pairs.append(mine)
  assert not {i for i, _ in pairs[0]} & {i for i, _ in pairs[1]}
  assert sorted(pairs[0] + pairs[1]) == sorted((r.id, m) for r in recs for m in ("slow", "fast"))


def test_too_long_for_the_buckets_is_a_bad_record(records, tok):
  p = pipeline.build(pipeline.BytesSource(records[:4]), tok, _cfg(prompt_buckets=(16, 32), num_epochs=1))
  with pytest.raises(schema.BadRecordError, match="exceeds the largest bucket 32"):
    next(iter(p))
  p = pipeline.build(pipeline.BytesSource(records[:4]), tok, _cfg(feature_buckets=(2,), on_bad_record="skip"))
  assert p.bad.count == 4 and p.n_examples == 0


def test_mrope_positions_continue_as_text_after_precomputed_ids(records, tok):
  rec = records[0]
  n = len(tok.encode(prompts.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, "slow")))
  ids = np.stack([np.arange(n - 3), np.arange(n - 3) // 2, np.arange(n - 3) % 5]).astype(np.int32)
  recs = [dataclasses.replace(r, position_ids=ids) for r in [rec] * 2]
  b = next(iter(pipeline.build(pipeline.BytesSource(recs), tok, _cfg(batch_size=2, shuffle=False))))
  m = b["prompt_mask"][0]
  got = b["mrope_positions"][0, m].T  # [B, L, 3] in the batch, [3, L] in the record
  np.testing.assert_array_equal(got[:, : n - 3], ids)
  top = ids.max()
  np.testing.assert_array_equal(got[:, n - 3:], np.tile(np.arange(top + 1, top + 4), (3, 1)))
  assert not b["mrope_positions"][0, ~m].any()


def test_config_validation():
  with pytest.raises(ValueError, match="kind"):
    pipeline.PipelineConfig(kind="train").validate()
  with pytest.raises(ValueError, match="on_bad_record"):
    pipeline.PipelineConfig(on_bad_record="ignore").validate()
  with pytest.raises(ValueError, match="shard"):
    pipeline.PipelineConfig(shard_index=2, shard_count=2).validate()
  with pytest.raises(ValueError, match="increasing"):
    pipeline.PipelineConfig(prompt_buckets=(64, 32)).validate()


def _bench():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "bench_data", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "data.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


def test_data_benchmark_counts_what_the_batches_hold(records, tok, capsys):
  bench = _bench()
  # Examples are counted from the batches' masks, not as batches x batch_size: a padded eval stream of 10
  # records in batches of 4 is 3 batches holding 10 examples, and the count stops at the stream's end.
  p = pipeline.build(pipeline.BytesSource(records[:10]), tok,
                     _cfg(kind="eval", batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False))
  assert bench.consume(iter(p), 5) == (3, 10)
  it = iter(p)
  assert bench.consume(it, 2) == (2, 8) and bench.consume(it, 2) == (1, 2)
  rows = bench.main(["--n_train", "64", "--batch_size", "4", "--batches", "3", "--warmup", "1", "--workers", "0",
                     "--kinds", "rl,sft"])
  assert [(r["kind"], r["workers"]) for r in rows] == [("rl", 0), ("sft", 0)]
  rl, sft = rows
  assert rl["batches"] == sft["batches"] == 3 and rl["examples"] == sft["examples"] == 12
  assert rl["records"] == 12 and sft["records"] == 6  # an SFT record makes a slow and a fast example
  for r in rows:
    assert r["seconds"] > 0 and r["records_per_s"] == pytest.approx(r["records"] / r["seconds"])
  out = capsys.readouterr().out
  assert "records/s" in out and "examples/s" in out and "batches/s" in out and "64 records" in out
  assert "RL demand of the default run" in out


# ------------------------------------------------------------------------- interleaved (Omni) media layout


def _chunked_runs(n_video, n_audio, chunks):
  """Test helper: both modalities cut into `chunks` near-equal parts, each chunk's video then its audio."""
  cut = lambda n: [len(part) for part in np.array_split(np.arange(n), chunks)]  # noqa: E731
  return [run for nv, na in zip(cut(n_video), cut(n_audio)) for run in (("V", nv), ("A", na)) if run[1]]


def _hand_prompt(rec, runs, mode):
  """The expected text, built from the markers: the separate block swapped for the interleaved one."""
  separate = (prompts.VISION_BOS + prompts.VIDEO_TOKEN * rec.n_video + prompts.VISION_EOS + prompts.AUDIO_BOS +
              prompts.AUDIO_TOKEN * rec.n_audio + prompts.AUDIO_EOS)
  body = "".join({"V": prompts.VIDEO_TOKEN, "A": prompts.AUDIO_TOKEN}[k] * n for k, n in runs)
  inter = prompts.VISION_BOS + prompts.AUDIO_BOS + body + prompts.AUDIO_EOS + prompts.VISION_EOS
  text = prompts.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, mode)
  assert text.count(separate) == 1
  return text.replace(separate, inter)


@pytest.mark.parametrize("kind", pipeline.KINDS)
def test_interleaved_records_render_their_layout_and_merge_rows_in_time_order(records, tok, kind):
  recs, runs_of = [], {}
  for rec in records[:4]:
    runs = _chunked_runs(rec.n_video, rec.n_audio, chunks=3)
    assert len(runs) >= 4  # really interleaved: V A V A ...
    runs_of[rec.id] = runs
    recs.append(dataclasses.replace(rec, media_layout="".join(f"{k}{n}" for k, n in runs)))
  b = next(iter(pipeline.build(pipeline.BytesSource(recs), tok, _cfg(kind=kind, batch_size=4, shuffle=False))))
  by_id = {r.id: r for r in recs}
  vid, aid = tok.id_of(prompts.VIDEO_TOKEN), tok.id_of(prompts.AUDIO_TOKEN)
  if kind == "sft":
    views = [("", b["tokens"], b["input_mask"], b["mode"])]
  else:
    modes = np.asarray(["slow"] * 4) if kind == "rl" else b["mode"]
    views = [("", b["prompt_tokens"], b["prompt_mask"], modes)]
    if kind == "rl":
      views.append(("fast_", b["fast_prompt_tokens"], b["fast_prompt_mask"], np.asarray(["fast"] * 4)))
  for _, tokens, mask, modes in views:
    # The model's own merge (mllm.merge_placeholders), on every row of the batch at once.
    merged_v = np.asarray(mllm.merge_placeholders(np.zeros(tokens.shape + (SYNTH.video_dim,), np.float32), tokens,
                                                  vid, b["video"], b["video_mask"]))
    merged_a = np.asarray(mllm.merge_placeholders(np.zeros(tokens.shape + (SYNTH.audio_dim,), np.float32), tokens,
                                                  aid, b["audio"], b["audio_mask"]))
    for i, rid in enumerate(b["ids"]):
      rec, runs = by_id[rid], runs_of[rid]
      real = tokens[i][mask[i]]
      want = tok.encode(_hand_prompt(rec, runs, str(modes[i])))
      assert real[:len(want)].tolist() == want  # sft rows continue with the completion
      # Walk the runs: the j-th media placeholder is the next row of its run's modality, in time order.
      expected = [(k, r) for k, rows in _walk(runs) for r in rows]
      cols = np.flatnonzero(mask[i] & ((tokens[i] == vid) | (tokens[i] == aid)))
      assert len(cols) == len(expected) == rec.n_video + rec.n_audio
      for col, (k, r) in zip(cols, expected):
        assert tokens[i, col] == (vid if k == "V" else aid)
        got, feats = (merged_v, rec.video) if k == "V" else (merged_a, rec.audio)
        np.testing.assert_array_equal(got[i, col], feats[r].astype(np.float32))


def _walk(runs):
  """[('V', 2), ('A', 3), ('V', 1)] -> [('V', [0, 1]), ('A', [0, 1, 2]), ('V', [2])]: row indices per run."""
  seen = {"V": 0, "A": 0}
  out = []
  for k, n in runs:
    out.append((k, list(range(seen[k], seen[k] + n))))
    seen[k] += n
  return out

