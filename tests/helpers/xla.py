"""XLA flags the test suite compiles with (tests/conftest.py, and every child process a test starts).

The suite compiles hundreds of small programs that then run once or twice, so compilation dominates its time:
XLA's CPU backend at optimisation level 0, without its expensive LLVM passes, compiles about 30% faster
(tests/test_models_contract.py + test_rl_loss.py from a cold cache: 116 s -> 82 s on 2 cores). Where the jaxlib
still has it (before 0.11), the legacy elemental emitter instead of the MLIR fusion emitters halves it again:
tiny-model RL steps, two configurations compiled and run 20 times each, 8.7 s -> 4.9 s (AMD EPYC, 2026-12-06);
later XLA releases removed that route and the flag with it (an unknown flag aborts the process), hence the
version gate. Arithmetic keeps IEEE semantics either way; what the tests compare (two runs, a sharded and an
unsharded program, a reference implementation within a tolerance) is compiled alike on both sides. Production
runs use XLA's defaults.
"""

from importlib import metadata


def _legacy_emitter_flag() -> str:
  try:
    major, minor = (int(x) for x in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return ""
  return " --xla_cpu_use_fusion_emitters=false" if (major, minor) < (0, 11) else ""


COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" + _legacy_emitter_flag()
