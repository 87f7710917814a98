"""Padding-aware calibration: statistics and distillation count real tokens, batches are cut to real length."""

import torch

from slimx.slim import RecoverConfig, recover
from slimx.slim.base import PassContext, mask_index_of, token_mask, trim_padding
from slimx.slim.lowrank import LowRankConfig, input_second_moments, lowrank


class _TinyEncoder(torch.nn.Module):
    """Embeds tokens, one masked-mean-pooled block: padding never reaches the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.GELU(),
                                                               torch.nn.Linear(48, 16))])

    def forward(self, ids, mask):
        h = self.embed(ids)
        h = h + self.layers[0](h)
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)


def _padded(lengths, seq=12, pad_id=7):
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.full((1, seq), pad_id)
        ids[0, :n] = torch.randint(10, 50, (n,), generator=gen)
        mask = torch.zeros(1, seq, dtype=torch.long)
        mask[0, :n] = 1
        out.append((ids, mask))
    return out


def test_trim_padding_cuts_to_longest_real_sequence_and_keeps_outputs():
    model = _TinyEncoder().eval()
    batch = tuple(torch.cat(t) for t in zip(*_padded([3, 5]), strict=True))
    trimmed = trim_padding(batch, 1)
    assert [t.shape[1] for t in trimmed] == [5, 5]
    assert token_mask(trimmed, 1).sum().item() == 8
    torch.testing.assert_close(model(*trimmed), model(*batch))
    assert trim_padding(batch, None) is batch
    assert mask_index_of(["input_ids", "attention_mask"]) == 1 and mask_index_of(["pixel_values"]) is None


def test_second_moments_ignore_padding_tokens():
    model = _TinyEncoder().eval()
    batches = _padded([2, 4, 6])
    masked = input_second_moments(model, ["layers.0.0"], batches, mask_index=1)["layers.0.0"]
    plain = input_second_moments(model, ["layers.0.0"], batches)["layers.0.0"]
    assert masked[1] == 12 and plain[1] == 36  # real tokens only, against every padded position
    unpadded = [(ids[:, :int(m.sum())], m[:, :int(m.sum())]) for ids, m in batches]
    torch.testing.assert_close(masked[0], input_second_moments(model, ["layers.0.0"], unpadded)["layers.0.0"][0])
    assert not torch.allclose(masked[0], plain[0])


def test_recover_with_mask_runs_on_real_tokens():
    teacher = _TinyEncoder().eval()
    data = _padded([2, 3, 4, 5, 6, 3, 2, 5, 4, 6, 3, 4])
    cfg = LowRankConfig(rank_ratio=0.25, multiple=1, min_features=8)
    student = lowrank(teacher, cfg, PassContext(calib=data, mask_index=1)).model
    _, record = recover(student, teacher, data, RecoverConfig(steps=30, lr=3e-3, patience=10), mask_index=1)
    assert record["real_tokens_only"] and record["hidden_states_matched"] == 1
    assert record["heldout_loss_after"] < record["heldout_loss_before"]


def test_the_validation_loss_runs_in_chunks_and_gives_each_samples_loss():
    from slimx.slim.axformer import ValidationLoss

    teacher = _TinyEncoder().eval()
    student = _TinyEncoder().eval()
    with torch.no_grad():
        student.layers[0][0].weight.mul_(0.5)
    batches = _padded([2, 9, 4, 6, 3])
    chunked = ValidationLoss(teacher, batches, None, mask_index=1, chunk=2)
    alone = ValidationLoss(teacher, batches, None, mask_index=1, chunk=1)
    assert len(chunked.batches) == 3 and len(alone.batches) == 5
    assert chunked.batches[0][0].shape == (2, 9)  # two samples, cut to the chunk's longest real sequence
    got, want = chunked(student), alone(student)
    assert got.shape == (5,) and want.max() > 1e-4
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-6)
    labelled = ValidationLoss(teacher, batches, [0, 1, 2, 3, 4], mask_index=1, chunk=2)
    hits = [int(teacher(*b).argmax(-1)[0] == i) for i, b in enumerate(batches)]
    assert labelled.accuracy(teacher) == sum(hits) / 5
    # without a mask, samples of different shapes are never padded into one chunk
    ragged = [(torch.randn(1, n),) for n in (3, 3, 5)]
    assert [b[0].shape for b in ValidationLoss(torch.nn.Identity(), ragged, None, None).batches] == [(2, 3), (1, 5)]


def test_the_slimming_search_prices_the_median_length_sentence():
    from slimx.slim.slimming import _typical_sample

    batches = _padded([2, 9, 4, 6, 3])
    picked = _typical_sample(batches, 1)
    assert picked[0].shape == (1, 4) and int(picked[1].sum()) == 4
    assert _typical_sample(batches, None) is batches[0]
