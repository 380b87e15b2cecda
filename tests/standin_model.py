"""A stand-in for headroom's Kompress model, built at test time and seeded into a private HF cache.

The real model (`chopratejas/kompress-v2-base`, ONNX) and its tokenizer (`answerdotai/ModernBERT-base`)
come from the HuggingFace hub, which no test machine can reach. This builds files with the same
interface (`input_ids`, `attention_mask` -> `final_scores` of shape [batch, seq]; a fast tokenizer
that tracks word ids) and places them where huggingface_hub's cache puts the pinned revisions that
the installed headroom asks for, so headroom's own loading code runs unchanged.

Two sizes: `tiny` (a few hundred KB, milliseconds per call) for tests, and `base`, whose layers
have the shapes and parameter count of ModernBERT-base (~150M parameters), so the benchmark's
memory and latency figures are of the right order. The weights are random and seeded: the output
is deterministic but says nothing about compression quality.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker import artifacts

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Size:
    vocab: int
    width: int
    layers: int
    ffn: int


TINY = Size(vocab=2000, width=16, layers=1, ffn=32)
# ModernBERT-base: 50,368-token vocabulary, 768 wide, 22 layers, GeGLU feed-forward of 1,152.
BASE = Size(vocab=50368, width=768, layers=22, ffn=1152)
SIZES = {"tiny": TINY, "base": BASE}


def seed_cache(hub_cache: Path, size: Size = TINY, seed: int = 7) -> Path:
    """Write the stand-in model and tokenizer into `hub_cache` (an HF_HUB_CACHE directory) at
    the revisions the installed headroom pins; returns `hub_cache`."""
    plan = artifacts.required()
    model_dir = artifacts.snapshot_dir(hub_cache, plan.model)
    tokenizer_dir = artifacts.snapshot_dir(hub_cache, plan.tokenizer)
    onnx_path = model_dir / plan.model.files[0]
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(size.vocab, seed)
    write_tokenizer(tokenizer, tokenizer_dir)
    import onnx

    onnx.save(_graph(size, tokenizer.get_vocab_size(), seed), str(onnx_path))
    return hub_cache


def write_tokenizer(tokenizer: Any, directory: Path) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    special = {name: config[name] for name in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    (directory / "config.json").write_text(json.dumps({"model_type": "modernbert"}))


def _training_text(seed: int) -> list[str]:
    """Word soup with English letter statistics, enough for WordPiece to learn real subwords."""
    rng = random.Random(seed)
    syllables = ["the", "an", "er", "in", "on", "at", "es", "re", "ti", "st", "or", "en", "ed", "al", "ing"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    punctuation = list(".,;:()[]{}<>/\\'\"!?-_=+*#@$%^&|~`0123456789")
    return [" ".join(rng.sample(words, 40) + punctuation) for _ in range(200)]


def _tokenizer(vocab: int, seed: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(_training_text(seed), trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


class _Builder:
    """Collects ONNX nodes and seeded random initialisers."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.weights: list[Any] = []
        self.nodes: list[Any] = []

    def constant(self, name: str, value: Any) -> str:
        from onnx import numpy_helper

        self.weights.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, name: str, shape: tuple[int, int], scale: float | None = None) -> str:
        """Normal weights; by default scaled so a product with unit-scale inputs stays unit-scale."""
        import numpy as np

        factor = 1 / np.sqrt(shape[0]) if scale is None else scale
        return self.constant(name, (self.rng.standard_normal(shape) * factor).astype(np.float32))

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output


def _graph(size: Size, vocab: int, seed: int) -> Any:
    """Embedding, `layers` x (single-head attention + gated feed-forward, each with a residual and
    layer norm), then one score per token through a sigmoid, zeroed where the attention mask is 0."""
    import numpy as np
    from onnx import TensorProto, helper

    b = _Builder(seed)
    b.constant("inv_sqrt_width", np.array([1.0 / np.sqrt(size.width)], dtype=np.float32))
    b.constant("squeeze_axes", np.array([2], dtype=np.int64))
    b.constant("norm_scale", np.ones(size.width, dtype=np.float32))
    b.constant("norm_bias", np.zeros(size.width, dtype=np.float32))
    b.constant("context_weight", np.array([0.1], dtype=np.float32))
    hidden = b.node("Gather", [b.weight("embedding", (vocab, size.width), scale=1.0), "input_ids"], "embedded")
    mask = b.node("Cast", ["attention_mask"], "mask", to=TensorProto.FLOAT)
    for layer in range(size.layers):
        hidden = _layer(b, hidden, size, f"layer{layer}")
    # Random deep layers drive every token to nearly the same state, which would give every word
    # the same score; a skip from the embedding keeps scores spread per word, so some words are
    # kept and some dropped, as with a trained model.
    per_word = b.node("MatMul", ["embedded", b.weight("score_embedding", (size.width, 1))], "per_word")
    contextual = b.node("MatMul", [hidden, b.weight("score_hidden", (size.width, 1))], "contextual")
    damped = b.node("Mul", [contextual, "context_weight"], "damped")
    logits = b.node("Add", [per_word, damped], "logits")
    probabilities = b.node("Sigmoid", [b.node("Squeeze", [logits, "squeeze_axes"], "squeezed")], "probabilities")
    b.node("Mul", [probabilities, mask], "final_scores")
    graph = helper.make_graph(
        b.nodes,
        "kompress-standin",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("final_scores", TensorProto.FLOAT, ["batch", "sequence"])],
        initializer=b.weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _layer(b: _Builder, hidden: str, size: Size, name: str) -> str:
    width, ffn = size.width, size.ffn
    query = b.node("MatMul", [hidden, b.weight(f"{name}.q", (width, width))], f"{name}.query")
    key = b.node("MatMul", [hidden, b.weight(f"{name}.k", (width, width))], f"{name}.key")
    value = b.node("MatMul", [hidden, b.weight(f"{name}.v", (width, width))], f"{name}.value")
    key_t = b.node("Transpose", [key], f"{name}.key_t", perm=[0, 2, 1])
    scaled = b.node("Mul", [b.node("MatMul", [query, key_t], f"{name}.raw"), "inv_sqrt_width"], f"{name}.scaled")
    attention = b.node("Softmax", [scaled], f"{name}.attention", axis=-1)
    mixed = b.node("MatMul", [attention, value], f"{name}.mixed")
    projected = b.node("MatMul", [mixed, b.weight(f"{name}.o", (width, width))], f"{name}.projected")
    hidden = _norm(b, b.node("Add", [hidden, projected], f"{name}.residual1"))
    up = b.node("MatMul", [hidden, b.weight(f"{name}.up", (width, ffn))], f"{name}.up_out")
    gate = b.node("MatMul", [hidden, b.weight(f"{name}.gate", (width, ffn))], f"{name}.gate_out")
    gated = b.node("Mul", [up, b.node("Relu", [gate], f"{name}.relu")], f"{name}.gated")
    down = b.node("MatMul", [gated, b.weight(f"{name}.down", (ffn, width))], f"{name}.down_out")
    return _norm(b, b.node("Add", [hidden, down], f"{name}.residual2"))


def _norm(b: _Builder, value: str) -> str:
    # Keeps activations near unit scale through every layer, so the scores stay spread around
    # 0.5 (some words kept, some dropped) at any depth, as a trained model's would.
    return b.node("LayerNormalization", [value, "norm_scale", "norm_bias"], f"{value}.norm", axis=-1)
