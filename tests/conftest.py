import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
