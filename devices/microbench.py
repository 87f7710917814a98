"""A standard suite of ops and blocks, timed with one runner, written as a measurements CSV for calibration.

Each case is a small module built in code with fixed shapes (the shapes of the mobile vision and text
models slimx targets). ``slimx devices calibrate`` rebuilds the case by name to get its op mix, so the
CSV only has to carry names and timings.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CSV_FIELDS = ("case", "group", "setting", "runner", "runtime_version", "threads", "warmup", "runs", "min_ms",
              "median_ms", "p90_ms", "max_ms", "gflops", "mbytes", "host")


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    build: Callable  # () -> (module, example inputs)


def _suite() -> list[Case]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    def r(*shape):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))

    class Fn(nn.Module):
        def __init__(self, fn, *mods):
            super().__init__()
            self.fn = fn
            self.mods = nn.ModuleList(mods)

        def forward(self, *xs):
            return self.fn(self.mods, *xs)

    cases: list[Case] = []

    def add(name, group, build):
        cases.append(Case(name, group, build))

    for t, i, o in ((1, 1024, 1000), (16, 128, 128), (64, 256, 256), (128, 384, 384), (128, 384, 1536),
                    (128, 1536, 384), (197, 192, 768), (197, 768, 192), (196, 448, 448), (49, 768, 3072),
                    (256, 1024, 1024)):
        add(f"linear/t{t}/{i}x{o}", "matmul", lambda t=t, i=i, o=o: (nn.Linear(i, o), (r(1, t, i),)))
    for h, n, d in ((12, 128, 32), (3, 197, 64), (8, 49, 32)):
        add(f"bmm/h{h}/n{n}/d{d}", "matmul",
            lambda h=h, n=n, d=d: (Fn(lambda m, a, b: a @ b.transpose(-1, -2)), (r(1, h, n, d), r(1, h, n, d))))
    for ci, co, k, s, hw in ((3, 32, 3, 2, 224), (16, 64, 1, 1, 112), (64, 64, 3, 1, 56), (64, 256, 1, 1, 56),
                             (128, 128, 3, 1, 28), (256, 256, 1, 1, 14), (512, 512, 3, 1, 7), (160, 960, 1, 1, 7),
                             (3, 48, 7, 4, 224), (32, 192, 1, 1, 56), (96, 24, 1, 1, 56), (128, 256, 3, 2, 28),
                             (256, 64, 1, 1, 56), (64, 128, 3, 2, 56)):
        add(f"conv/{ci}x{co}/k{k}s{s}/{hw}", "conv",
            lambda ci=ci, co=co, k=k, s=s, hw=hw: (nn.Conv2d(ci, co, k, s, k // 2), (r(1, ci, hw, hw),)))
    for c, k, s, hw in ((32, 3, 1, 112), (96, 3, 2, 112), (144, 3, 1, 56), (192, 3, 1, 28), (384, 3, 1, 14),
                        (96, 7, 1, 56), (960, 3, 1, 7), (192, 3, 2, 56), (576, 3, 1, 14), (256, 3, 1, 14)):
        add(f"depthwise/{c}/k{k}s{s}/{hw}", "depthwise",
            lambda c=c, k=k, s=s, hw=hw: (nn.Conv2d(c, c, k, s, k // 2, groups=c), (r(1, c, hw, hw),)))
    for h, n, d in ((12, 128, 32), (3, 197, 64), (8, 49, 32), (4, 196, 32)):
        add(f"sdpa/h{h}/n{n}/d{d}", "attention",
            lambda h=h, n=n, d=d: (Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v)),
                                   (r(1, h, n, d), r(1, h, n, d), r(1, h, n, d))))
    for h, n, d in ((12, 128, 32), (12, 64, 32), (8, 256, 64)):
        add(f"sdpa-masked/h{h}/n{n}/d{d}", "attention",
            lambda h=h, n=n, d=d: (Fn(lambda m, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, mask)),
                                   (r(1, h, n, d), r(1, h, n, d), r(1, h, n, d),
                                    (torch.arange(n) < n * 3 // 4).reshape(1, 1, 1, n).expand(1, 1, n, n))))
    for t, c in ((128, 384), (197, 192), (49, 512)):
        add(f"layernorm/t{t}/{c}", "norm", lambda t=t, c=c: (nn.LayerNorm(c), (r(1, t, c),)))
    add("groupnorm/64/56", "norm", lambda: (nn.GroupNorm(1, 64), (r(1, 64, 56, 56),)))
    for name, act, shape in (("gelu", nn.GELU(), (1, 128, 1536)), ("gelu", nn.GELU(), (1, 197, 768)),
                             ("relu", nn.ReLU(), (1, 64, 112, 112)), ("hardswish", nn.Hardswish(), (1, 96, 56, 56)),
                             ("silu", nn.SiLU(), (1, 144, 56, 56)), ("relu6", nn.ReLU6(), (1, 96, 112, 112)),
                             ("hardswish", nn.Hardswish(), (1, 196, 256)), ("relu6", nn.ReLU6(), (1, 192, 28, 28))):
        add(f"{name}/{'x'.join(map(str, shape[1:]))}", "activation", lambda act=act, shape=shape: (act, (r(*shape),)))
    for shape in ((1, 12, 128, 128), (1, 3, 197, 197), (1, 8, 49, 49)):
        add(f"softmax/{'x'.join(map(str, shape[1:]))}", "softmax",
            lambda shape=shape: (nn.Softmax(-1), (r(*shape),)))
    for shape in ((1, 64, 56, 56), (1, 128, 384), (1, 24, 112, 112)):
        add(f"add/{'x'.join(map(str, shape[1:]))}", "elementwise",
            lambda shape=shape: (Fn(lambda m, a, b: a + b), (r(*shape), r(*shape))))
    add("mul/96x56x56", "elementwise", lambda: (Fn(lambda m, a: a * 0.5 + 1.0), (r(1, 96, 56, 56),)))
    add("transpose/197x3x64", "move",
        lambda: (Fn(lambda m, x: x.reshape(1, 197, 3, 3, 64).permute(2, 0, 3, 1, 4).contiguous()),
                 (r(1, 197, 576),)))
    add("transpose/12x128x32", "move",
        lambda: (Fn(lambda m, x: x.view(1, 128, 12, 32).transpose(1, 2).contiguous()), (r(1, 128, 384),)))
    add("flatten-transpose/64x56x56", "move",
        lambda: (Fn(lambda m, x: x.flatten(2).transpose(1, 2).contiguous()), (r(1, 64, 56, 56),)))
    add("cat/2x64x56x56", "move", lambda: (Fn(lambda m, a, b: torch.cat([a, b], 1)), (r(1, 64, 56, 56),
                                                                                       r(1, 64, 56, 56))))
    add("embedding/30522x384/t128", "move",
        lambda: (nn.Embedding(30522, 384), (torch.randint(0, 30522, (1, 128), generator=torch.Generator()),)))
    add("avgpool3/64/56", "reduce", lambda: (nn.AvgPool2d(3, 1, 1, count_include_pad=False), (r(1, 64, 56, 56),)))
    add("maxpool3s2/64/112", "reduce", lambda: (nn.MaxPool2d(3, 2, 1), (r(1, 64, 112, 112),)))
    add("gap/1280/7", "reduce", lambda: (nn.AdaptiveAvgPool2d(1), (r(1, 1280, 7, 7),)))
    add("mean/197x192", "reduce", lambda: (Fn(lambda m, x: x.mean(1)), (r(1, 197, 192),)))
    # blocks: the op mixes of whole layers, fusions included
    add("block/bert-ffn/t128/384", "block",
        lambda: (nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384)), (r(1, 128, 384),)))
    add("block/vit/t197/192", "block", lambda: (_vit_block(192, 3), (r(1, 197, 192),)))
    add("block/vit/t128/384", "block", lambda: (_vit_block(384, 12), (r(1, 128, 384),)))
    add("block/inverted-residual/24/56", "block", lambda: (_inverted_residual(24, 6), (r(1, 24, 56, 56),)))
    add("block/inverted-residual/64/14", "block", lambda: (_inverted_residual(64, 6), (r(1, 64, 14, 14),)))
    add("block/conv-relu/64/56", "block",
        lambda: (nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU()), (r(1, 64, 56, 56),)))
    add("block/pool-mixer/64/56", "block", lambda: (_pool_mixer(64), (r(1, 64, 56, 56),)))
    add("block/linear-hardswish/t49/384", "block",
        lambda: (nn.Sequential(nn.Linear(384, 768), nn.Hardswish(), nn.Linear(768, 384)), (r(1, 49, 384),)))
    # short sequences: a sentence of 20 tokens, a ViT on a small image. Here each op does little work and what a
    # runtime spends per node dominates; single-op cases cannot tell that per-node cost from the per-run one (both
    # are paid once), stacks of blocks can (without them a fit put 1 us per op and 11 us per run, and a 12-block
    # ViT on 17 tokens was estimated at 1.9 ms against 2.5 ms measured)
    add("linear/t20/384x1536", "matmul", lambda: (nn.Linear(384, 1536), (r(1, 20, 384),)))
    add("block/vit/t20/384", "block", lambda: (_vit_block(384, 12), (r(1, 20, 384),)))
    add("stack/vit-x4/t17/192", "block",
        lambda: (nn.Sequential(*(_vit_block(192, 3) for _ in range(4))), (r(1, 17, 192),)))
    add("stack/vit-x2/t5/64", "block", lambda: (nn.Sequential(*(_vit_block(64, 2) for _ in range(2))), (r(1, 5, 64),)))
    return cases


def _vit_block(dim: int, heads: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    torch.manual_seed(0)
    return Block()


def _inverted_residual(c: int, expand: int):
    from torch import nn

    hidden = c * expand

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU6(), nn.Conv2d(hidden, hidden, 3, 1, 1,
                                      groups=hidden), nn.ReLU6(), nn.Conv2d(hidden, c, 1))

        def forward(self, x):
            return x + self.body(x)

    return Block()


def _pool_mixer(c: int):
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(1, c)
            self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.fc1, self.act, self.fc2 = nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1)

        def forward(self, x):
            y = self.norm(x)
            x = x + self.pool(y) - y
            return x + self.fc2(self.act(self.fc1(x)))

    return Block()


SUITE_QUICK = ("linear/t128/384x1536", "linear/t16/128x128", "conv/64x64/k3s1/56", "depthwise/144/k3s1/56",
               "sdpa/h12/n128/d32", "layernorm/t128/384", "gelu/128x1536", "add/64x56x56", "softmax/12x128x128",
               "transpose/12x128x32", "block/bert-ffn/t128/384", "gap/1280/7")


def suite(quick: bool = False) -> list[Case]:
    cases = _suite()
    return [c for c in cases if c.name in SUITE_QUICK] if quick else cases


def case_by_name(name: str) -> Case:
    for case in _suite():
        if case.name == name:
            return case
    raise KeyError(name)


def case_program(case: Case):
    """Export a case to a Program (module, example inputs, ExportedProgram)."""
    from slimx.export.intake import spec_from_tensor
    from slimx.export.program import Program, export_program

    module, inputs = case.build()
    module.eval()
    exported = export_program(module, inputs)
    specs = [spec_from_tensor(f"x{i}", t) for i, t in enumerate(inputs)]
    return Program(case.name, exported, module, specs, ["y"]), inputs


@dataclass
class Prepared:
    """A case (or model) compiled for one runner, ready to be timed again and again."""

    name: str
    group: str
    artifact: object
    inputs: tuple
    gflops: float
    mbytes: float
    medians: list


def prepare_cases(runner_name: str, cases: list[Case], workdir: Path, progress=None) -> list[Prepared]:
    """Export and compile every case once for the runner's format."""
    from slimx.devices.opmix import cached_op_mix, op_mix
    from slimx.devices.runners import compile_for, runner_info

    fmt = runner_info(runner_name).format
    out = []
    for i, case in enumerate(cases):
        if progress is not None:
            progress.tick("microbench: prepare", i + 1, len(cases), case.name)
            progress.note(f"[{i + 1}/{len(cases)}] prepare {case.name}")
        program, inputs = case_program(case)
        # the same cache entry calibration reads, so the case is exported once
        costs = cached_op_mix(f"case:{case.name}", lambda program=program: op_mix(program.exported))
        out.append(Prepared(case.name, case.group, compile_for(program, fmt, Path(workdir) / f"case{i}"), inputs,
                            sum(c.flops for c in costs) / 1e9, sum(c.bytes for c in costs) / 1e6, []))
    return out


def time_round(runner, prepared: list[Prepared], warmup: int, runs: int) -> list:
    """One timing pass over every prepared item; appends each median to ``item.medians``; returns the timings."""
    timings = []
    for item in prepared:
        timing = runner.time(item.artifact, item.inputs, warmup=warmup, runs=runs, **_no_profile(runner))
        item.medians.append(timing.median_ms)
        timings.append(timing)
    return timings


def run_microbench(runner_name: str, out_csv: Path, quick: bool = False, threads: int | None = None,
                   warmup: int = 10, runs: int = 50, rounds: int = 3, progress=None,
                   only: list[str] | None = None) -> list[dict]:
    """Time every case with ``runner_name`` in ``rounds`` interleaved passes and write the CSV.

    The median of the per-round medians is kept: slow drift of a shared machine hits every case alike
    instead of the cases that happened to run during it. The CSV is written to a temporary name, then renamed.
    """

    from slimx.devices.host import cpu_model
    from slimx.devices.runners import get_runner, runner_info

    runner = get_runner(runner_name, threads=threads)
    info = runner_info(runner_name)
    cases = [c for c in suite(quick) if not only or any(o in c.name for o in only)]
    with tempfile.TemporaryDirectory(prefix="slimx-microbench-") as tmp:
        prepared = prepare_cases(runner_name, cases, Path(tmp), progress)
        timing = None
        for r in range(rounds):
            if progress is not None:
                progress.tick("microbench: round", r, rounds)
                progress.note(f"timing round {r + 1}/{rounds} ({len(prepared)} cases)")
            timings = time_round(runner, prepared, warmup, runs)
            timing = timings[-1] if timings else timing
        rows = [microbench_row(item, info, runner_name, timing, warmup, runs, cpu_model()) for item in prepared]
    write_csv(out_csv, rows)
    return rows


def microbench_row(item: Prepared, info, runner_name: str, timing, warmup: int, runs: int, host: str) -> dict:
    import numpy as np

    med = np.asarray(item.medians)
    return {"case": item.name, "group": item.group, "setting": info.setting, "runner": runner_name,
            "runtime_version": getattr(timing, "runtime_version", ""), "threads": getattr(timing, "threads", ""),
            "warmup": warmup, "runs": runs * len(med), "min_ms": round(float(med.min()), 5),
            "median_ms": round(float(np.median(med)), 5), "p90_ms": round(float(np.percentile(med, 90)), 5),
            "max_ms": round(float(med.max()), 5), "gflops": round(item.gflops, 6), "mbytes": round(item.mbytes, 4),
            "host": host}


def _no_profile(runner) -> dict:
    import inspect

    return {"per_op": False} if "per_op" in inspect.signature(runner.time).parameters else {}


def write_csv(path: Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
