"""Tiny models built in code with a seed, for every test that needs one. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


class TinyMLP(nn.Module):
    """Two linears: the smallest model every target must handle."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

    def example_inputs(self):
        return (torch.randn(2, self.fc1.in_features),)


class TinyConvBN(nn.Module):
    """Conv -> BN pairs (one depthwise), and a Linear -> BatchNorm1d head: folding targets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.bn_head = nn.BatchNorm1d(4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn_head(self.head(x.mean((2, 3))))


class SharedConvBN(nn.Module):
    """One conv called twice, each time into a different BN: neither may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))


class RepBranch(nn.Module):
    """A RepVGG-style block (3x3 + 1x1 branches) that can reparameterize into one 3x3 conv."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.k1 = nn.Conv2d(channels, channels, 1)
        self.fused = None

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x)
        return self.k3(x) + self.k1(x)

    def reparameterize(self) -> None:
        fused = nn.Conv2d(self.k3.in_channels, self.k3.out_channels, 3, padding=1)
        with torch.no_grad():
            fused.weight.copy_(self.k3.weight + F.pad(self.k1.weight, [1, 1, 1, 1]))
            fused.bias.copy_(self.k3.bias + self.k1.bias)
        self.fused = fused
        del self.k3, self.k1


class RepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBranch(4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.block(x)).flatten(1)


class TinyViTBlock(nn.Module):
    """Pre-norm attention + MLP over a short token sequence, like one ViT block."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 16) -> None:
        super().__init__()
        self.tokens, self.dim, self.heads = tokens, dim, heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def example_inputs(self):
        return (torch.randn(1, self.tokens, self.dim),)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot capture it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


class Eigh(nn.Module):
    """Uses torch.linalg.eigh, which has no ONNX translation."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        return torch.linalg.eigh(h @ h.transpose(-1, -2))[0]


# factories, for the pkg.module:factory form ------------------------------------------------


def tiny_mlp() -> nn.Module:
    seeded(0)
    return TinyMLP()


def gate_mlp() -> nn.Module:
    """An MLP big enough (about 0.1 ms) that its timing is more than call overhead."""
    seeded(0)
    model = TinyMLP(256, 1024, 256)
    model.example_inputs = lambda: (torch.randn(16, 256),)
    return model


def gate_mlp_wide() -> nn.Module:
    """``gate_mlp`` with a four times wider hidden layer: clearly slower."""
    seeded(0)
    model = TinyMLP(256, 4096, 256)
    model.example_inputs = lambda: (torch.randn(16, 256),)
    return model


def tiny_conv_bn() -> nn.Module:
    seeded(0)
    model = TinyConvBN()
    _randomize_bn(model)
    return model


def tiny_vit_block() -> nn.Module:
    seeded(0)
    return TinyViTBlock()


def tiny_no_examples() -> nn.Module:
    seeded(0)
    return nn.Sequential(nn.Linear(6, 3))


def data_dependent() -> nn.Module:
    model = DataDependent()
    model.example_inputs = lambda: (torch.ones(2, 3),)
    return model


def eigh_model() -> nn.Module:
    seeded(0)
    model = Eigh()
    model.example_inputs = lambda: (torch.randn(1, 4, 4),)
    return model


def not_a_module():
    return {"weights": 1}


def _randomize_bn(model: nn.Module) -> None:
    """Give batch norms non-trivial statistics, so that folding them is a real test."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


# a tiny BERT folder, for hf:DIR ----------------------------------------------------------

WORDS = ("the a cat dog sat on mat model fast slow small phone runs export device text of and is to in "
         "it that this for with as was be by").split()


# encoder families users bring, as transformers builds them offline from a small config (random weights):
# family -> (config class, model class, config arguments beyond the shared ones)
HF_FAMILIES = {
    "bert": ("BertConfig", "BertModel", {}),
    # position ids start after the padding index: a 66-row table holds 64 tokens
    "roberta": ("RobertaConfig", "RobertaModel", {"max_position_embeddings": 66, "pad_token_id": 1}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", {"max_position_embeddings": 66, "pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", "DistilBertModel", {"dim": 32, "n_layers": 2, "n_heads": 4,
                                                         "hidden_dim": 64}),
    "mpnet": ("MPNetConfig", "MPNetModel", {"max_position_embeddings": 66, "pad_token_id": 1}),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", {"relative_attention": True, "position_buckets": 16,
                                                         "max_relative_positions": 64,
                                                         "pos_att_type": ["p2c", "c2p"]}),
    "albert": ("AlbertConfig", "AlbertModel", {"embedding_size": 16}),
    "electra": ("ElectraConfig", "ElectraModel", {"embedding_size": 16}),
}


def make_tiny_hf_dir(path: Path, family: str = "bert", sentence_transformers: bool = False, seed: int = 0) -> Path:
    """Save a 2-layer encoder of ``family`` (``HF_FAMILIES``) with a word-level vocab and its tokenizer."""
    import transformers
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    seeded(seed)
    config_cls, model_cls, extra = HF_FAMILIES[family]
    shared = {"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64}
    config = getattr(transformers, config_cls)(**{**shared, **extra})
    getattr(transformers, model_cls)(config).eval().save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    if sentence_transformers:
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                    "pooling_mode_mean_tokens": True}))
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
    return path


def make_tiny_bert_dir(path: Path, sentence_transformers: bool = False, seed: int = 0) -> Path:
    """Save a 2-layer BERT with a word-level vocab and its tokenizer into ``path``."""
    return make_tiny_hf_dir(path, "bert", sentence_transformers, seed)


class SortTokens(nn.Module):
    """Sorts its features: converts to TFLite but cannot load in the LiteRT interpreter (STABLEHLO_SORT)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.sort(self.proj(x), dim=-1).values


def sort_model() -> nn.Module:
    seeded(0)
    model = SortTokens()
    model.example_inputs = lambda: (torch.randn(1, 8),)
    return model


class MaskedScores(nn.Module):
    """Attention scores masked the way HF encoders do: ``(1 - mask) * finfo(float32).min`` added to the scores; in
    fp16 the constant is -inf and ``0 * -inf`` is NaN at every kept position."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x, mask):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 4.0
        scores = scores + (1.0 - mask[:, None, :].float()) * torch.finfo(torch.float32).min
        return scores.softmax(-1) @ self.v(x)


def masked_scores() -> nn.Module:
    seeded(0)
    model = MaskedScores().eval()
    mask = torch.ones(1, 8, dtype=torch.int64)
    mask[:, 6:] = 0
    model.example_inputs = lambda: (torch.randn(1, 8, 16), mask)
    return model


class LoudLayerNorm(nn.Module):
    """A projection whose outputs reach several hundred, then a LayerNorm: its variance squares them past fp16."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.proj.weight.mul_(200.0)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def loud_layer_norm() -> nn.Module:
    seeded(0)
    model = LoudLayerNorm().eval()
    model.example_inputs = lambda: (torch.randn(2, 16),)
    return model


class LoudResidualNorm(LoudLayerNorm):
    """The same overflowing LayerNorm, but its input is also read by a residual path: it cannot be rescaled, so it
    is kept in fp32."""

    def forward(self, x):
        y = self.proj(x)
        return self.head(self.norm(y)) + 1e-3 * y[..., :4]


def loud_residual_norm() -> nn.Module:
    seeded(0)
    model = LoudResidualNorm().eval()
    model.example_inputs = lambda: (torch.randn(2, 16),)
    return model
