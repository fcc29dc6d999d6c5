"""Write a real Hugging Face-format checkpoint without downloading anything.

A checkpoint directory as ``save_pretrained`` leaves it, loadable by transformers and by
vLLM's normal (not dummy) loader:

* ``config.json`` (via transformers' config class of the ``model_type``) and
  ``generation_config.json`` (BOS / EOS ids, the EOS a list: the end of text and the end of
  a chat turn);
* ``model.safetensors``: random weights (normal, std 0.02; norms 1) under exactly the
  tensor names and shapes transformers' ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
  ``Qwen2ForCausalLM`` use (:func:`weight_shapes`), written with ``safetensors.numpy``,
  so no torch is needed. Rows of the embedding (and LM head) past the tokenizer's
  vocabulary are zero, as in checkpoints whose ``vocab_size`` is padded: a model of a real
  shape with a small tokenizer then picks real tokens under greedy decoding;
* a byte-level BPE tokenizer trained with the ``tokenizers`` library on text files of the
  repository (``docs/*.md`` by default), saved as ``tokenizer.json`` +
  ``tokenizer_config.json`` with BOS ``<|bos|>``, EOS ``<|eos|>``, the chat markers
  ``<|im_start|>`` / ``<|im_end|>`` and a ChatML chat template (:data:`CHAT_TEMPLATE`).

``python -m qlm.engine.checkpoint --out DIR`` writes the tiny Llama of the tests
(:data:`TINY_LLAMA`: two layers, hidden size 64, about 0.4 M parameters, a 1,024-token
vocabulary) in a second or two; ``--config FILE.json`` writes any shape of the three
architectures (e.g. a real model's config.json: 1.5 B parameters take about a minute and
3 GiB in float16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlm.core.errors import InvalidInput

BOS, EOS, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)
#: ChatML, as Qwen's instruct models use it, with a BOS first.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The tiny Llama of the tests (vocab_size follows the tokenizer).
TINY_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
}
ARCHITECTURES = ("llama", "mistral", "qwen2")
DEFAULT_CORPUS = "docs/*.md"
REPO_ROOT = Path(__file__).resolve().parents[2]


def weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the ``*ForCausalLM`` of ``config`` (llama, mistral, qwen2)."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise InvalidInput("model_type", f"must be one of {ARCHITECTURES}, got {kind!r}")
    try:
        hidden = int(config["hidden_size"])
        inter = int(config["intermediate_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        vocab = int(config["vocab_size"])
    except KeyError as missing:
        raise InvalidInput(f"config.{missing.args[0]}", "is required") from None
    head_dim = int(config.get("head_dim") or hidden // heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
        if kind == "qwen2":  # Qwen2 has biases on q, k and v
            shapes |= {
                p + "self_attn.q_proj.bias": (heads * head_dim,),
                p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
            }
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_weights(config: Mapping[str, Any], live_vocab: int, seed: int = 0,
                   dtype: Any = np.float16) -> dict[str, np.ndarray]:
    """Random weights of ``config`` (module docstring); rows ``>= live_vocab`` of the
    embedding and LM head are zero."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            tensor = np.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            tensor = np.zeros(shape, dtype=dtype)
        else:
            tensor = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                tensor[live_vocab:] = 0
        weights[name] = tensor
    return weights


def train_tokenizer(files: Sequence[Path], vocab_size: int = 1024) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``files``, with the special
    tokens and chat template of the module docstring (BOS added to every encoded text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not files:
        raise InvalidInput("corpus", "no text files to train the tokenizer on")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, additional_special_tokens=[IM_START, IM_END])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def corpus_files(pattern: str = DEFAULT_CORPUS, root: Path = REPO_ROOT) -> list[Path]:
    """The repository's text files matching ``pattern`` (sorted: the same tokenizer each time)."""
    return sorted(root.glob(pattern))


def write_checkpoint(out: Path, config: Mapping[str, Any] | None = None, *,
                     corpus: Sequence[Path] | None = None, tokenizer_vocab: int = 1024,
                     seed: int = 0, dtype: Any = None) -> Path:
    """Write a checkpoint (module docstring) to ``out`` and return it. ``config``: the
    model's shape (default :data:`TINY_LLAMA`); its ``vocab_size`` defaults to the
    tokenizer's and must be at least that. Written to a temporary directory beside
    ``out`` and renamed: ``out`` is complete or absent, never half written."""
    import logging

    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = Path(out)
    if out.exists():
        raise InvalidInput("out", f"{out} exists; give a new directory")
    shape = dict(TINY_LLAMA if config is None else config)
    kind = str(shape.pop("model_type", ""))
    if kind not in ARCHITECTURES:
        raise InvalidInput("model_type", f"must be one of {ARCHITECTURES}, got {kind!r}")
    tokenizer = train_tokenizer(corpus if corpus is not None else corpus_files(), tokenizer_vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save_pretrained(staging)
        shape.setdefault("vocab_size", len(tokenizer))
        AutoConfig.for_model(kind, **shape).save_pretrained(staging)
        # transformers picks the tokenizer class by model_type, which may add tokens (Qwen2's
        # adds <|endoftext|>): count the vocabulary as it is loaded from the directory
        loaded = AutoTokenizer.from_pretrained(str(staging), local_files_only=True)
        live_vocab = len(loaded)
        if config is None or "vocab_size" not in config:
            shape["vocab_size"] = live_vocab
        if int(shape["vocab_size"]) < live_vocab:
            raise InvalidInput("config.vocab_size", f"{shape['vocab_size']} is below the "
                               f"tokenizer's {live_vocab} tokens")
        ids = {t: loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        shape |= {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS]}
        AutoConfig.for_model(kind, **shape).save_pretrained(staging)
        GenerationConfig(bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[IM_END]],
                         pad_token_id=ids[EOS]).save_pretrained(staging)
        if dtype is None:
            dtype = np.float32 if shape.get("torch_dtype") == "float32" else np.float16
        weights = random_weights({**shape, "model_type": kind}, live_vocab, seed, dtype)
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a checkpoint with random weights and a "
                                     "tokenizer trained on the repository's docs.")
    parser.add_argument("--out", type=Path, required=True, help="a new directory")
    parser.add_argument("--config", type=Path, help="the model's config.json (default: tiny)")
    parser.add_argument("--tokenizer-vocab", type=int, default=1024)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="glob under the repository")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text()) if args.config else None
    path = write_checkpoint(args.out, config, corpus=corpus_files(args.corpus),
                            tokenizer_vocab=args.tokenizer_vocab, seed=args.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"{path}: {sorted(f.name for f in path.iterdir())}, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
