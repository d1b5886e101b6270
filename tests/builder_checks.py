"""Checks of `synapo_ext.testing`'s builders, run under each host's transformers (collected by
tests/trl/test_testing.py and tests/verl/test_testing.py: TRL's transformers 5.2x and verl's <5.11 differ in how
they reload a tokenizer from disk)."""

from __future__ import annotations

import pytest
import torch

from synapo_ext.testing import DELIMITER, SPECIALS, byte_bpe_tokenizer, char_tokenizer, tiny_qwen2

TEXTS = ["1+2=3\n\n4", "a:7+3=0\n\nb:0*7=0\n\nans:9", "\n\n\n", "zz?"]  # "z", "?": not in the vocabulary


def test_char_tokenizer_ids_and_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer("0123456789+=:ab \n")
    vocab = tok.get_vocab()
    assert [vocab[s] for s in SPECIALS] == [0, 1, 2] and vocab["0"] == 3 and vocab[DELIMITER] == len(tok) - 1
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.padding_side) == (0, 1, 2, "left")
    assert tok.convert_ids_to_tokens(tok("1\n\n2")["input_ids"]) == ["1", DELIMITER, "2"]
    assert tok("\n\n\n")["input_ids"] == [vocab[DELIMITER], vocab["\n"]]  # the delimiter first, then characters
    assert tok("z")["input_ids"] == [2]  # unknown character: <unk>, no bos/eos added
    plain = char_tokenizer("0123456789+=:ab \n", delimiter=None)
    assert DELIMITER not in plain.get_vocab() and plain("1\n\n2")["input_ids"] == [4, 19, 19, 5]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == vocab and len(again) == len(tok)
    assert [again(t)["input_ids"] for t in TEXTS] == [tok(t)["input_ids"] for t in TEXTS]
    assert (again.pad_token_id, again.eos_token_id, again.unk_token_id) == (0, 1, 2)
    assert again.decode(again("1+2=3\n\n4")["input_ids"]) == "1+2=3\n\n4"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chars": "aab"}, "must not repeat"),
        ({"chars": ["ab"]}, "single characters"),
        ({"chars": "ab", "delimiter": "|\n"}, "delimiter"),
        ({"chars": "ab", "unk_token": "?"}, "unk_token"),
        ({"chars": "ab", "specials": ["<pad>"]}, "specials"),
        ({"chars": "ab", "padding_side": "top"}, "padding_side"),
    ],
)
def test_char_tokenizer_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        char_tokenizer(**kwargs)


def test_byte_bpe_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_bpe_tokenizer(tmp_path / "tok")
    assert tok.encode("\n\n", add_special_tokens=False) == [256]  # the one merge
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    text = "12 + 5 =\n\nanswer: 17 é"  # any byte: no unknown token
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    turn = [{"role": "user", "content": "1 + 1 ="}]
    chat = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\n1 + 1 =<|im_end|>\n<|im_start|>assistant\n"
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.get_vocab() == tok.get_vocab() and again.encode(text, add_special_tokens=False) == ids


def test_tiny_qwen2_is_seeded_and_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer("0123456789")
    model = tiny_qwen2(tok, seed=3, hidden_size=16, num_layers=1)
    same, other = tiny_qwen2(tok, seed=3, hidden_size=16, num_layers=1), tiny_qwen2(tok, seed=4, hidden_size=16)
    weights = model.state_dict()
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in weights.items())
    assert not torch.equal(weights["model.embed_tokens.weight"], other.state_dict()["model.embed_tokens.weight"])
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (len(tok), 16, 32, 1)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 1)
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == (0, 1)
    assert tiny_qwen2(tok, bos_is_eos=False).config.bos_token_id is None
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in weights.items())
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"
    }
    ids = torch.tensor([tok("0123")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
