import os, pytest
pytestmark = pytest.mark.xdist_group("g")
@pytest.mark.parametrize("i", range(6))
def test_a(i):
  with open("/tmp/zz_workers.txt", "a") as f:
    f.write(os.environ.get("PYTEST_XDIST_WORKER", "?") + "\n")
