"""loadgen.gpu.real_checkpoint's parts that need no GPU: arguments, the stop string it picks,
the EOS variant of a checkpoint, and the checkpoint of a real model's shape (scaled down)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from loadgen.gpu.common import MODEL_SHAPES
from loadgen.gpu.real_checkpoint import eos_variant, parse_args, pick_stop_string
from loadgen.gpu.swap_bench import parse_args as swap_args
from qlm.engine.checkpoint import corpus_files, weight_shapes, write_checkpoint
from qlm.engine.text import TextModel


def test_arguments_are_checked() -> None:
    args = parse_args(["--model", "qwen2.5-1.5b", "--eos-at", "5", "--out", "/tmp/x"])
    assert args.model == "qwen2.5-1.5b" and args.eos_at == 5 and args.max_tokens == 256
    assert args.steps == ["real", "eos", "dummy"]
    assert parse_args(["--steps", "eos,dummy"]).steps == ["eos", "dummy"]
    for bad in (["--eos-at", "0"], ["--eos-at", "64"], ["--model", "gpt-9"],
                ["--gpu-memory-utilization", "1.5"], ["--steps", "real,fast"], ["--steps", ""]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert swap_args([]).swaps >= 20  # the issue asks for at least 20 swaps
    for bad in (["--models", "a"], ["--models", "a,a"], ["--redis-url", "redis://x"]):
        with pytest.raises(SystemExit):
            swap_args(bad)


def test_the_stop_string_first_occurs_in_the_middle() -> None:
    text = "abcabc the middle part xyz"
    stop = pick_stop_string(text)
    assert stop is not None and text.find(stop) >= len(text) // 2
    assert pick_stop_string("aaaaaaaa") is None  # every candidate occurs earlier


def test_eos_variant_links_the_weights_and_adds_an_eos(tmp_path: Path,
                                                      tiny_checkpoint: Path) -> None:
    variant = eos_variant(tiny_checkpoint, tmp_path / "eos", 77)
    assert (variant / "model.safetensors").is_symlink()
    config = json.loads((variant / "generation_config.json").read_text())
    assert config["eos_token_id"][-1] == 77 and len(config["eos_token_id"]) == 3
    assert 77 in TextModel.load(variant).eos_token_ids


def test_a_real_shape_is_written_with_its_padded_vocabulary(tmp_path: Path) -> None:
    shape = dict(MODEL_SHAPES["qwen2.5-1.5b"], num_hidden_layers=1, hidden_size=64,
                 intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=2048)  # qwen2.5-1.5b's layout, scaled down for a unit test
    path = write_checkpoint(tmp_path / "qwen", shape, corpus=corpus_files()[:4],
                            tokenizer_vocab=512)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 2048
    weights = load_file(str(path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == weight_shapes(config)
    assert str(weights["model.embed_tokens.weight"].dtype) == "float16"  # bf16 model, f16 file
    text = TextModel.load(path)
    assert text.vocab_size == 513  # transformers' Qwen2 tokenizer adds <|endoftext|>
    assert not weights["model.embed_tokens.weight"][513:].any()
    assert weights["model.embed_tokens.weight"][512].any()
    assert text.decode(text.encode("Köln 🙂")) == "Köln 🙂"
