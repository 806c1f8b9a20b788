"""Offline preprocessing: clips -> feature records (merr1_jax/data/preprocess.py, docs/preprocessing.md).

    python -m merr1_jax.data.preprocess --config configs/preprocess.py \
        --config.checkpoint_dir=/ckpt/Qwen2.5-Omni-7B --config.label_csv=/data/ovmerd/label.csv \
        --config.subtitle_csv=/data/ovmerd/subtitle_chieng.csv --config.video_dir=/data/ovmerd/video \
        --config.output_dir=/data/records/ovmerd --num_shards=8 --shard_index=3 --on_error=skip

Every field is documented where it is set. Defaults of the `video` block are the Qwen2.5-Omni processor's.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()

  # ---- inputs
  c.label_csv = ""  # CSV `name,openset` (the field's open-vocabulary label format); one clip per row
  c.subtitle_csv = ""  # CSV `name,<subtitle_column>` (e.g. subtitle_chieng.csv); "" = no subtitles at all
  c.subtitle_column = "english"  # the subtitle CSV column to use
  c.require_subtitle = True  # a clip missing from subtitle_csv is a per-clip error (False: empty subtitle)
  c.video_dir = ""  # clip `name` is read from {video_dir}/{name}.{ext}, the first ext that exists
  c.video_exts = ("mp4", "avi", "mkv", "webm", "mov")
  c.audio_dir = ""  # "" = audio from the video's own track; else {audio_dir}/{name}.wav
  c.dataset = "mer_features"  # ClipRecord.dataset of every record written
  c.split = "train"  # records go to {output_dir}/{split}/{name}.rec (the mer_features TFDS builder's layout)

  # ---- encoder
  c.encoder = "omni_towers"  # the only one bundled: Qwen2.5-Omni thinker towers in PyTorch (transformers)
  c.checkpoint_dir = ""  # local HF Qwen2.5-Omni (or thinker) checkpoint: config.json + *.safetensors
  c.tokenizer_dir = ""  # tokenizer.json / HF tokenizer files; "" = checkpoint_dir
  c.torch_dtype = "bfloat16"  # tower compute dtype: float32 | bfloat16 | float16
  c.device = "cpu"  # torch device for the towers, e.g. "cuda:0"
  # Placeholder layout in the prompt. "interleaved" (default, the Omni reference): use_audio_in_video, i.e.
  # <vision_bos><audio_bos> then 2 s chunks of video rows followed by audio rows, TMRoPE time-aligned; the runs
  # (e.g. "V8A50V8A50") are stored in ClipRecord.media_layout and the training pipeline renders them.
  # "separate": <vision_bos>V..<vision_eos><audio_bos>A..<audio_eos> (Omni with audio as its own input);
  # media_layout stays None. Both are consumed by the training pipeline (docs/preprocessing.md).
  c.layout = "interleaved"
  c.feature_dtype = "float16"  # record feature dtype: float16 | bfloat16 | float32
  c.question = ""  # the prompt question; "" = prompts.DEFAULT_QUESTION (must match the pipeline's)

  # ---- video decoding (PyAV) and resizing: the Qwen2.5-Omni processor's rules
  c.video = ml_collections.ConfigDict()
  c.video.fps = 2.0  # frames sampled per second of video
  c.video.min_frames = 4  # at least this many frames (clips with fewer than 2 frames fail)
  c.video.max_frames = 768  # the frame cap
  c.video.min_pixels = 128 * 28 * 28  # per-frame pixel floor after resizing
  c.video.max_pixels = 768 * 28 * 28  # per-frame pixel cap after resizing
  c.video.total_pixels = 24576 * 28 * 28  # pixel budget for all sampled frames of one clip

  # ---- output and scaling
  c.output_dir = ""  # record root; {output_dir}/{split}/ holds .rec files, layouts and per-shard summaries
  c.num_shards = 1  # clips are split over processes: shard i takes sorted clips i, i+n, i+2n, ...
  c.shard_index = 0  # this process's shard (also settable with --shard_index)
  c.resume = True  # skip clips whose record exists, and shards whose summary says they finished
  # Rerun a finished shard anyway, so that its clips without a record (the failed ones, listed in its failures
  # file) are tried again; written records are still skipped. Also the --retry_failed flag.
  c.retry_failed = False
  c.on_error = "skip"  # bad clip: "skip" (count, list in the failures file, go on) | "raise" (stop)
  # Non-empty: build the mer_features TFDS dataset there once every shard has finished (the last shard to
  # finish does it, under a lock file; or run once more with --finalize to build it alone).
  c.tfds_data_dir = ""
  return c
