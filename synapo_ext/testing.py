"""Tiny models and locally built tokenizers for tests and benchmarks: no hub, no internet.

Like transformers' ``testing_utils``: the pieces every test tree and benchmark of this project builds, in one place.

- `char_tokenizer`: one token per character (WordLevel), plus a delimiter such as ``"\\n\\n"`` as one token, as real
  BPE vocabularies have it (so HVM's segmenter finds segment boundaries); without a delimiter, a plain character
  split (a bad-input case for HVM: no boundary token at all).
- `byte_bpe_tokenizer`: a byte-level BPE tokenizer like Qwen's (every byte a symbol, ``"\\n\\n"`` one merged token,
  Qwen's special tokens and a chat template), saved and reloaded the way a host loads it from disk.
- `tiny_qwen2`: a randomly initialised `Qwen2ForCausalLM` (about 40k parameters at the defaults) sized to a
  tokenizer, with its pad / eos ids set in the config and the generation config.

Importing this module loads neither transformers nor tokenizers (they are imported when a builder is called), nor
any host (verl, TRL). The builders are deterministic: the same arguments give the same vocabulary, ids, config and,
for a seed, the same initial weights (the benchmarks key cached warm starts and finished runs on that).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2ForCausalLM

__all__ = [
    "CHAT_TEMPLATE",
    "DELIMITER",
    "QWEN_SPECIALS",
    "SPECIALS",
    "byte_bpe_tokenizer",
    "char_tokenizer",
    "tiny_qwen2",
]

DELIMITER = "\n\n"
"""The step delimiter of the tiny tasks: one token in every tokenizer built here (as in Qwen's vocabulary)."""
SPECIALS = ("<pad>", "<eos>", "<unk>")
"""`char_tokenizer`'s special tokens, ids 0, 1, 2: pad, eos, unknown."""
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""`byte_bpe_tokenizer`'s special tokens: pad, chat-turn start, eos (Qwen's names and roles)."""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A minimal ChatML template (Qwen's turn markers), for hosts that apply a chat template to prompts."""
_REGEX_META = set(".^$*+?{}[]\\|()")


def char_tokenizer(
    chars: Iterable[str],
    *,
    delimiter: str | None = DELIMITER,
    specials: Sequence[str] = SPECIALS,
    unk_token: str = "<unk>",
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids are `specials`, then `chars`, then `delimiter`, in that order.

    Args:
        chars: the characters of the vocabulary, one token each (no repeats, none of them special).
        delimiter: a multi-character string that is one token (``"\\n\\n"`` by default: "1\\n\\n2" encodes as
            ['1', '\\n\\n', '2']); None: a plain character split, with no such token.
        specials: special tokens, first in the vocabulary; ``specials[0]`` is the pad token, ``specials[1]`` eos.
        unk_token: the token an unknown character encodes as (one of `specials`).
        padding_side: "left" (what generation needs) or "right".

    Returns:
        A `transformers.PreTrainedTokenizerFast`; it adds no bos/eos on encoding.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(chars)
    specials = list(specials)
    if len(specials) < 2:
        raise ValueError(f"specials must hold at least a pad and an eos token, got {specials!r}")
    bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
    if bad:
        raise ValueError(f"chars must be single characters, got {bad!r}")
    extra = [] if delimiter is None else [delimiter]
    tokens = specials + chars + extra
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"chars, specials and delimiter must not repeat a token, got {tokens!r}")
    if delimiter is not None and (len(delimiter) < 2 or _REGEX_META & set(delimiter)):
        raise ValueError(f"delimiter must be two or more characters with no regex metacharacter, got {delimiter!r}")
    if unk_token not in specials:
        raise ValueError(f"unk_token must be one of specials {specials!r}, got {unk_token!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=unk_token))
    pattern = "[\\s\\S]" if delimiter is None else f"{delimiter}|[\\s\\S]"  # the delimiter first: it wins
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=tokenizers.Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=specials[0],
        eos_token=specials[1],
        unk_token=unk_token,
        padding_side=padding_side,
    )


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-unicode table, in byte order (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_bpe_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer like Qwen's, saved to `path` and reloaded from it as a host does.

    The vocabulary: the 256 byte symbols (ids 0-255), the merged ``"\\n\\n"`` (256), then `QWEN_SPECIALS`; pad is
    ``<|endoftext|>``, eos ``<|im_end|>``; `CHAT_TEMPLATE` is set. transformers 5 reloads a qwen2-style tokenizer
    from disk as a BPE rebuilt from vocab + merges, so the tokenizer is returned as reloaded, after checking that
    "\\n" and "\\n\\n" each still encode to one token.

    Args:
        path: a folder (created if missing) for the tokenizer's files; a model saved there later finds them.

    Returns:
        The tokenizer as `transformers.AutoTokenizer.from_pretrained(path)` loads it.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    newline = symbols[ord("\n")]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab[newline * 2] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(newline, newline)]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    pad, *others = QWEN_SPECIALS
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=QWEN_SPECIALS[2], additional_special_tokens=others
    )
    fast.add_special_tokens({"additional_special_tokens": others})
    fast.chat_template = CHAT_TEMPLATE
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    reloaded = transformers.AutoTokenizer.from_pretrained(path)
    for text in ("\n", DELIMITER):
        ids = reloaded.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer reloaded from {path} encodes {text!r} as {ids}, not one token")
    return reloaded


def tiny_qwen2(
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    bos_is_eos: bool = True,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized to `tokenizer` (tied embeddings, vocab_size = len(tokenizer)).

    The config's and the generation config's pad / eos ids are the tokenizer's; bos is eos when `bos_is_eos`
    (character tokenizers have no bos), else unset. The weights are drawn after ``torch.manual_seed(seed)``, on
    torch's global generator, as `Qwen2ForCausalLM(config)` draws them: the same seed gives the same weights.

    Args:
        tokenizer: the tokenizer the model reads (its length, pad and eos ids).
        seed: torch's global seed, set before the weights are drawn (the global generator is left after them).
        hidden_size: the model width; `intermediate_size` (the MLP width) defaults to twice it.
        num_layers, num_attention_heads, num_key_value_heads, max_position_embeddings: as in `Qwen2Config`.
        bos_is_eos: set `bos_token_id` to the eos id (else None).

    Returns:
        The model, in train mode as transformers builds it.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer must have a pad and an eos token (tiny_qwen2 writes their ids into the config)")
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id if bos_is_eos else None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
