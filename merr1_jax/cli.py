"""The trainer's command line: absl flag parsing where bad input is one `error: ...` line and exit status 2.

A config field, a config-file argument, an override of a field that does not exist, or a config file that is
missing ends the run before anything is compiled with one line naming what is wrong; anything else is a bug and
keeps its traceback. `parse_flags` is the `flags_parser` of `absl.app.run` (merr1_jax/training/trainer.py).
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags

from merr1_jax import config as cfglib


def usage_error(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _missing_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=v` of argv whose path the loaded config does not have, or None."""
  config = flags.FLAGS["config"].value
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node, path = config, arg[len("--config."):].partition("=")[0]
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        return arg
      node = node[part]
  return None


def _flag_error(e: BaseException, argv: list[str]) -> str | None:
  """The one-line message for a flag-parsing failure caused by bad input, or None for anything else (a bug,
  which keeps its traceback)."""
  chain = []
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  config_errors = [x for x in chain if isinstance(x, cfglib.ConfigError)]
  if config_errors:  # raised by the config file's get_config(arg); the deepest one carries the plain message
    return str(config_errors[-1])
  for x in chain:  # ml_collections could not read the config file (it reports this when the config is used)
    why = re.search(r"\[Errno \d+\] (.+)", str(x)) if isinstance(x, OSError) else None
    if why and "Failed loading config file" in str(x):
      return f"--config: {why.group(1)}"
  if isinstance(chain[0], (AttributeError, KeyError)):  # ml_collections: an override of a field that is not there
    bad = _missing_override(argv)
    if bad is None:
      return None
    hint = re.search(r'Did you mean "([^"]+)"', str(chain[0]))
    return (f"{bad}: the config has no field {bad[len('--config.'):].partition('=')[0]!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
  if isinstance(chain[0], flags.Error) and "Traceback" not in str(chain[0]):
    return str(chain[0])  # e.g. "flag --config.rl.beta=abc: could not convert string to float: 'abc'"
  return None


def _missing_config_file() -> str | None:
  spec = getattr(flags.FLAGS["config"], "_config_filename", None)  # set once --config is parsed
  path = (spec or "").partition(":")[0]
  return f"--config: config file {path} does not exist" if spec and not os.path.isfile(path) else None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad input reported as one `error:` line (exit 2) instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - re-raised unless it is bad input
    msg = _missing_config_file() or _flag_error(e, argv)
    if msg is None:
      raise
    usage_error(msg)
  msg = _missing_config_file()
  if msg:
    usage_error(msg)
  return rest
