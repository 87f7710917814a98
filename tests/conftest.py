import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # factories are named as tests.models:NAME
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
