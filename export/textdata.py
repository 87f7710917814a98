"""Real English text that every machine has: sentences from the docstrings of Python's standard library
(about 2,900) and, for larger sets, of the packages installed beside slimx (tens of thousands, read with ``ast``
without importing anything).

Used for calibration (int8 ranges, distillation) and held-out evaluation; ``offset`` selects a
disjoint slice, so calibration and evaluation never share a sentence. The two sources share no sentence either:
a package's text (distillation at scale) never overlaps a stdlib held-out set.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import warnings
from pathlib import Path

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


# packages slimx installs with (the order fixes which sentences come first); absent ones are skipped
_PACKAGES = ("torch", "transformers", "numpy", "scipy", "onnx", "onnxruntime", "timm", "sklearn", "safetensors",
             "onnxscript", "coremltools", "ray", "starlette", "tomlkit")


def _docstring_sentences(path: Path, min_words: int, max_words: int):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        text = " ".join(re.split(r"\n\s*\n", doc)[0].split())  # the first paragraph: prose, not parameter lists
        for sentence in _SPLIT.split(text):
            words = sentence.split()
            if min_words <= len(words) <= max_words and sentence[:1].isupper() and ">>>" not in sentence \
                    and re.search(r"[a-z]{3}", sentence) and not re.search(r"[{}<>|\\]", sentence):
                yield sentence


def package_sentences(count: int, offset: int = 0, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Up to ``count`` distinct sentences from the first paragraphs of the docstrings of the installed packages
    slimx depends on (files read with ``ast``, nothing imported), skipping the first ``offset``: the packages in
    turn, a file of each at a time, so that any slice mixes them. The same list wherever the same package
    versions are installed.

    Example:
        >>> text = package_sentences(5)
        >>> len(text), all(s[0].isupper() for s in text)
        (5, True)
    """
    stdlib = set(stdlib_sentences(100_000))
    streams = []
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        files = sorted(f for r in roots for f in Path(r).rglob("*.py")
                       if "tests" not in f.parts and "test" not in f.parts and not f.name.startswith("test_"))
        if files:
            streams.append(iter(files))
    seen: set[str] = set()
    out: list[str] = []
    while streams and len(out) < offset + count:
        for stream in list(streams):
            path = next(stream, None)
            if path is None:
                streams.remove(stream)
                continue
            for sentence in _docstring_sentences(path, min_words, max_words):
                if sentence not in seen and sentence not in stdlib:
                    seen.add(sentence)
                    out.append(sentence)
            if len(out) >= offset + count:
                break
    return out[offset:offset + count]
