import numpy as np
import torch

from slimx.slim import RecoverConfig, fidelity, recover, torch_fidelity
from slimx.slim.base import PassContext
from slimx.slim.lowrank import LowRankConfig, lowrank


def test_distillation_recovers_fidelity_on_held_out_data():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 32, generator=gen),) for _ in range(40)]
    train, heldout = data[:30], data[30:]
    student = lowrank(teacher, LowRankConfig(rank_ratio=0.2, multiple=1), PassContext(calib=train)).model
    before = torch_fidelity(teacher, student, heldout)["cosine_mean"]
    student, record = recover(student, teacher, train, RecoverConfig(steps=150, lr=3e-3, patience=50))
    after = torch_fidelity(teacher, student, heldout)["cosine_mean"]
    assert after > before + 0.01, (before, after)
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    assert not any(p.requires_grad for p in student.parameters())


def test_fidelity_nearest_neighbour_agreement():
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal(8) for _ in range(6)]
    same = fidelity(ref, [r * 3.0 for r in ref])
    assert same["cosine_mean"] == 1.0 and same["nn_agreement"] == 1.0
    shuffled = fidelity(ref, ref[1:] + ref[:1])
    assert shuffled["nn_agreement"] < 1.0 and shuffled["cosine_mean"] < 0.9
    labelled = fidelity([np.array([1.0, 0.0]), np.array([0.0, 1.0])], [np.array([0.9, 0.1]), np.array([0.8, 0.2])],
                        labels=[0, 1])
    assert labelled["accuracy_reference"] == 1.0 and labelled["accuracy"] == 0.5


class _Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 32)
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU())
                                           for _ in range(3)])
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)


def test_hidden_state_distillation_matches_every_block():
    from slimx.slim.recover import block_paths

    torch.manual_seed(0)
    teacher = _Blocks().eval()
    assert block_paths(teacher) == ["layers.0", "layers.1", "layers.2"]
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 16, generator=gen),) for _ in range(20)]
    cfg = LowRankConfig(rank_ratio=0.25, multiple=1, min_features=8)
    _, record = recover(lowrank(teacher, cfg, PassContext(calib=data)).model, teacher, data,
                        RecoverConfig(steps=20, lr=1e-3))
    assert record["hidden_states_matched"] == 3
    _, plain = recover(lowrank(teacher, cfg, PassContext(calib=data)).model, teacher, data,
                       RecoverConfig(steps=20, hidden=False))
    assert plain["hidden_states_matched"] == 0


def test_recovery_stacks_samples_of_different_lengths():
    from slimx.slim.base import stack_samples

    ids, mask = stack_samples([(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)),
                        (torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))])
    assert ids.shape == (2, 5) and mask[0].tolist() == [1, 1, 1, 0, 0]


def _distil_setup():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 32, generator=gen),) for _ in range(40)]
    student = lowrank(teacher, LowRankConfig(rank_ratio=0.2, multiple=1), PassContext(calib=data)).model
    return teacher, student, data


def test_a_checkpoint_resumes_where_training_stopped_and_ends_where_an_unbroken_run_ends(tmp_path, monkeypatch):
    import copy
    import importlib

    rec = importlib.import_module("slimx.slim.recover")  # the module (slimx.slim.recover is also the function)
    teacher, student, data = _distil_setup()
    whole, record = recover(copy.deepcopy(student), teacher, data, RecoverConfig(steps=40, lr=3e-3, patience=50))
    assert record["device"] == "cpu" and record["mixed_precision"] is None and record["resumed_from_step"] is None

    ckpt = tmp_path / "recover.pt"
    cfg = RecoverConfig(steps=40, lr=3e-3, patience=50, checkpoint=str(ckpt))
    real_save = rec._save_checkpoint
    # an interrupted run: its last checkpoint is the one of step 20
    monkeypatch.setattr(rec, "_save_checkpoint", lambda c, s, st: real_save(c, s, st) if st["step"] <= 20 else None)
    recover(copy.deepcopy(student), teacher, data, cfg)
    monkeypatch.setattr(rec, "_save_checkpoint", real_save)
    state = torch.load(ckpt, weights_only=True)  # plain tensors and numbers: loadable without unpickling code
    assert state["step"] == 20
    resumed, record = recover(copy.deepcopy(student), teacher, data, cfg)
    assert record["resumed_from_step"] == 20 and record["steps_run"] == 40
    assert torch.load(ckpt, weights_only=True)["step"] == 40
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    import pytest

    from slimx._core.errors import UsageError

    teacher, student, data = _distil_setup()
    ckpt = tmp_path / "r.pt"
    recover(student, teacher, data, RecoverConfig(steps=10, lr=3e-3, checkpoint=str(ckpt)))
    other = lowrank(teacher, LowRankConfig(rank_ratio=0.5, multiple=1), PassContext(calib=data)).model
    with pytest.raises(UsageError, match="another model or other recovery settings"):
        recover(other, teacher, data, RecoverConfig(steps=10, lr=3e-3, checkpoint=str(ckpt)))


def test_text_batches_are_bucketed_by_real_length():
    from slimx.slim.recover import _Batches

    samples = [(torch.ones(1, 12, dtype=torch.long), torch.cat([torch.ones(1, n), torch.zeros(1, 12 - n)], 1).long())
               for n in (1, 11, 2, 10, 3, 12, 4, 9)]
    draw = _Batches(samples, 2, mask_index=1, bucket=True)
    order = [1, 2, 3, 4, 9, 10, 11, 12]
    for _ in range(10):
        lengths = sorted(int(s[1].sum()) for s in draw.draw())
        assert order.index(lengths[1]) - order.index(lengths[0]) == 1, lengths  # neighbours in length order
    assert not _Batches(samples, 2, mask_index=None, bucket=True).bucketed


def test_a_missing_accelerator_is_a_usage_error():
    import pytest

    from slimx._core.errors import UsageError
    from slimx.slim.recover import training_device

    assert training_device("cpu").type == "cpu"
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else training_device("auto").type)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            training_device("cuda")


class _Encoder(torch.nn.Module):
    """A 3-layer HF BERT with its mask input, returning the token states (what MiniLM's deployment form is)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        self.bert = BertModel(cfg, add_pooling_layer=False).eval()

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


def _sentences(n: int, seed: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        real = int(torch.randint(3, 16, (1,), generator=gen))
        ids = torch.randint(1, 60, (1, 16), generator=gen)
        mask = (torch.arange(16) < real).long()[None]
        out.append((ids * mask, mask))
    return out


def test_layerwise_distillation_trains_each_block_alone_and_brings_the_model_closer():
    teacher = _Encoder()
    student = _Encoder()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # a damaged copy: every block's weights off by noise
        for name, p in student.named_parameters():
            if ".layer." in name and p.dim() == 2:
                p.add_(0.3 * p.std() * torch.randn_like(p))
    train, heldout = _sentences(48, 1), _sentences(24, 2)
    before = torch_fidelity(teacher, student, heldout)["cosine_mean"]
    student, record = recover(student, teacher, train, RecoverConfig(steps=0, layerwise=60, batch_size=8,
                                                                     layerwise_lr=3e-3), mask_index=1)
    after = torch_fidelity(teacher, student, heldout)["cosine_mean"]
    blocks = record["layerwise"]["blocks"]
    assert [b["block"] for b in blocks] == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert all(b["heldout_error_after"] < b["heldout_error_before"] for b in blocks), blocks
    assert 1 - after < 0.5 * (1 - before), (before, after)  # the distance to the original halved at least
    assert record["steps_run"] == 0 and record["heldout_loss_after"] < record["heldout_loss_before"]
    assert not any(p.requires_grad for p in student.parameters())


def test_layerwise_then_end_to_end_steps_still_train_every_parameter():
    teacher = _Encoder()
    student = _Encoder(seed=1)  # other weights altogether
    data = _sentences(32, 3)
    _, record = recover(student, teacher, data, RecoverConfig(steps=20, layerwise=10, lr=1e-3, patience=50,
                                                              batch_size=8), mask_index=1)
    assert record["steps_run"] == 20 and len(record["layerwise"]["blocks"]) == 3
    assert record["heldout_loss_after"] < record["heldout_loss_before"]


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    def forward(self, x):
        for _ in range(3):
            x = torch.relu(self.layers[0](x))
        return x


def test_layerwise_leaves_a_block_shared_across_depths_to_the_end_to_end_steps():
    data = [(torch.randn(2, 8),) for _ in range(8)]
    _, record = recover(_Shared(), _Shared(), data, RecoverConfig(steps=1, layerwise=5, patience=5))
    assert "shared weights" in record["layerwise"]["skipped"] and record["layerwise"]["blocks"] == []


def test_layerwise_settings_are_checked():
    import pytest

    with pytest.raises(ValueError, match="not both 0"):
        RecoverConfig(steps=0)
    with pytest.raises(ValueError, match="layerwise_lr"):
        RecoverConfig(layerwise=5, layerwise_lr=0)


def test_layerwise_finds_timms_sequential_blocks_and_trains_them():
    import timm

    from slimx.slim.layerwise import outer_blocks

    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                                num_classes=10, embed_dim=32, depth=3, num_heads=2).eval()
    assert outer_blocks(teacher) == ["blocks.0", "blocks.1", "blocks.2"]
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                                num_classes=10, embed_dim=32, depth=3, num_heads=2).eval()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p.add_(0.3 * p.std() * torch.randn_like(p))
    data = [(torch.randn(2, 1, 8, 8),) for _ in range(24)]
    _, record = recover(student, teacher, data, RecoverConfig(steps=0, layerwise=40, layerwise_lr=3e-3,
                                                              batch_size=4))
    blocks = record["layerwise"]["blocks"]
    assert [b["block"] for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(b["heldout_error_after"] < b["heldout_error_before"] for b in blocks), blocks


def test_attention_maps_are_distilled_across_a_head_cut_and_the_taps_leave_nothing_behind():
    """The taps give each shared attention's head-averaged probabilities (equal to HF's own), the map loss is
    differentiable through a student with heads cut (a few steps on it alone pull the maps together), and
    ``recover(attention=W)`` trains with it and leaves forwards and state-dict keys as they were."""
    from slimx.slim.attention import AttentionMaps, prune_heads
    from slimx.slim.recover import attention_map_loss, attention_paths

    teacher = _Encoder()
    with torch.no_grad():  # peaked attention (a random tiny BERT's is nearly uniform, with nothing to transfer)
        for name, p in teacher.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(6.0)
    student = _Encoder()
    student.load_state_dict(teacher.state_dict())
    prune_heads(student, "bert.encoder.layer.0.attention.self", [0, 1])  # two of the first layer's four heads
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.add_(0.5 * p.std() * torch.randn_like(p))
    keys = sorted(student.state_dict())
    shared = attention_paths(student, teacher)
    assert len(shared) == 3
    batch = tuple(torch.cat(t) for t in zip(*_sentences(16, 2), strict=True))
    taps = AttentionMaps(teacher, shared)
    attn = teacher.get_submodule(shared[1])
    seen = []
    hook = attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(args[0] if args else
                                                                               kwargs["hidden_states"]),
                                          with_kwargs=True)
    with torch.no_grad():
        teacher(*batch)
    hook.remove()
    maps = taps.maps()
    taps.remove()
    with torch.no_grad():  # the layer's attention computed by hand from its input
        x, d = seen[0], attn.attention_head_size
        q, k = (f(x).view(*x.shape[:2], -1, d).transpose(1, 2) for f in (attn.query, attn.key))
        scores = (q @ k.transpose(-2, -1)) * attn.scaling
        scores = scores.masked_fill(~batch[1].bool()[:, None, None, :], float("-inf"))
        by_hand = scores.softmax(-1).mean(1)
    assert torch.allclose(maps[shared[1]], by_hand, atol=1e-5)  # the tap is the model's own attention
    with torch.no_grad():
        targets = {p: m.clone() for p, m in maps.items()}
    student_taps = AttentionMaps(student, shared)
    qk = [p for n, p in student.named_parameters() if n.endswith(("query.weight", "key.weight"))]
    opt = torch.optim.Adam(qk, lr=1e-2)
    losses = []
    for _ in range(40):
        student(*batch)
        loss = attention_map_loss(student_taps.maps(), targets, batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    student_taps.remove()
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for p in student.parameters():
        p.requires_grad_(False)
    student, record = recover(student, teacher, _sentences(48, 1), RecoverConfig(steps=20, lr=1e-3, hidden=False,
                                                                                 attention=1.0), mask_index=1)
    assert record["attention_maps_matched"] == 3
    assert sorted(student.state_dict()) == keys  # no wrapper left in the module tree
    for model in (student, teacher):
        assert not any("forward" in vars(m) for m in model.modules())  # the instance forwards are gone
    with torch.no_grad():  # and the untapped student still runs
        student(*_sentences(1, 5)[0])


class _BranchBlocks(torch.nn.Module):
    def __init__(self, middle=None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), middle or torch.nn.Linear(8, 8),
                                           torch.nn.Linear(8, 8)])

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return x


class _Constant(torch.nn.Module):  # a block whose branches were all cut away: no weights left
    def forward(self, x):
        return torch.zeros_like(x)


def test_layerwise_skips_a_block_with_no_weights_left_and_trains_the_others():
    import contextlib

    from slimx.slim.layerwise import layerwise

    teacher, student = _BranchBlocks(), _BranchBlocks(_Constant())
    with torch.no_grad():
        student.blocks[2].weight.add_(0.5)
    chunks = [(torch.randn(4, 8, generator=torch.Generator().manual_seed(i)),) for i in range(6)]
    record = layerwise(student, teacher, chunks[:4], chunks[4:], steps=30, lr=1e-2, mask_index=None,
                       autocast=contextlib.nullcontext)
    by_block = {b["block"]: b for b in record["blocks"]}
    assert by_block["blocks.1"] == {"block": "blocks.1", "skipped": "no trainable weights left"}
    assert by_block["blocks.2"]["heldout_error_after"] < by_block["blocks.2"]["heldout_error_before"]


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return self.head(x)


def test_the_task_loss_pulls_the_student_toward_the_labels():
    """labels=W adds cross-entropy on the calibration labels: with every label 2, the student's predictions move to
    class 2 (the teacher predicts it for few samples), and without labels the option is refused."""
    import pytest

    from slimx._core.errors import UsageError

    teacher, student = _Classifier(), _Classifier()
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(1, 8, generator=gen),) for _ in range(60)]
    before = sum(int(teacher(*d).argmax()) == 2 for d in data)
    student, record = recover(student, teacher, data, RecoverConfig(steps=60, lr=1e-2, loss="kl", labels=5.0,
                                                                     batch_size=8, patience=50, hidden=False),
                              labels=[2] * len(data))
    after = sum(int(student(*d).argmax()) == 2 for d in data)
    assert before < 40 and after > before + 10, (before, after)
    assert record["task_loss"] == "cross-entropy on the labels, weight 5"
    with pytest.raises(UsageError, match="no labels"):
        recover(_Classifier(), teacher, data, RecoverConfig(steps=5, labels=1.0))


def test_mixup_distils_on_mixed_inputs_and_leaves_token_ids_alone():
    """mixup=A: the teacher and the student see the same pairwise mixes of the batch's float inputs (not the
    samples themselves); integer inputs are never mixed; with labels it is refused."""
    import pytest

    from slimx.slim.recover import _mix

    a, b = torch.ones(1, 3), torch.zeros(1, 3)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mixed, same = _mix((torch.cat([a, b]), ids), torch.tensor([0.25, 1.0]), torch.tensor([1, 0]))
    assert torch.equal(mixed, torch.tensor([[0.25] * 3, [0.0] * 3])) and same is ids

    teacher, student = _Classifier(), _Classifier()
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(1, 8, generator=gen),) for _ in range(40)]
    seen = []
    teacher.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    student, record = recover(student, teacher, data, RecoverConfig(steps=20, lr=1e-2, loss="kl", mixup=0.4,
                                                                     batch_size=8, patience=50, hidden=False))
    assert record["mixup"] == "inputs mixed pairwise, Beta(0.4, 0.4)"
    rows = torch.cat(seen)  # 20 training batches of mixes, and the unmixed held-out chunk
    originals = torch.cat([d[0] for d in data])
    nearest = torch.cdist(rows, originals).min(dim=1).values
    assert (nearest > 1e-4).float().mean() > 0.5, "most training rows are mixes, not samples"
    with pytest.raises(ValueError, match="mixup and labels"):
        RecoverConfig(mixup=0.4, labels=1.0)
