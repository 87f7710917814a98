"""Running passes on a model and judging what they cost: held-out fidelity after each pass (and after recovery),
gated like parity, with the pass that lost the most and what to try named by that pass (``register_pass``'s
``fix_hint``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from slimx._core.errors import SlimxFailure
from slimx._core.inputs import mask_index_of
from slimx.slim.base import PASSES, PassContext, finalize, recipe_text
from slimx.slim.fidelity import torch_fidelity
from slimx.slim.reconstruct import reconstruct as refit_layers
from slimx.slim.reconstruct import summary as reconstruction_summary
from slimx.slim.recover import recover

HELDOUT_CAP = 1024  # fidelity samples at most (a quarter of the data, up to this): the rest is fit data
REFIT_SAMPLES = 2048  # fit samples the least-squares refit after each pass uses (it runs the model once per cut
# layer over them: on MiniLM after fisher-prune keep 0.58, 9,000 sentences cost about five minutes, and the
# mean held-out refit error was 0.292 with 9,000, 0.287 with 3,000 and 0.296 with 2,048: no gain from more)
PASS_CALIB_CAP = 1024  # calibration samples the passes use by default (all the data given, up to this)
SYNTHETIC_PASS_SAMPLES = 64  # without --calib: random inputs carry no information, and every pass step costs a
# forward over its validation share (EfficientFormer-L3's slimming over 1024 random images took minutes a candidate)
DEFAULT_MIN_FIDELITY = 0.95  # held-out cosine to the original, for embedding (unlabelled) outputs
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of held-out accuracy, with --labels


def run_passes(module, specs: list, batches: list[tuple], *, synthetic: bool, source: str, progress,
               labels: list[int] | None = None, input_names: list[str] = (), device=None, latency_model=None,
               recover_cfg=None, recipe_quant: dict | None = None, min_fidelity: float | None = None,
               max_accuracy_drop: float | None = None, reconstruct: bool = True) -> dict:
    """Apply the passes (then recovery) to ``module``; fidelity on held-out samples after each.

    ``reconstruct``: after each pass, refit by least squares the maps it cut or factorized so that each layer
    gives, on the calibration samples, what it gave before the pass (``slim.reconstruct``).

    ``batches`` are the calibration samples (a quarter held out from eight on, at most ``HELDOUT_CAP``, for
    fidelity), ``labels`` one task label per sample where given; returns the report's compression record with the
    compressed ``model`` (in its deployable form) and the fidelity ``gate``.
    """
    held = min(max(2, len(batches) // 4), HELDOUT_CAP) if len(batches) >= 8 else 0
    fit, heldout = (batches[:-held], batches[-held:]) if held else (batches, batches)
    fit_labels, held_labels = ((labels[:-held], labels[-held:]) if held else (labels, labels)) if labels else (None,
                                                                                                               None)
    data = (f"{len(heldout)} held-out SYNTHETIC samples of {source.removeprefix('synthetic ')}" if synthetic else
            f"{len(heldout)} held-out samples of {source}")
    if not held:
        data += " (too few to hold any out: in-sample)"
    mask_index = mask_index_of(list(input_names))
    ctx = PassContext(calib=fit, synthetic=synthetic, teacher=module, device=device, progress=progress,
                      mask_index=mask_index, latency_model=latency_model, labels=fit_labels)
    teacher = module
    model = module
    records = []
    for spec in specs:
        result = PASSES.get(spec.name).fn(model, spec.config, ctx)
        entry = result.to_dict()
        if reconstruct:
            layers = refit_layers(result.model, model, fit[:REFIT_SAMPLES], mask_index, reference=teacher,
                                  progress=progress)
            if layers:
                entry["reconstruction"] = {"summary": reconstruction_summary(layers), "layers": layers}
                progress.note(f"{spec.name}: reconstructed {entry['reconstruction']['summary']['refit']} of "
                              f"{len(layers)} cut layer(s) by least squares")
        model = result.model
        entry["fidelity"] = torch_fidelity(teacher, model, heldout, held_labels)
        records.append(entry)
        progress.note(f"{spec.name}: {result.summary}; held-out cosine {entry['fidelity']['cosine_mean']:.4f}")
    out = {"model": model, "passes": records, "recipe": recipe_text(specs, recipe_quant or None), "calibration": {
        "source": source, "fit_samples": len(fit), "heldout_samples": len(heldout), "synthetic": synthetic}}
    out["fidelity"] = {"data": data, "after_passes": records[-1]["fidelity"]}
    if recover_cfg is not None:
        model, record = recover(model, teacher, fit, recover_cfg, progress, mask_index=mask_index,
                                labels=fit_labels)
        out["recover"] = {"config": dataclasses.asdict(recover_cfg), **record}
        out["fidelity"]["after_recover"] = torch_fidelity(teacher, model, heldout, held_labels)
        progress.note(f"recovered: held-out cosine {out['fidelity']['after_recover']['cosine_mean']:.4f}")
    out["fidelity"]["final"] = out["fidelity"].get("after_recover", out["fidelity"]["after_passes"])
    out["gate"] = fidelity_gate(out["fidelity"]["final"], records, min_fidelity, max_accuracy_drop,
                                bool(held_labels), recover_cfg is not None, synthetic)
    out["model"] = finalize(model)  # deployable form (e.g. dense-sparse layers as two plain linears)
    return out


def fidelity_gate(final: dict, records: list[dict], min_fidelity: float | None, max_accuracy_drop: float | None,
                  labelled: bool, recovered: bool, synthetic: bool = False) -> dict:
    """Fidelity judged like parity: held-out cosine to the original at or above the floor (with labels: accuracy
    at most ``max_accuracy_drop`` points below the original's), and which pass lost the most. On synthetic
    calibration inputs the figure is reported but does not fail the run (it says nothing about real data)."""
    if labelled and "accuracy" in final:
        drop = DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop
        value = round((final["accuracy_reference"] - final["accuracy"]) * 100, 2)
        gate = {"metric": "held-out accuracy drop (points)", "value": value, "floor": drop, "passed": value <= drop,
                "accuracy": final["accuracy"], "accuracy_reference": final["accuracy_reference"]}
        key, start = "accuracy", final["accuracy_reference"]
    else:
        floor = DEFAULT_MIN_FIDELITY if min_fidelity is None else min_fidelity
        gate = {"metric": "held-out cosine to the original", "value": final["cosine_mean"], "floor": floor,
                "passed": final["cosine_mean"] >= floor}
        key, start = "cosine_mean", 1.0
    previous, worst = start, None
    for record in records:  # what each pass cost, before recovery
        now = record["fidelity"].get(key, previous)
        lost = previous - now
        if worst is None or lost > worst["lost"]:
            worst = {"pass": record["name"], "before": round(previous, 4), "after": round(now, 4),
                     "lost": round(lost, 4)}
        previous = now
    gate["lost_most"] = worst
    gate["recovered"] = recovered
    gate["gated"] = not synthetic
    if synthetic:
        gate["why"] = "not gated: measured on synthetic calibration inputs, which say nothing about real data"
    return gate


def fidelity_failure(record: dict | None, out: Path) -> SlimxFailure | None:
    """The failure to raise (exit 1, report kept) when the compressed model's held-out fidelity is below the
    floor; None when it passed or was not gated. The fix names what the pass that lost the most registered."""
    gate = (record or {}).get("gate")
    if not gate or gate["passed"] or not gate.get("gated", True):
        return None
    worst = gate.get("lost_most") or {}
    name = worst.get("pass", "the passes")
    hint = PASSES.get(name).fix_hint if name in PASSES else "milder settings"
    more = "" if gate.get("recovered") else ", or --recover steps=300"
    if gate["metric"].startswith("held-out accuracy"):
        what = (f"held-out accuracy {gate['accuracy']:.4f} is {gate['value']:.2f} points below the original's "
                f"{gate['accuracy_reference']:.4f} (at most {gate['floor']:g} allowed, --max-accuracy-drop)")
    else:
        what = f"held-out cosine {gate['value']:.4f} is below --min-fidelity {gate['floor']:g}"
    lost = (f"; {name} lost the most ({worst['before']:.4f} -> {worst['after']:.4f})" if worst else "")
    return SlimxFailure("fidelity of the compressed model", f"{what}{lost}; the report is in {out / 'report.json'}",
                       f"try {name} with {hint}{more}, or more --calib data")
