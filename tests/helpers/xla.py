"""XLA flags the test suite compiles with (tests/conftest.py, and every child process a test starts).

The suite compiles hundreds of small programs that then run once or twice, so compilation dominates its time:
XLA's CPU backend at optimisation level 0, without its expensive LLVM passes, compiles about 30% faster
(tests/test_models_contract.py + test_rl_loss.py from a cold cache: 116 s -> 82 s on 2 cores). Arithmetic keeps
IEEE semantics at every level; what the tests compare (two runs, a sharded and an unsharded program, a reference
implementation within a tolerance) is compiled alike on both sides. Production runs use XLA's defaults.
"""

COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
