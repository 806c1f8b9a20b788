"""Evaluation: both modes on a dataset (core), per-sample statistics, reports and their plots."""
