"""Where the benches write: ``bench/results/NAME.json`` (the data) and ``NAME.md`` (the table)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, result: dict, text: str) -> None:
    """Write the JSON and the Markdown of one bench run, and print the Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
