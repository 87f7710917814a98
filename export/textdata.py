"""Real English text that every machine has: sentences from the docstrings of Python's standard library.

Used for calibration (int8 ranges, distillation) and held-out evaluation; ``offset`` selects a
disjoint slice, so calibration and evaluation never share a sentence.
"""

from __future__ import annotations

import importlib
import re
import warnings

# pure-Python stdlib modules with plenty of prose docstrings; importing them has no side effects
_MODULES = ("argparse", "collections", "json", "pathlib", "shutil", "subprocess", "textwrap", "inspect", "os",
            "re", "string", "functools", "itertools", "logging", "email.message", "http.client", "urllib.parse",
            "zipfile", "tarfile", "csv", "datetime", "decimal", "fractions", "statistics", "random", "heapq",
            "bisect", "calendar", "configparser", "difflib", "enum", "typing", "dataclasses", "contextlib",
            "threading", "queue", "socket", "ssl", "sqlite3", "unittest", "doctest", "pdb", "pickle", "copy",
            "pprint", "tempfile", "glob", "fnmatch", "gettext", "locale", "codecs", "io", "abc", "numbers")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def stdlib_sentences(count: int, offset: int = 0, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Up to ``count`` distinct sentences, skipping the first ``offset``; the same list on every machine
    with the same Python version.

    Example:
        >>> len(stdlib_sentences(3))
        3
    """
    seen: set[str] = set()
    sentences: list[str] = []
    for name in _MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            doc = getattr(getattr(module, attr, None), "__doc__", None)
            if not isinstance(doc, str):
                continue
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                for sentence in _SPLIT.split(text):
                    words = sentence.split()
                    if not (min_words <= len(words) <= max_words) or not sentence[:1].isupper():
                        continue
                    if sentence.count(">>>") or sentence in seen or not re.search(r"[a-z]{3}", sentence):
                        continue
                    seen.add(sentence)
                    sentences.append(sentence)
                    if len(sentences) >= offset + count:
                        return sentences[offset:]
    return sentences[offset:]
