"""The text side of a real checkpoint (qlm.engine.text) over the tiny checkpoint the tests
write (qlm.engine.checkpoint): tokenizer, chat template, incremental detokenizing, EOS and
stop strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from qlm.core.errors import InvalidInput
from qlm.engine.checkpoint import (
    CHAT_TEMPLATE,
    EOS,
    IM_END,
    TINY_LLAMA,
    corpus_files,
    weight_shapes,
    write_checkpoint,
)
from qlm.engine.text import OutputText, TextModel, chat_messages

TEXT = "Grüße aus Köln — 日本語のテキスト 🙂 and plain ASCII words."


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> TextModel:
    return TextModel.load(tiny_checkpoint)


def stream(out: OutputText, ids: list[int], size: int) -> tuple[list[str], str | None, int]:
    """Feed ``ids`` in chunks of ``size``: the texts, the finish reason, ids consumed."""
    texts, used = [], 0
    for start in range(0, len(ids), size):
        delta = out.feed(ids[start:start + size])
        texts.append(delta.text)
        used += len(delta.token_ids)
        if delta.finish_reason:
            return texts, delta.finish_reason, used
    texts.append(out.flush())
    return texts, None, used


# ------------------------------------------------------------------ the checkpoint
def test_checkpoint_has_the_files_and_tensors_transformers_expects(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 1024
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    expected = weight_shapes(config)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert expected["model.layers.1.self_attn.k_proj.weight"] == (2 * 16, 64)
    assert "lm_head.weight" in expected  # untied


def test_shapes_of_qwen2_with_tied_embeddings() -> None:
    qwen = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "tie_word_embeddings": True}
    shapes = weight_shapes(qwen)
    assert "lm_head.weight" not in shapes
    assert shapes["model.layers.0.self_attn.q_proj.bias"] == (32,)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (16,)


def test_padded_vocabulary_rows_are_zero(tmp_path: Path) -> None:
    shape = dict(TINY_LLAMA, vocab_size=1100)
    path = write_checkpoint(tmp_path / "padded", shape, corpus=corpus_files()[:3],
                            tokenizer_vocab=512)
    weights = load_file(str(path / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape == (1100, 64)
    assert not np.any(embed[512:]) and np.all(np.abs(embed[:512]).sum(axis=1) > 0)


def test_bad_shape_and_existing_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="model_type"):
        weight_shapes({"model_type": "gpt2"})
    with pytest.raises(InvalidInput, match=r"config\.hidden_size"):
        weight_shapes({"model_type": "llama"})
    with pytest.raises(InvalidInput, match="vocab_size"):
        write_checkpoint(tmp_path / "small", dict(TINY_LLAMA, vocab_size=10))
    assert not (tmp_path / "small").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written staging left
    (tmp_path / "there").mkdir()
    with pytest.raises(InvalidInput, match="exists"):
        write_checkpoint(tmp_path / "there")


def test_load_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a directory"):
        TextModel.load(tmp_path / "nowhere")
    with pytest.raises(InvalidInput, match="no tokenizer"):
        TextModel.load(tmp_path)


# ------------------------------------------------------------------ prompts
def test_text_prompt_gets_bos_and_round_trips(model: TextModel) -> None:
    ids = model.encode(TEXT)
    assert ids[0] == model.tokenizer.bos_token_id
    assert model.decode(ids) == TEXT
    assert model.eos_token_ids == {model.tokenizer.convert_tokens_to_ids(EOS),
                                   model.tokenizer.convert_tokens_to_ids(IM_END)}


def test_chat_prompt_uses_the_models_template(model: TextModel) -> None:
    messages = chat_messages([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Wie geht's?"}])
    rendered = model.render_chat(messages)
    assert rendered == ("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nWie geht's?<|im_end|>\n<|im_start|>assistant\n")
    ids = model.encode_chat(messages)
    assert ids.count(model.tokenizer.bos_token_id) == 1  # not added a second time
    assert model.tokenizer.decode(list(ids), skip_special_tokens=False) == rendered
    assert model.tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize(("value", "where"), [
    ([], "messages"), ("hi", "messages"), ([{"role": "user"}], r"messages\[0\]\.content"),
    ([{"role": "", "content": "x"}], r"messages\[0\]\.role"),
    ([{"role": "user", "content": "x", "name": "y"}], r"messages\[0\]\.name"),
])
def test_bad_chat_messages_are_named(value: object, where: str) -> None:
    with pytest.raises(InvalidInput, match=where):
        chat_messages(value)


# ------------------------------------------------------------------ output
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_text_equals_whole_decode_whatever_the_chunking(model: TextModel,
                                                                  size: int) -> None:
    ids = list(model.encode(TEXT))[1:]
    texts, reason, used = stream(model.output(), ids, size)
    assert reason is None and used == len(ids)
    assert "".join(texts) == TEXT
    assert all("\ufffd" not in t for t in texts)  # never half a UTF-8 character


def test_multibyte_characters_wait_for_their_last_byte(model: TextModel) -> None:
    ids = list(model.encode("🙂"))[1:]
    assert len(ids) > 1  # byte-level BPE splits the emoji over several tokens
    out = model.output()
    pieces = [out.feed([t]).text for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🙂"


def test_eos_ends_the_output_and_its_text_is_not_shown(model: TextModel) -> None:
    body = list(model.encode("Hello there"))[1:]
    eos = sorted(model.eos_token_ids)[0]
    out = model.output()
    delta = out.feed([*body, eos, *body])
    assert delta.finish_reason == "stop"
    assert delta.token_ids == (*body, eos)  # the EOS counts, what follows does not
    assert delta.text == "Hello there"
    assert out.feed(body).token_ids == ()  # finished


def test_ignore_eos_keeps_going(model: TextModel) -> None:
    body = list(model.encode("Hello"))[1:]
    eos = sorted(model.eos_token_ids)[-1]
    delta = model.output(ignore_eos=True).feed([*body, eos, *body])
    assert delta.finish_reason is None and delta.text == "HelloHello"


@pytest.mark.parametrize("size", [1, 2, 5])
def test_stop_string_across_chunks_is_cut_from_the_text(model: TextModel, size: int) -> None:
    text = "The queue manager keeps the SLO. After the stop nothing shows."
    ids = list(model.encode(text))[1:]
    texts, reason, used = stream(model.output(stop=["SLO."]), ids, size)
    assert reason == "stop"
    assert "".join(texts) == "The queue manager keeps the "
    assert model.decode(ids[:used]).endswith("SLO.") or "SLO." in model.decode(ids[:used])
    assert "SLO." not in model.decode(ids[:used - 1])  # the last id completed it


def test_held_back_text_is_released_when_no_stop_comes(model: TextModel) -> None:
    ids = list(model.encode("abc ab"))[1:]
    out = model.output(stop=["ab!"])
    shown = out.feed(ids).text
    assert shown == "abc "  # "ab" might begin "ab!": held back
    assert out.flush() == "ab"


def test_earliest_of_several_stop_strings_wins(model: TextModel) -> None:
    ids = list(model.encode("one two three four"))[1:]
    texts, reason, _ = stream(model.output(stop=["four", "two", "wo t"]), ids, 1)
    assert reason == "stop" and "".join(texts) == "one "


def test_resumed_output_continues_decoding_and_matching(model: TextModel) -> None:
    text = "Grüße aus Köln END rest"
    ids = list(model.encode(text))[1:]
    whole = model.output(stop=["END"])
    _, _, used = stream(whole, ids, 1)
    for cut in range(1, used):  # evicted after ``cut`` tokens, resumed with them
        first = model.output(stop=["END"])
        kept = "".join(first.feed(ids[:cut]).text) + first.flush()
        second = model.output(stop=["END"], kept_ids=ids[:cut], kept_text=kept)
        rest, reason, n = stream(second, ids[cut:], 3)
        assert reason == "stop" and cut + n == used
        assert (kept + "".join(rest)).startswith("Grüße aus Köln ")
        assert "END" not in kept + "".join(rest) or kept.endswith(("E", "EN"))


def test_bad_stop_strings_are_refused(model: TextModel) -> None:
    with pytest.raises(InvalidInput, match="stop"):
        model.output(stop=[""])
