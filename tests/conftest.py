import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # factories are named as tests.models:NAME
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_in_the_temp_folder(tmp_path_factory):
    """Python's temporary files (``tempfile``, in this process) go to a folder of the session's own, which must be
    empty when the session ends: a converter or a test that leaves scratch files behind fails the suite here
    (as CoreML's temporary packages once did, ten per run in the system's temp folder)."""
    import shutil
    import tempfile

    folder = tmp_path_factory.getbasetemp() / "python-temp"
    folder.mkdir(exist_ok=True)
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    # torch's compile caches are kept on purpose (under the temp folder by default): the session's own here
    saved_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "torchinductor")
    yield
    tempfile.tempdir = saved
    if saved_cache is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_cache
    left = sorted(p.name for p in folder.iterdir())
    shutil.rmtree(folder, ignore_errors=True)
    assert not left, f"the tests left {len(left)} temporary files or folders: {left[:10]}"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Host measurements are cached per test session, never in the user's home."""
    monkeypatch.setenv("SLIMX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "slimx-cache"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from tests.models import make_tiny_bert_dir

    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory):
    from tests.models import make_tiny_bert_dir

    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny-st"), sentence_transformers=True)
