"""Emotion-wheel label normalisation for MER-UniBench / OV-MER metrics (see docs/metrics.md).

The tables are vendored in ``emotion_wheel.json`` (source, commit and licence in ``NOTICE``); nothing here reads
files outside the package.
"""

from merr1_jax.emotion.labels import parse_label_list, split_label_string
from merr1_jax.emotion.sentiment import SentimentMapper, VaderSentimentMapper
from merr1_jax.emotion.wheel import FORMAT_VERSIONS, LEVELS, NUM_WHEELS, EmotionWheel, load

__all__ = [
    "FORMAT_VERSIONS",
    "LEVELS",
    "NUM_WHEELS",
    "EmotionWheel",
    "SentimentMapper",
    "VaderSentimentMapper",
    "load",
    "parse_label_list",
    "split_label_string",
]
