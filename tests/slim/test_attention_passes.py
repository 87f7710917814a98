"""EcoFormer, AxFormer and hard attention: what each computes, its decisions and its report, and that every one
exports to ONNX and TFLite with parity in their runtimes and converts to CoreML."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from slimx.cli import main
from slimx.slim import PassContext, run_pass
from slimx.slim.attention import attention_modules, blocks
from slimx.slim.axformer import AxFormerConfig
from slimx.slim.ecoformer import EcoFormerConfig, HashedLinearKernel
from slimx.slim.hardattention import HardAttentionConfig

FAST = ["--runs", "30", "--warmup", "1", "-q"]


def vit_factory():
    """A small timm ViT (16 tokens of width 64): the family the adapters know, fast to convert."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=64, num_heads=4, num_classes=10).eval()
    model.example_inputs = lambda: (torch.randn(1, 3, 32, 32),)
    return model


def _calib(n: int = 24, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(n)]


def test_hashed_kernel_is_the_exact_expansion_and_skips_padding():
    torch.manual_seed(0)
    heads, n, d, m, b = 2, 7, 8, 6, 5
    kernel = HashedLinearKernel(torch.randn(heads, m, d), torch.randn(heads, b, m), torch.zeros(heads, 1, m),
                                torch.ones(heads, 1, 1)).eval()
    q, k, v = torch.randn(1, heads, n, d), torch.randn(1, heads, n, d), torch.randn(1, heads, n, 3)
    keys = torch.ones(1, n, dtype=torch.bool)
    keys[0, 5:] = False
    got = kernel(q, k, v, 1.0, key_mask=keys)
    hq, hk = kernel.codes(q), kernel.codes(k)
    sim = hq @ hk.transpose(-2, -1) + b + 1  # s_ij = h_i . h_j + b + 1 >= 1
    assert sim.min() >= 1
    sim = sim * keys[:, None, None, :]
    expected = (sim @ v) / sim.sum(-1, keepdim=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ecoformer_declines_at_short_lengths_and_replaces_where_asked():
    model = vit_factory()
    from slimx.devices import load_device
    from slimx.devices.estimator import EstimatorLatencyModel

    ctx = PassContext(calib=_calib(), teacher=model,
                      latency_model=EstimatorLatencyModel.for_device(load_device("host"), "fp32"))
    declined = run_pass("ecoformer", model, EcoFormerConfig(steps=2, anchors=8, bits=4), ctx)
    assert declined.summary["replaced"] == 0
    assert all("declined" in layer["skipped"] and "tokens" in layer["skipped"] for layer in declined.layers)
    forced = run_pass("ecoformer", model, EcoFormerConfig(steps=5, anchors=8, bits=8, decide="always"), ctx)
    assert forced.summary["replaced"] == 2
    kernels = [type(m.kernel).__name__ for m in forced.model.modules() if hasattr(m, "kernel")]
    assert kernels == ["HashedLinearKernel", "HashedLinearKernel"]
    x = _calib(1, seed=9)[0]
    with torch.no_grad():
        a, b = model(*x), forced.model(*x)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert torch.isfinite(b).all() and cos > 0.5, cos


def test_axformer_removes_by_the_rule_and_reports_every_trial():
    model = vit_factory()
    calib = _calib(32)
    strict = run_pass("axformer", model, AxFormerConfig(tolerance=0.0, units=False), PassContext(calib=calib,
                                                                                             teacher=model))
    assert strict.summary["accepted"] == 0, "an embedding model at loss 0 gives nothing up at zero tolerance"
    assert {t["remove"] for t in strict.extra["trials"]} == {"ffn", "attention"}
    loose = run_pass("axformer", model, AxFormerConfig(tolerance=0.3), PassContext(calib=calib, teacher=model))
    trials = loose.extra["trials"]
    assert trials[0]["block"] == "blocks.1" and trials[0]["remove"] == "ffn", "the last block first, FFN first"
    assert loose.summary["accepted"] >= 1 and loose.summary["params_after"] < loose.summary["params_before"]
    assert all({"loss", "samples_no_worse", "accepted"} <= set(t) for t in trials)
    assert loose.summary["validation_loss_after"] <= 0.3 + 1e-6
    removed = [layer["removed"] for layer in loose.layers]
    assert any(removed), "the report lists what was removed per block"


def test_axformer_recovers_after_each_accepted_removal():
    model = vit_factory()
    calib = _calib(32)
    result = run_pass("axformer", model, AxFormerConfig(tolerance=0.3, recover_steps=3),
                      PassContext(calib=calib, teacher=model))
    accepted = [t for t in result.extra["trials"] if t["accepted"]]
    assert accepted and all("loss_after_recovery" in t for t in accepted)
    assert all("loss_after_recovery" not in t for t in result.extra["trials"] if not t["accepted"])
    with pytest.raises(ValueError, match="recover_steps"):
        AxFormerConfig(recover_steps=-1)


def test_axformer_stops_at_the_speed_asked_for():
    """speedup=X: the search ends once the latency model's estimate is the original's / X, where a loose
    tolerance alone goes on cutting; without a latency model it is refused in one line."""
    from slimx._core.errors import UsageError
    from slimx.devices import load_device
    from slimx.devices.estimator import EstimatorLatencyModel

    model = vit_factory()
    ctx = PassContext(calib=_calib(32), teacher=model,
                      latency_model=EstimatorLatencyModel.for_device(load_device("host"), "fp32"))
    free = run_pass("axformer", model, AxFormerConfig(tolerance=1.0, units=False), ctx)
    goal = run_pass("axformer", model, AxFormerConfig(tolerance=1.0, units=False, speedup=1.1), ctx)
    full = free.summary["latency_before_ms"] / free.summary["latency_after_ms"]
    assert full > 1.1 and free.summary["accepted"] == len(free.extra["trials"]) == 4, free.summary
    got = goal.summary["latency_before_ms"] / goal.summary["latency_after_ms"]
    assert goal.summary["stopped_at_speedup"] and got >= 1.1 and got < full, goal.summary
    assert len(goal.extra["trials"]) < len(free.extra["trials"])
    assert not free.summary["stopped_at_speedup"] and free.summary["speedup_goal"] is None
    with pytest.raises(UsageError, match="no latency model"):
        run_pass("axformer", model, AxFormerConfig(tolerance=1.0, speedup=1.5), PassContext(calib=_calib(32),
                                                                                          teacher=model))
    with pytest.raises(ValueError, match="speedup"):
        AxFormerConfig(speedup=1.0)


def test_axformer_with_labels_judges_task_loss():
    model = vit_factory()
    calib = _calib(32)
    with torch.no_grad():
        labels = [int(model(*b).argmax()) for b in calib]
    result = run_pass("axformer", model, AxFormerConfig(), PassContext(calib=calib, teacher=model, labels=labels))
    assert result.summary["loss"] == "cross-entropy" and result.summary["tolerance"] == 0.0
    assert result.summary["validation_accuracy_before"] == 1.0


def test_hard_attention_keeps_what_the_rule_accepts():
    model = vit_factory()
    result = run_pass("hard-attention", model, HardAttentionConfig(k=4, tolerance=1.0),
                      PassContext(calib=_calib(), teacher=model))
    assert result.summary["accepted"] == 2 and all(layer["accepted"] for layer in result.layers)
    assert [type(m.kernel).__name__ for m in result.model.modules() if hasattr(m, "kernel")] == \
        ["TopKSoftmaxKernel"] * 2
    # a selection in the graph: parity is asked to allow float-level near-ties to keep other keys
    from slimx.export.parity import selection_tolerance

    asked = selection_tolerance({"passes": [result.to_dict()]})
    assert asked["max_rel_err"] == 1e-2 and "top-4" in asked["why"]
    assert selection_tolerance({"passes": [{"name": "lowrank"}]}) is None


@pytest.mark.parametrize("spec", ["ecoformer:decide=always,steps=3,anchors=8,bits=8",
                                  "axformer:tolerance=0.5", "hard-attention:k=6,tolerance=1.0"])
@pytest.mark.parametrize("target", ["host", "pixel7", "iphone15pro"])
def test_every_attention_pass_exports_with_parity(tmp_path, capsys, spec, target):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((24, 3, 32, 32))
             .astype(np.float32))
    out = tmp_path / "o"
    code = main(["export", "tests.slim.test_attention_passes:vit_factory", "--target", target, "--calib",
                 str(tmp_path / "calib.npz"), "--pass", spec, "--min-fidelity", "0.1", "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["name"] == spec.split(":")[0]
    parity = report["parity"]
    if target == "iphone15pro":  # CoreML converts here; its predictions need macOS
        assert not parity["measured"] and "macOS" in parity["reason"]
        assert report["compile"]["verified"] and (out / "model.mlpackage").is_dir()
    else:
        assert parity["measured"] and parity["passed"], parity
        assert parity["runtime"] == ("onnxruntime" if target == "host" else "litert")


def test_structure_changes_survive_export(tmp_path):
    model = copy.deepcopy(vit_factory())
    for block in blocks(model)[:1]:
        block.remove_attention(model)
    assert [v.path for v in attention_modules(model)] == ["blocks.1.attn"]
    torch.export.export(model, model.example_inputs(), strict=False)
