"""The model in its deployment form: eval mode, structural reparameterization, batch norms folded."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from slimx._core.errors import SlimxFailure, first_line

_CONV_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default")
_LINEAR_OPS = ("aten.linear.default",)
_BN_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")


@dataclass
class DeployRecord:
    reparameterized: list[str] = field(default_factory=list)
    folded: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    check: dict | None = None

    def to_dict(self) -> dict:
        return {"reparameterized": self.reparameterized, "bn_folded": self.folded, "notes": self.skipped,
                "vs_original": self.check}


def to_deployment(module, example_inputs: tuple, inplace: bool = False):
    """Return ``module`` in deployment form and a record of what changed.

    Steps: ``eval()``; reparameterize modules that know how (timm's convention: ``fuse()``,
    ``reparameterize()``, ``switch_to_deploy()``, as in MobileOne, FastViT, RepViT); fold each
    batch norm into the convolution or linear that feeds it directly (found from the exported
    graph, so only true producer -> BN pairs are folded).
    """
    import torch

    model = module if inplace else copy.deepcopy(module)
    model.eval()
    record = DeployRecord()
    _reparameterize(model, "", record)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        for pair in plan_bn_folds(model, example_inputs, record):
            _fold(model, pair)
            record.folded.append(pair)
    if record.reparameterized or record.folded:
        record.check = _check_same_function(module, model, example_inputs)
    return model, record


# a rewrite that moves outputs by more than this is a bug, not rounding
_MAX_REWRITE_REL_ERR = 1e-3


def _check_same_function(original, deployed, example_inputs: tuple) -> dict:
    """The deployment form must compute what the original computes (up to float rounding)."""
    from slimx.export.parity import compare_outputs, torch_outputs

    was_training = original.training
    original.eval()
    try:
        stats = compare_outputs(torch_outputs(original, example_inputs), torch_outputs(deployed, example_inputs))
    finally:
        original.train(was_training)
    stats.pop("per_output")
    if stats["rel_err"] > _MAX_REWRITE_REL_ERR:
        raise SlimxFailure("deployment form", f"reparameterization / batch-norm folding changed the outputs "
                           f"(rel err {stats['rel_err']:.2e})", "report this model; run with --debug for details")
    return stats


def _reparameterize(module, prefix: str, record: DeployRecord) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if callable(getattr(child, "fuse", None)) and not isinstance(child, _plain_types()):
            fused = child.fuse()
            if fused is not None and fused is not child:
                setattr(module, name, fused)
            record.reparameterized.append(path)
        elif callable(getattr(child, "reparameterize", None)):
            child.reparameterize()
            record.reparameterized.append(path)
        elif callable(getattr(child, "switch_to_deploy", None)):
            child.switch_to_deploy()
            record.reparameterized.append(path)
        else:
            _reparameterize(child, f"{path}.", record)


def _plain_types():
    import torch

    return (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def plan_bn_folds(model, example_inputs: tuple, record: DeployRecord) -> list[dict]:
    """Find (producer, batch norm) module pairs that can be folded, from the exported graph."""
    import torch

    try:
        program = torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as exc:  # the real export later reports this properly
        record.skipped.append(f"batch-norm folding skipped: export failed ({first_line(exc)})")
        return []
    calls: dict[str, int] = {}
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    for node in nodes:
        path = _module_path(node)
        if path is not None:
            calls[(path, str(node.target))] = calls.get((path, str(node.target)), 0) + 1
    plan = []
    for node in nodes:
        if str(node.target) not in _BN_OPS:
            continue
        producer = node.args[0]
        target = str(getattr(producer, "target", ""))
        if target not in _CONV_OPS + _LINEAR_OPS or len(producer.users) != 1:
            continue
        bn_path, src_path = _module_path(node), _module_path(producer)
        if bn_path is None or src_path is None:
            continue
        if calls.get((bn_path, str(node.target))) != 1 or calls.get((src_path, target)) != 1:
            continue  # a module called twice cannot be folded for one call alone
        bn = model.get_submodule(bn_path)
        src = model.get_submodule(src_path)
        if bn.running_mean is None or bn.running_var is None:
            continue
        if _bn_remainder(bn) is None:
            record.skipped.append(f"{bn_path}: {type(bn).__name__} does more than normalize; not folded")
            continue
        kind = "linear" if target in _LINEAR_OPS else "conv"
        if kind == "linear" and (not isinstance(src, torch.nn.Linear) or src.out_features != bn.num_features):
            continue
        if (kind == "conv" and not isinstance(src, torch.nn.modules.conv._ConvNd)) or (
                kind == "conv" and getattr(src, "transposed", False)):
            continue
        plan.append({"into": src_path, "bn": bn_path, "kind": kind})
    return plan


def _module_path(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _fold(model, pair: dict) -> None:
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

    src = model.get_submodule(pair["into"])
    bn = model.get_submodule(pair["bn"])
    with torch.no_grad():
        if pair["kind"] == "conv":
            weight, bias = fuse_conv_bn_weights(src.weight, src.bias, bn.running_mean, bn.running_var,
                                                bn.eps, bn.weight, bn.bias)
        else:
            weight, bias = fuse_linear_bn_weights(src.weight, src.bias, bn.running_mean, bn.running_var,
                                                  bn.eps, bn.weight, bn.bias)
    src.weight = weight
    src.bias = bias
    parent_path, _, name = pair["bn"].rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, _bn_remainder(bn))


def _bn_remainder(bn):
    """What is left of a batch norm module once its normalization is folded away, or None if unknown.

    Plain ``BatchNorm1d/2d/3d`` leave nothing. timm's ``BatchNormAct2d`` also applies dropout and an
    activation after normalizing; those stay. Any other subclass may do more, so it is not folded.
    """
    import torch

    if type(bn) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
        return torch.nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return torch.nn.Sequential(bn.drop, bn.act)
    return None
