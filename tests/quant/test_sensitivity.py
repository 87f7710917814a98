import torch
from torch import nn

from slimx.quant.sensitivity import DEFAULT_SQNR_FLOOR_DB, guarded_int8, input_sqnr_db


class Outliers(nn.Module):
    """``calm`` sees well-spread inputs; ``spiky`` sees the same spread plus one value per batch 40x the
    largest of the rest: that value sets the int8 scale, and everything else is quantized coarsely (the
    shape of BERT's FFN-output inputs after GELU, measured at 13-16 dB on MiniLM)."""

    def __init__(self):
        super().__init__()
        self.calm = nn.Linear(64, 64)
        self.spiky = nn.Linear(64, 8)

    def forward(self, x):
        h = self.calm(x)
        spike = (torch.arange(h.numel()) == 0).reshape(h.shape)
        return self.spiky(torch.where(spike, h.abs().max() * 40.0, h))


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(64, 64, generator=gen),) for _ in range(4)]


def test_outlier_inputs_measure_low_sqnr():
    torch.manual_seed(0)
    sqnr = input_sqnr_db(Outliers().eval(), _batches())
    assert sqnr["calm"] > 30, sqnr
    assert sqnr["spiky"] < DEFAULT_SQNR_FLOOR_DB, sqnr


def test_guard_keeps_sensitive_layers_float_until_the_target():
    torch.manual_seed(0)
    model = Outliers().eval()
    seen = []

    def quantize_and_score(keep):
        seen.append(sorted(keep))
        return "artifact", 0.99 if "calm" in keep else 0.5  # pretend only keeping both float is good enough

    result, keep, guard = guarded_int8(model, _batches(), quantize_and_score, target_cosine=0.98, step=1)
    assert result == "artifact"
    assert seen == [["spiky"], ["calm", "spiky"]], "below-floor layer first, then the next most sensitive"
    assert [r["kept_float"] for r in guard["rounds"]] == [1, 2] and guard["rounds"][-1]["calibration_cosine"] == 0.99
    assert set(keep) == {"calm", "spiky"}


def test_guard_stops_after_max_rounds():
    torch.manual_seed(0)
    calls = []
    _, _, guard = guarded_int8(Outliers().eval(), _batches(), lambda keep: (calls.append(1), 0.1), step=1,
                               max_rounds=0)
    assert len(calls) == 1 and len(guard["rounds"]) == 1
