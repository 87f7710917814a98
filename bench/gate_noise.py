"""The CI gate on this noisy machine: an unchanged model must pass, a 20% slower one must fail, every time.

    python bench/gate_noise.py [--repeats 10] [--rounds 15] [--runs 20]

A small ViT-style encoder (64 tokens, width 192, 3 heads) with 10 blocks is exported twice (the baseline and an
unchanged candidate, two files with the same content) and once with 12 blocks (20% more work: "an extra block",
twice). Each of ``--repeats`` gate runs is ``slimx gate CANDIDATE --baseline BASELINE --max-regression-pct 5``:
both artifacts re-measured in the same run, interleaved in rounds, the verdict from the bootstrap interval of the
per-round ratio. Writes ``bench/results/gate_noise.{md,json}``.

Goal (issue 15): 10 of 10 unchanged runs pass at a 5% budget; 10 of 10 runs of the slower model fail.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    def __init__(self, depth: int, dim: int = 192, heads: int = 3, tokens: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens, self.dim = tokens, dim
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.mean(1)

    def example_inputs(self):
        return (torch.randn(1, self.tokens, self.dim),)


def encoder_10() -> nn.Module:
    return Encoder(10)


def encoder_12() -> nn.Module:
    return Encoder(12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    from slimx.cli import main as slimx

    work = Path(tempfile.mkdtemp(prefix="slimx-bench-gate-"))
    try:
        for name, factory in (("baseline", "gate_noise:encoder_10"), ("unchanged", "gate_noise:encoder_10"),
                              ("slower", "gate_noise:encoder_12")):
            if slimx(["export", factory, "--out", str(work / name), "--runs", "30", "-q"]) != 0:
                raise SystemExit(f"export of {name} failed")
        runs = {"unchanged": [], "slower": []}
        for i in range(args.repeats):
            for kind in runs:
                out = work / f"{kind}-{i}.json"
                code = _gate(slimx, work / kind, work / "baseline", args, out)
                result = json.loads(out.read_text())
                check = result["entries"][0]["checks"][0]
                runs[kind].append({"exit": code, "ratio": check["value"], "interval": check["interval"],
                                   "verdict": check["verdict"]})
                print(f"{kind} run {i + 1}: ratio {check['value']:.3f} [{check['interval'][0]:.3f}, "
                      f"{check['interval'][1]:.3f}] -> {check['verdict']} (exit {code})", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": platform.processor() or platform.machine(), "repeats": args.repeats, "rounds": args.rounds,
              "runs": args.runs, "budget_pct": 5, "runs_by_kind": runs}
    write_results("gate_noise", result, render(result))
    return 0


def _gate(slimx, candidate: Path, baseline: Path, args, out: Path) -> int:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = slimx(["gate", str(candidate), "--baseline", str(baseline), "--max-regression-pct", "5",
                      "--rounds", str(args.rounds), "--runs", str(args.runs), "--json", "-q"])
    out.write_text(buf.getvalue())
    return code


def render(result: dict) -> str:
    lines = ["# slimx gate on a noisy machine", "",
             f"{result['repeats']} gate runs each, {result['rounds']} interleaved rounds of {result['runs']} runs, "
             f"budget {result['budget_pct']}% regression, on {result['machine']} (2 cores, shared). The ratio is "
             "candidate / baseline median latency per round; a run fails when its whole 90% bootstrap interval is "
             "past 1.05.", "",
             "| candidate | runs passed | runs failed | ratios (median, min-max) | interval lower ends (min-max) |",
             "| --- | --- | --- | --- | --- |"]
    for kind, label in (("unchanged", "unchanged model (10 blocks) vs itself"),
                        ("slower", "20% slower model (12 blocks) vs 10 blocks")):
        rows = result["runs_by_kind"][kind]
        ratios = sorted(r["ratio"] for r in rows)
        los = [r["interval"][0] for r in rows]
        passed = sum(r["verdict"] == "pass" for r in rows)
        lines.append(f"| {label} | {passed} | {len(rows) - passed} | {ratios[len(ratios) // 2]:.3f}, "
                     f"{ratios[0]:.3f}-{ratios[-1]:.3f} | {min(los):.3f}-{max(los):.3f} |")
    unchanged = result["runs_by_kind"]["unchanged"]
    slower = result["runs_by_kind"]["slower"]
    ok1 = all(r["verdict"] == "pass" and r["exit"] == 0 for r in unchanged)
    ok2 = all(r["verdict"] == "fail" and r["exit"] == 1 for r in slower)
    lines += ["", "Targets of issue 15:",
              f"- every unchanged run passes at a 5% budget: {'met' if ok1 else 'MISSED'}",
              f"- every run of the 20% slower model fails (exit 1): {'met' if ok2 else 'MISSED'}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
