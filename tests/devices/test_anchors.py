"""Anchors: the user's own timings put a device's estimates on the user's setup (a user layer over the shipped
profile), with an interval that narrows as they agree; the learning loop adds every measurement slimx makes."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest

from slimx.cli import main
from slimx.devices import load_device
from slimx.devices.anchors import anchors_path, combine, combine_parts, part_spread, read_anchors, spread_prior
from slimx.devices.estimator import EstimatorLatencyModel, default_setting

MLP = "tests.models:tiny_mlp"
CONV = "tests.models:gate_mlp_wide"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def profile_json(capsys, model, device):
    code, out, _ = run(capsys, "profile", model, "--device", device, "--estimate", "--json", "-q")
    assert code == 0
    return json.loads(out)


def test_agreeing_anchors_narrow_the_interval_and_disagreeing_ones_are_said():
    one = combine([math.log(1.3)], prior_sd=0.25, prior_weight=6)
    three = combine([math.log(1.28), math.log(1.3), math.log(1.32)], prior_sd=0.25, prior_weight=6)
    assert one["factor"] == pytest.approx(1.3) and three["factor"] == pytest.approx(1.2998, rel=1e-3)
    width = lambda got: got["interval_factors"][1] / got["interval_factors"][0]  # noqa: E731
    assert width(three) < width(one), "more anchors that agree: a narrower interval"
    apart = combine([math.log(0.5), math.log(2.0), math.log(1.0)], prior_sd=0.25, prior_weight=6)
    assert apart["disagree"] and not three["disagree"] and width(apart) > width(three)
    assert spread_prior("jetson-nano", "tensorrt-gpu-fp16")["basis"] == "the jetson family"
    assert "default" in spread_prior("host")["basis"]


def test_a_setup_not_anchored_states_the_spread_between_setups():
    """Without anchors the user's setup is one the fit never saw: the interval adds the family's spread between
    setups, more so where it was measured on fewer setups; the measured host (slimx's own runner) is left alone."""
    from slimx.devices.anchors import unanchored, unanchored_interval

    lo, hi = unanchored_interval([0.8, 1.25], 0.5, setups=4)
    assert lo < 0.8 and hi > 1.25 and math.log(hi) == pytest.approx(-math.log(lo), rel=0.05)
    assert unanchored_interval([0.8, 1.25], 0.0, setups=4) == pytest.approx([0.8, 1.25])
    few = unanchored_interval([0.8, 1.25], 0.5, setups=2)
    assert few[0] < lo and few[1] > hi, "a spread measured on fewer setups: a wider interval"
    est = {"total_ms": 2.0, "interval_ms": [1.6, 2.5]}
    host = load_device("host")
    assert host.measured and unanchored(dict(est), host, default_setting(host)) == est
    nano = load_device("jetson-nano")
    got = unanchored(dict(est), nano, default_setting(nano, "fp16"))
    assert got["interval_ms"][0] < 1.6 and got["interval_ms"][1] > 2.5
    assert got["unanchored"]["profile_setup_interval_ms"] == [1.6, 2.5] and got["unanchored"]["setups"] == 3
    assert unanchored({"total_ms": 2.0, "interval_ms": None}, nano, default_setting(nano, "fp16"))["interval_ms"] \
        is None, "no interval (not calibrated): nothing to widen"


def test_a_line_in_op_density_carries_a_setups_per_layer_cost():
    """A setup whose per-layer cost differs from the profile's: the log ratio drifts with op density. Two anchors
    of different density put a third model nearer its truth than one factor does; one anchor cannot see a slope
    (the factor stays its own) but widens the interval of a model far from it in density."""
    truth = lambda z: 0.3 + 0.25 * z  # noqa: E731  log(measured / estimated) of the setup
    z = [-4.0, -1.0]
    line = combine([truth(v) for v in z], 0.15, 6, densities=z, target=0.5, slope_sd=0.2)
    flat = combine([truth(v) for v in z], 0.25, 6)
    assert abs(math.log(line["factor"]) - truth(0.5)) < abs(math.log(flat["factor"]) - truth(0.5)) / 2
    assert 0 < line["slope"] < 0.25, "the slope is shrunk toward 0, not taken whole from two anchors"
    lo, hi = line["interval_factors"]
    assert lo < math.exp(truth(0.5)) / line["factor"] < hi
    one_near = combine([0.3], 0.15, 6, densities=[-1.0], target=-1.0, slope_sd=0.2)
    one_far = combine([0.3], 0.15, 6, densities=[-1.0], target=2.0, slope_sd=0.2)
    assert one_near["factor"] == pytest.approx(one_far["factor"]) == pytest.approx(math.exp(0.3))
    width = lambda got: got["interval_factors"][1] / got["interval_factors"][0]  # noqa: E731
    assert width(one_far) > width(one_near)
    # anchors apart by far more than scatter and a plausible slope allow: still said
    assert combine([0.0, 2.5], 0.15, 6, densities=[-1.0, 0.0], slope_sd=0.2)["disagree"]
    assert not line["disagree"]


def test_a_factor_per_part_carries_a_setups_own_costs():
    """A setup whose per-layer work costs 3x the profile's and whose compute costs as priced: two anchors of
    different splits put a compute-bound model and a dispatch-bound one each near their truth, where one factor
    (or a line through the anchors' ratios) cannot tell the parts apart; the interval holds the truth; one anchor
    moves the part with the most room (the per-layer one) without claiming a narrow interval far from it; the
    family's spread of each part is learnt from setups that differ in one part only."""
    true = [1.0, 1.0, 3.0]
    ratio = lambda s: math.log(sum(a * b for a, b in zip(s, true, strict=True)))  # noqa: E731
    anchors = [[0.7, 0.1, 0.2], [0.3, 0.1, 0.6]]
    part_sd = [0.3, 0.3, 1.4]
    for target in ([0.95, 0.03, 0.02], [0.05, 0.05, 0.9]):
        got = combine_parts([ratio(s) for s in anchors], anchors, target, 0.15, part_sd, 6)
        one = combine([ratio(s) for s in anchors], 0.25, 6)
        assert abs(math.log(got["factor"]) - ratio(target)) < 0.1
        assert abs(math.log(got["factor"]) - ratio(target)) < abs(math.log(one["factor"]) - ratio(target)) / 2
        lo, hi = got["interval_factors"]
        assert lo < math.exp(ratio(target)) / got["factor"] < hi and not got["disagree"]
    assert got["part_factors"][2] > 2.0 and 0.7 < got["part_factors"][0] < 1.3
    single = combine_parts([ratio(anchors[1])], [anchors[1]], anchors[1], 0.15, part_sd, 6)
    far = combine_parts([ratio(anchors[1])], [anchors[1]], [0.95, 0.03, 0.02], 0.15, part_sd, 6)
    assert single["factor"] == pytest.approx(math.exp(ratio(anchors[1])), rel=0.05), "its own model: its own ratio"
    assert single["part_factors"][2] > single["part_factors"][0], "the per-layer part, the looser prior, moves most"
    width = lambda g: g["interval_factors"][1] / g["interval_factors"][0]  # noqa: E731
    assert width(far) > width(single)
    assert combine_parts([0.0, 2.5], anchors, None, 0.15, [0.3, 0.3, 0.3], 6)["disagree"]
    splits = [[0.9, 0.05, 0.05], [0.6, 0.1, 0.3], [0.3, 0.1, 0.6], [0.1, 0.1, 0.8]]
    spread = part_spread([([ratio(s) * f for s in splits], splits) for f in (-1.0, 0.0, 0.5, 1.0)], 0.05)
    assert spread["groups"] == 4 and spread["part_sd"][2] > 3 * spread["part_sd"][0]


def test_anchors_put_later_estimates_on_the_users_setup(capsys, scratch_profiles):
    profile_file = load_device("jetson-nano").raw  # the shipped profile, compared after
    before = profile_json(capsys, CONV, "jetson-nano")
    assert "anchors" not in before
    # no anchor: the interval is for a setup the profile never saw (the family's spread between setups in
    # quadrature with the profile's own interval, which is kept beside it)
    own, stated = before["unanchored"]["profile_setup_interval_ms"], before["interval_ms"]
    assert stated[0] < own[0] < before["total_ms"] < own[1] < stated[1]
    assert before["unanchored"]["setup_sd"] == spread_prior("jetson-nano", "tensorrt-gpu-fp16")["setup_sd"] > 0
    assert "for a setup not anchored" in before["label"] and "slimx devices anchor jetson-nano" in before["label"]
    code, out, _ = run(capsys, "devices", "anchor", "jetson-nano", "--setup", "trtexec, JetPack 6",
                       "--measured", f"{MLP}=0.9", "--measured", f"{CONV}={before['total_ms'] * 1.5:.6f}")
    assert code == 0 and "2 anchor(s)" in out and "trtexec, JetPack 6" in out, out
    state = read_anchors("jetson-nano")
    assert [a.source for a in state["anchors"]] == ["given", "given"]
    after = profile_json(capsys, CONV, "jetson-nano")
    rec = after["anchors"]
    assert rec["count"] == 2 and rec["setup"] == "trtexec, JetPack 6" and after["setup"] == "trtexec, JetPack 6"
    mlp_ratio = state["anchors"][0].measured_ms / state["anchors"][0].estimated_ms
    assert all(a.gmacs is not None and a.ops for a in state["anchors"]), "each anchor keeps its op mix"
    assert state["anchors"][0].density != pytest.approx(state["anchors"][1].density)
    # a factor per part: between the anchors' geometric mean and CONV's own ratio (1.5)
    factor = rec["factor"]
    assert min(math.sqrt(mlp_ratio * 1.5), 1.5) < factor < max(math.sqrt(mlp_ratio * 1.5), 1.5)
    assert all(a.shares and sum(a.shares) == pytest.approx(1, abs=1e-4) for a in state["anchors"])
    assert set(rec["part_factors"]) == {"compute", "memory", "per-layer"} and "one_factor" not in rec
    assert after["total_ms"] == pytest.approx(before["total_ms"] * factor, rel=1e-3)
    assert after["interval_ms"][0] < after["total_ms"] < after["interval_ms"][1]
    assert "unanchored" not in after, "anchored: the anchors' interval, not the unseen setup's"
    width = lambda e: e["interval_ms"][1] / e["interval_ms"][0]  # noqa: E731
    assert width(after) < width(before)
    assert "anchored to 'trtexec, JetPack 6' by 2 measurements" in after["label"]
    assert load_device("jetson-nano").raw == profile_file, "the shipped profile is never edited"
    # every estimating caller reads the same: latency-slim's latency model, and so sweeps and the gate
    from slimx.devices.estimator import estimate_latency
    from slimx.devices.opmix import op_mix
    from slimx.export.program import export_program
    from tests.models import gate_mlp_wide

    module = gate_mlp_wide()
    example = module.example_inputs()
    latency = EstimatorLatencyModel.for_device(load_device("jetson-nano"), "fp16")
    raw = estimate_latency(op_mix(export_program(module, example)), latency.profile, latency.setting,
                           anchored=False)["total_ms"]
    assert latency.latency(module, example)["ms"] == pytest.approx(raw * factor, rel=1e-3)
    code, out, _ = run(capsys, "gate", CONV, "--device", "jetson-nano", "--budget-ms", "1000", "--json", "-q")
    entry = json.loads(out)["entries"][0]
    assert code == 0 and entry["candidate"]["anchors"]["count"] == 2
    assert entry["candidate"]["estimate_ms"] == pytest.approx(after["total_ms"], rel=1e-3)


def test_anchor_refusals_and_housekeeping(capsys, scratch_profiles, tmp_path):
    code, out, _ = run(capsys, "devices", "anchor", "jetson-nano")
    assert code == 0 and "no anchors" in out and "for a setup not anchored" in out and "jetson family" in out
    assert run(capsys, "devices", "anchor", "jetson-nano", "--measured", f"{MLP}=-3")[0] == 2
    assert run(capsys, "devices", "anchor", "jetson-nano", "--measured", "no-equals-sign")[0] == 2
    assert run(capsys, "devices", "anchor", "jetson-nano", "--models", "timm:resnet18")[0] == 2
    assert not anchors_path("jetson-nano").exists(), "nothing written by a refused command"
    table = tmp_path / "mine.csv"
    table.write_text(f"model,latency_ms\n{MLP},0.8\n{CONV},3.0\n")
    code, out, _ = run(capsys, "devices", "anchor", "jetson-nano", "--csv", str(table), "--setup", "A")
    assert code == 0 and "2 anchor(s)" in out
    code, _, err = run(capsys, "devices", "anchor", "jetson-nano", "--measured", f"{MLP}=0.8", "--setup", "B")
    assert code == 2 and "--replace" in err, "anchors of two setups are never mixed silently"
    assert run(capsys, "devices", "anchor", "jetson-nano", "--measured", f"{MLP}=0.8", "--setup", "B",
               "--replace")[0] == 0
    assert [a.model for a in read_anchors("jetson-nano")["anchors"]] == [MLP]
    # anchors that disagree far beyond one setup's spread: the command and every estimate say so
    code, out, _ = run(capsys, "devices", "anchor", "jetson-nano", "--measured", f"{CONV}=500")
    assert code == 0 and "NOTE the anchors of jetson-nano disagree" in out, out
    assert "disagree" in profile_json(capsys, CONV, "jetson-nano")["label"]
    # an anchor taken against another fit (the profile was recalibrated) is left out until refreshed
    data = json.loads(anchors_path("jetson-nano").read_text())
    fits = [a["fit"] for a in data["anchors"]]
    for a in data["anchors"]:
        a["fit"] = "0" * 12
    anchors_path("jetson-nano").write_text(json.dumps(data))
    stale = profile_json(capsys, CONV, "jetson-nano")
    assert "--refresh" in stale["label"] and "unanchored" in stale, "no anchor used: a setup not anchored"
    # anchors written by an older slimx: with the op mix and no split, the line in op density; with neither, one
    # factor for every model; each said in the record
    for a, fit in zip(data["anchors"], fits, strict=True):
        a.update(fit=fit, shares=None)
    anchors_path("jetson-nano").write_text(json.dumps(data))
    rec = profile_json(capsys, CONV, "jetson-nano")["anchors"]
    assert rec["density_slope"] is not None and "part_factors" not in rec and "--refresh" in rec["no_split"]
    for a in data["anchors"]:
        a.update(gmacs=None, ops=None)
    anchors_path("jetson-nano").write_text(json.dumps(data))
    rec = profile_json(capsys, CONV, "jetson-nano")["anchors"]
    assert rec["count"] == 2 and rec["density_slope"] is None and "--refresh" in rec["one_factor"]
    assert run(capsys, "devices", "anchor", "jetson-nano", "--refresh")[0] == 0
    assert all(a.gmacs is not None and a.shares for a in read_anchors("jetson-nano")["anchors"]), \
        "--refresh records the op mix and the split"
    assert "part_factors" in profile_json(capsys, CONV, "jetson-nano")["anchors"]
    assert profile_json(capsys, CONV, "jetson-nano")["anchors"]["count"] == 2
    assert run(capsys, "devices", "anchor", "jetson-nano", "--clear")[0] == 0
    assert not anchors_path("jetson-nano").exists()
    assert "anchors" not in profile_json(capsys, CONV, "jetson-nano")


def test_measurements_are_learned_from_profile_and_gate(capsys, scratch_profiles):
    code, out, _ = run(capsys, "profile", MLP, "--device", "host", "--learn", "--runs", "5", "--warmup", "1",
                       "--json", "-q")
    got = json.loads(out)
    assert code == 0 and got["learned"]["anchors"] == 1 and got["kind"] == "measured"
    (anchor,) = read_anchors("host")["anchors"]
    assert anchor.source.startswith("learned: slimx profile") and anchor.measured_ms == pytest.approx(
        got["median_ms"])
    est = profile_json(capsys, MLP, "host")
    # one anchor of the same model: the estimate is its measurement, less the little the parts' prior holds back
    # (the scatter of one setup's models against how far setups move each part)
    assert est["anchors"]["count"] == 1 and est["total_ms"] == pytest.approx(got["median_ms"], rel=0.05)
    assert est["interval_ms"][0] < got["median_ms"] < est["interval_ms"][1]
    code, _, err = run(capsys, "profile", MLP, "--device", "host", "--estimate", "--learn")
    assert code == 2 and "--learn" in err
    code, out, _ = run(capsys, "gate", CONV, "--device", "host", "--budget-ms", "10000", "--learn", "--rounds", "3",
                       "--runs", "5", "--warmup", "1", "--json", "-q")
    assert code == 0 and json.loads(out)["entries"][0]["learned"]["anchors"] == 2
    assert sorted(a.model for a in read_anchors("host")["anchors"]) == sorted([MLP, CONV])


def test_an_exports_host_measurement_is_learned(capsys, scratch_profiles, tmp_path):
    code, _, _ = run(capsys, "export", CONV, "--learn", "--runs", "30", "--warmup", "1", "--out", str(tmp_path / "a"),
                     "-q")
    learned = json.loads((tmp_path / "a" / "report.json").read_text())["latency"]["learned"]
    assert code == 0 and learned["learned"] and learned["anchors"] == 1
    (anchor,) = read_anchors("host")["anchors"]
    assert anchor.model == CONV and anchor.source == "learned: slimx export on this host"
    code, _, _ = run(capsys, "export", CONV, "--learn", "--pass", "lowrank:rank_ratio=0.5", "--runs", "30",
                     "--warmup", "1", "--min-fidelity", "0.01", "--out", str(tmp_path / "b"), "-q")
    learned = json.loads((tmp_path / "b" / "report.json").read_text())["latency"]["learned"]
    assert not learned["learned"] and "compressed" in learned["why"], "a compressed model is not its MODEL spec"
    assert len(read_anchors("host")["anchors"]) == 1


def test_anchors_from_a_running_agent(capsys, scratch_profiles, tmp_path):
    from tests.devices.test_agent import TOKEN, _Server

    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o600)
    server = _Server(job_timeout=120)
    try:
        code, out, _ = run(capsys, "devices", "anchor", "host", "--from-agent", server.url, "--token-file",
                           str(token), "--models", f"{MLP},{CONV}", "--setup", "agent on this host")
    finally:
        server.close()
    assert code == 0, out
    anchors = read_anchors("host")["anchors"]
    assert [a.model for a in anchors] == [MLP, CONV]
    assert all(a.source == f"agent {server.url}" and a.measured_ms > 0 for a in anchors)
    assert hashlib.sha256(anchors_path("host").read_bytes()).hexdigest()  # written whole, readable
    assert default_setting(load_device("host")).key == anchors[0].setting
