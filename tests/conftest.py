import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One torch (OpenMP) thread in this process and in every process a test starts (stage
# processes, workers, coordinators: they inherit the environment). The test models are tiny,
# and ``make test`` runs two pytest workers on two cores, each starting several processes: with
# torch's default (a thread per core) the OpenMP threads spin waiting for each other. Measured
# on this 2-core VM (tests/models.py lm_model, 5 x hf_greedy of 40 tokens, load ~10): 2
# threads 6.8-7.4 s CPU and 7-8 s wall, 1 thread 1.1-1.2 s CPU and 1.3-2.8 s wall. A test that
# needs more threads sets them itself (models.torch_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeline_core.profile_cache import set_default_profile_cache  # noqa: E402

# Unit-time profiles (planning by time) go to a file of this test run, not ~/.cache; worker
# processes the tests start inherit it.
os.environ.setdefault(
    "PIPESERVE_PROFILE_CACHE",
    str(Path(tempfile.mkdtemp(prefix="pipeserve-profiles-")) / "unit-profiles.json"),
)
set_default_profile_cache(os.environ["PIPESERVE_PROFILE_CACHE"])  # in-process plans too


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """Scheduling for ``pytest -n 2 --dist loadgroup`` (``make test``), no test changed:

    * a test using a module-scoped fixture (a running cluster, a gateway, stage processes) is
      grouped with its module's other users of it, so one xdist worker builds the fixture once
      instead of each worker building its own copy;
    * modules with multi-process (``slow``) tests go first and the quick unit tests last, so
      that no long test starts at the end while the other worker sits idle (whole modules
      move, so that a module fixture is still built once without xdist).

    The marks are set before the other hooks run (xdist's reads them); after them, a grouped
    test's node id gets its ``@group`` suffix where xdist's own could not give it: pytest-xdist
    3.8 writes ``item._nodeid``, which pytest 9 no longer reads (it keeps ``item._id``), so
    every group was silently ignored and both workers built each module fixture (CI: the
    gateway's 40 s ``pipeserve local`` start twice, the cluster's 39 s twice).
    """
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        if defs is None:
            continue
        if any(
            fd.scope == "module" and fd.baseid.endswith(".py")
            for fds in defs.name2fixturedefs.values()
            for fd in fds
        ):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
    yield
    if getattr(config.option, "loadgroup", False):
        for item in items:
            _group_node_id(item)


def _group_node_id(item: pytest.Item) -> None:
    """Append ``@group`` to a grouped test's node id (what xdist's scheduler groups by) unless
    xdist already did."""
    groups = sorted({str(m.args[0]) for m in item.iter_markers("xdist_group") if m.args})
    if not groups or "@" in item.nodeid.rpartition("]")[2].rpartition("::")[2]:
        return
    node_id = f"{item.nodeid}@{'_'.join(groups)}"
    if hasattr(item, "_id"):  # pytest >= 9
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(node_id)
    else:
        item._nodeid = node_id
