"""Known-broken dependency pairs, refused at import with the versions and the fix (instead of an AttributeError
deep inside flax). Read from the installed distributions' metadata, so nothing heavy is imported to check."""

from __future__ import annotations

import importlib.metadata
import re


def _release(version: str) -> tuple[int, ...]:
  """The leading release numbers of a version string ('0.12.0.1' -> (0, 12, 0, 1); '0.11.1rc1' -> (0, 11, 1))."""
  return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0].split("rc")[0].split("dev")[0])[:4])


def broken_pair(jax_version: str | None, flax_version: str | None) -> str | None:
  """The message for a known-broken (jax, flax) pair, None when the pair is not known to be broken.

  flax <= 0.12.8 subclasses jax's MutableHiType in flax.nnx, which jax 0.11.1 removed: `import flax.nnx` then fails
  with an AttributeError; flax 0.12.9 restored compatibility (../shared/docs/ecosystem.md)."""
  if jax_version is None or flax_version is None:
    return None
  if _release(jax_version) >= (0, 11, 1) and _release(flax_version) <= (0, 12, 8):
    return (f"merr1_jax: flax {flax_version} cannot run on jax {jax_version} (flax <= 0.12.8 needs jax < 0.11.1: "
            f"flax.nnx uses jax's MutableHiType, which jax 0.11.1 removed). Fix: pip install 'flax>=0.12.9', or "
            f"install jax<0.11.1.")
  return None


def _installed(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def check() -> None:
  """Raises ImportError for a known-broken installed pair."""
  message = broken_pair(_installed("jax"), _installed("flax"))
  if message:
    raise ImportError(message)


def to_install(installed: dict, needed: tuple[str, ...]) -> list[str]:
  """Which of `needed` (distribution names) to install from carried wheels, given {name: version or None}: the
  missing ones, and flax when it is missing or would form a broken pair with the installed jax. For
  benchmarks/gpu.sh on an image with its own jax."""
  out = [n for n in needed if installed.get(n) is None and n != "flax"]
  if installed.get("flax") is None or broken_pair(installed.get("jax"), installed.get("flax")):
    out.append("flax")
  return out


if __name__ == "__main__":
  # `python3 merr1_jax/_versions.py NAME ...` (run as a file, so the package's own import guard does not fire):
  # prints what to install, space separated, and why to stderr (benchmarks/gpu.sh).
  import sys
  names = tuple(sys.argv[1:])
  installed = {n: _installed(n) for n in (*names, "jax", "flax")}
  need = to_install(installed, names)
  for n in need:
    print(broken_pair(installed["jax"], installed["flax"]) if n == "flax" and installed["flax"] else
          f"merr1_jax: {n} is not installed", file=sys.stderr)
  print(" ".join(need))
