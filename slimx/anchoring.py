"""``slimx devices anchor DEVICE``: record timings of the user's own setup (given, from a CSV, or timed on a
running agent), list, refresh or clear them (``devices.anchors`` applies them to every estimate)."""

from __future__ import annotations

import math

from slimx._core.errors import UsageError
from slimx.devices.anchor_cmd import add, parse_measured, read_csv, refresh, split_model, summary

# timed by ``--from-agent`` unless ``--models`` says otherwise: three families the published tables have (a
# depthwise CNN, a plain residual CNN, a vision transformer), small enough to export in a minute each
STANDARD_SET = ("timm:mobilenetv2_100@224", "timm:resnet18@224", "timm:efficientformer_l1@224")


def from_agent(device, setting, url: str, token: str, models: list[str], progress=None
               ) -> list[tuple[str, list[str], float]]:
    """Time ``models`` on the agent at ``url`` (each exported here for the device, run there)."""
    from slimx.profiling import ProfileRequest, profile

    out = []
    for i, text in enumerate(models, start=1):
        model, shapes = split_model(text)
        if progress is not None:
            progress.note(f"[{i}/{len(models)}] timing {text} on the agent at {url}")
        got = profile(ProfileRequest(subject=model, device=device.name, remote=url, token=token, mode="measure",
                                     input_shapes=tuple(shapes), precision=setting.dtype), progress)
        out.append((model, shapes, float(got["median_ms"])))
    return out


def anchor_command(args) -> int:
    """``slimx devices anchor DEVICE ...``: add, list, refresh or clear a device's anchors."""
    import json

    from slimx._core.progress import Progress
    from slimx.devices import load_device
    from slimx.devices.anchors import anchors_path, clear
    from slimx.devices.estimator import default_setting, settings_of

    if not args.name:
        raise UsageError("slimx devices anchor", "needs a device name",
                         "e.g. slimx devices anchor jetson-orin-nano --measured timm:resnet18@224=4.1")
    device = load_device(args.name)
    if args.clear:
        if args.measured or args.csv or args.from_agent or args.refresh:
            raise UsageError("--clear", "deletes the anchors, and other flags add or refresh them", "use it alone")
        existed = clear(device.name)
        print(f"{device.name}: anchors deleted" if existed else f"{device.name}: had no anchors")
        return 0
    if args.setting and len(args.setting) > 1:
        raise UsageError("--setting", "anchors one setting at a time", "give one --setting")
    settings = settings_of(device)
    if args.setting and args.setting[0] not in settings:
        raise UsageError(f"--setting {args.setting[0]}", f"is not an estimator setting of {device.name}",
                         f"use one of {', '.join(settings) or '(none)'}")
    setting = settings[args.setting[0]] if args.setting else default_setting(device)
    if args.models and not args.from_agent:
        raise UsageError("--models", "chooses what --from-agent times", "add --from-agent URL or drop --models")
    if bool(args.token_file) != bool(args.from_agent):
        raise UsageError("--from-agent" if args.from_agent else "--token-file",
                         "needs the agent's token file" if args.from_agent else "is only used with --from-agent",
                         "add --token-file FILE" if args.from_agent else "add --from-agent URL or drop it")
    progress = Progress(total=1, enabled=not args.json)
    if args.refresh:
        got = refresh(device, progress)
        print(json.dumps(got) if args.json else
              f"{device.name}: {got['refreshed']} anchor(s) re-estimated against the current profile"
              + (f", {got['dropped']} dropped (their setting is gone)" if got["dropped"] else ""))
        return 0
    measurements = parse_measured(args.measured)
    if args.csv:
        measurements += read_csv(args.csv)
    if args.from_agent:
        from slimx.devices.agent import read_token

        token = read_token(args.token_file, allow_insecure=args.allow_insecure_token_file)
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(STANDARD_SET)
        measurements += from_agent(device, setting, args.from_agent, token, models, progress)
        source = f"agent {args.from_agent}"
    else:
        source = "given"
    if measurements:
        result = add(device, setting, measurements, source, setup=args.setup, replace=args.replace,
                     progress=progress)
    elif args.replace or args.setup:
        raise UsageError("--replace/--setup", "apply to anchors being added", "add --measured, --csv or --from-agent")
    else:
        result = summary(device, setting) | {"path": str(anchors_path(device.name))}
    print(json.dumps(result, indent=2) if args.json else render_summary(result))
    return 0


def render_summary(result: dict) -> str:
    if not result["anchors"]:
        between = result.get("between_setups")
        why = (f" (until then its estimates state their interval for a setup not anchored: a setup's own factor is "
               f"x{math.exp(between['setup_sd']):.2f} either way, 1 sd, in {between['basis']})" if between else "")
        return (f"{result['device']} ({result['setting']}): no anchors; add your own timings with "
                f"`slimx devices anchor {result['device']} --measured MODEL=MS`{why}")
    lines = [f"{result['device']} ({result['setting']}), setup {result['setup']!r}: {result['count']} anchor(s)"
             + (f", {result['stale']} taken against an older fit (--refresh)" if result["stale"] else "")]
    for a in result["anchors"]:
        shape = f" {a['input_shapes'][0]}" if a["input_shapes"] else ""
        lines.append(f"  {a['model']}{shape:<16} measured {a['measured_ms']:>9.3f} ms  estimated "
                     f"{a['estimated_ms']:>9.3f} ms  x{a['ratio']:.3f}  ({a['source']})")
    if "factor" in result:
        lo, hi = result["interval_factors"]
        where = (" for a model split like the anchors'" if result.get("part_factors")
                 else " at the anchors' op density" if result.get("density_slope") is not None else "")
        lines.append(f"  estimates for {result['device']} are now x{result['factor']:.3f} the profile's{where}, 80% "
                     f"interval x{lo:.2f}-x{hi:.2f} around that (spread prior: {result['prior_basis']})")
        if result.get("part_factors"):
            parts = ", ".join(f"{name} x{v:.3f}" for name, v in result["part_factors"].items())
            lines.append(f"  per part of the estimate: {parts} (this setup's own costs, from the anchors, each shrunk "
                         "toward the profile's by how far the family's setups move it); a model's factor is its "
                         "parts' factors weighted by its own split")
        elif result.get("density_slope") is not None:
            lines.append(f"  and x{math.exp(result['density_slope']):.3f} more per unit of op density (log thousands "
                         "of ops per GMAC): this setup's per-layer cost against its compute, from the anchors, shrunk "
                         "toward the profile's")
        elif result.get("one_factor"):
            lines.append(f"  one factor for every model: {result['one_factor']}")
        if result.get("no_split"):
            lines.append(f"  {result['no_split']}")
    if result.get("note"):
        lines.append(f"  NOTE {result['note']}")
    if result.get("path"):
        lines.append(f"  anchors file: {result['path']}")
    return "\n".join(lines)
