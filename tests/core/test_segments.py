"""segment_ids and boundary_table_from_tokenizer (SPEC "HVM" segmenter; docs/core_api.md steps 1-4)."""

import pytest
import torch
from hypothesis import given

from synapo_ext.core import boundary_table_from_tokenizer, segment_ids

from .reference import ref_segment_ids
from .strategies import DEFAULT, MASK_DTYPES, SLOW, assert_equal_valid, generators, scramble, segment_cases

DELIM = 9  # the delimiter id of the hand cases
TABLE = torch.zeros(10, dtype=torch.bool)
TABLE[DELIM] = True


def _kwargs(case):
    return dict(min_len=case.min_len, max_len=case.max_len, fallback_len=case.fallback_len)


def check_against_reference(case):
    seg = segment_ids(case.response_ids, case.response_mask, case.boundary_table, **_kwargs(case))
    ref = ref_segment_ids(case.response_ids, case.response_mask, case.boundary_table, **_kwargs(case))
    assert seg.dtype == torch.int64
    assert seg.shape == case.response_ids.shape
    assert_equal_valid(seg, ref, case.response_mask)


@DEFAULT
@given(case=segment_cases())
def test_segment_ids_match_reference(case):
    check_against_reference(case)


@pytest.mark.slow
@SLOW
@given(case=segment_cases())
def test_segment_ids_match_reference_slow(case):
    check_against_reference(case)


@DEFAULT
@given(case=segment_cases(), gen=generators())
def test_masked_ids_do_not_matter(case, gen):
    # Masked ids may be anything, even outside the table (pad ids such as -100 or vocab_size).
    expected = segment_ids(case.response_ids, case.response_mask, case.boundary_table, **_kwargs(case))
    junk_ids = scramble(case.response_ids, case.response_mask, gen, 200)
    actual = segment_ids(junk_ids, case.response_mask, case.boundary_table, **_kwargs(case))
    assert_equal_valid(actual, expected, case.response_mask)


@pytest.mark.parametrize("min_len, max_len, fallback_len", [(1, None, None), (64, 512, None), (8, None, 256)])
def test_long_rows(gen, min_len, max_len, fallback_len):
    ids = torch.randint(0, 200, (2, 16384), generator=gen)
    ids[1] = torch.randint(0, 9, (16384,), generator=gen)  # row 1 has no delimiter: fallback
    mask = torch.ones(2, 16384, dtype=torch.bool)
    mask[0, 12000:] = False
    mask[0, 700:900] = False
    table = torch.zeros(200, dtype=torch.bool)
    table[[9, 150]] = True
    kwargs = dict(min_len=min_len, max_len=max_len, fallback_len=fallback_len)
    seg = segment_ids(ids, mask, table, **kwargs)
    assert_equal_valid(seg, ref_segment_ids(ids, mask, table, **kwargs), mask)


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases (9 is the delimiter)
# ---------------------------------------------------------------------------------------------------------------

HAND_CASES = [
    # (ids, mask, kwargs, expected ids at valid positions)
    # Each delimiter closes its segment; the last valid token closes the last one.
    ([1, 2, 9, 3, 9, 4, 5], None, {}, [0, 0, 0, 1, 1, 2, 2]),
    # A delimiter as the last token closes the last segment: nothing opens after it.
    ([1, 9, 2, 9], None, {}, [0, 0, 1, 1]),
    # min_len 3: [1 2 9] has 3 tokens (closes), [3 9] has 2 (runs on), [3 9 4 5] then closes at the end.
    ([1, 2, 9, 3, 9, 4, 5], None, {"min_len": 3}, [0, 0, 0, 1, 1, 1, 1]),
    # min_len 2: [1 2 3 9] closes; the final [4] is shorter than 2 and merges into the segment before it.
    ([1, 2, 3, 9, 4], None, {"min_len": 2}, [0, 0, 0, 0, 0]),
    # min_len longer than the row: one segment.
    ([9, 9, 9], None, {"min_len": 5}, [0, 0, 0]),
    # max_len 2: [1 2 9] -> [1 2] [9]; [3 9] stays; [4 5] stays.
    ([1, 2, 9, 3, 9, 4, 5], None, {"max_len": 2}, [0, 0, 1, 2, 2, 3, 3]),
    # max_len after min_len: min_len 3 gives [1 2 9] [3 9 4 5]; max_len 3 cuts the second into [3 9 4] [5].
    ([1, 2, 9, 3, 9, 4, 5], None, {"min_len": 3, "max_len": 3}, [0, 0, 0, 1, 1, 1, 2]),
    # No delimiter, no fallback: one segment.
    ([1, 2, 3, 4, 5, 6, 7], None, {}, [0] * 7),
    # No delimiter, fallback_len 3: chunks of 3 valid tokens.
    ([1, 2, 3, 4, 5, 6, 7], None, {"fallback_len": 3}, [0, 0, 0, 1, 1, 1, 2]),
    # Fallback then min_len 2: chunks [1 2 3] [4 5 6] [7]; the final [7] merges into the one before.
    ([1, 2, 3, 4, 5, 6, 7], None, {"fallback_len": 3, "min_len": 2}, [0, 0, 0, 1, 1, 1, 1]),
    # A row with a delimiter ignores fallback_len.
    ([1, 2, 3, 9, 5, 6, 7], None, {"fallback_len": 2}, [0, 0, 0, 0, 1, 1, 1]),
    # Interior masked tokens are cut out: the masked 9 closes nothing, and tokens are counted over valid ones.
    ([1, 9, 9, 2, 9], [1, 1, 0, 1, 1], {}, [0, 0, 1, 1]),
    # min_len counts valid tokens only: [1 (x) (x) 9] has 2 valid tokens < 3, so it runs on.
    ([1, 5, 5, 9, 2, 3, 9], [1, 0, 0, 1, 1, 1, 1], {"min_len": 3}, [0, 0, 0, 0, 0]),
    # Right padding (pad id 9 is masked) closes nothing; a single valid token is one segment.
    ([4, 9, 9], [1, 0, 0], {}, [0]),
    ([9], None, {}, [0]),
]


@pytest.mark.parametrize("ids, mask, kwargs, expected", HAND_CASES)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_hand_cases(ids, mask, kwargs, expected, mask_dtype):
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids) if mask is None else torch.tensor([mask])
    seg = segment_ids(ids, mask.to(mask_dtype), TABLE, **kwargs)
    assert seg[mask.bool()].tolist() == expected


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", [TABLE.long(), TABLE.float(), TABLE.view(2, 5), TABLE.tolist()])
def test_boundary_table_must_be_1d_bool(table):
    with pytest.raises((ValueError, TypeError), match="boundary_table"):
        segment_ids(torch.tensor([[1, 2]]), torch.ones(1, 2), table)


@pytest.mark.parametrize("bad_id", [10, 11, -1])
def test_valid_id_outside_table(bad_id):
    with pytest.raises(ValueError, match="response_ids"):
        segment_ids(torch.tensor([[1, bad_id, 2]]), torch.ones(1, 3), TABLE)


@pytest.mark.parametrize("argument", ["min_len", "max_len", "fallback_len"])
@pytest.mark.parametrize("value", [0, -1])
def test_lengths_at_least_one(argument, value):
    with pytest.raises(ValueError, match=argument):
        segment_ids(torch.tensor([[1, 2]]), torch.ones(1, 2), TABLE, **{argument: value})


def test_shape_mismatch():
    with pytest.raises(ValueError, match="response_mask|response_ids"):
        segment_ids(torch.tensor([[1, 2]]), torch.ones(1, 3), TABLE)


def test_all_masked_row():
    with pytest.raises(ValueError, match="response_mask"):
        segment_ids(torch.tensor([[1, 2], [1, 2]]), torch.tensor([[1, 0], [0, 0]]), TABLE)


@pytest.mark.parametrize("mask", [torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.5]])])
def test_mask_values(mask):
    with pytest.raises(ValueError, match="response_mask"):
        segment_ids(torch.tensor([[1, 2]]), mask, TABLE)


def test_non_tensor_ids():
    with pytest.raises(TypeError, match="response_ids"):
        segment_ids([[1, 2]], torch.ones(1, 2), TABLE)


# ---------------------------------------------------------------------------------------------------------------
# boundary_table_from_tokenizer (tokenizers built locally; skipped where transformers is absent)
# ---------------------------------------------------------------------------------------------------------------

MERGING_VOCAB = ["[UNK]", "a", "b", ".", " ", "\n", "\n\n", ".\n\n", "\n\n\n", "x\n\ny", "Step"]


def _word_level_tokenizer(vocab: list[str], *, byte_level: bool = False):
    """A PreTrainedTokenizerFast over a WordLevel vocab; the pre-tokenizer isolates ".\n\n", "\n\n\n", "\n\n" and
    single characters, so the delimiter arrives merged into bigger tokens. With `byte_level`, token strings use the
    GPT-2 byte alphabet ("\n" is "Ċ"), so only decoding (not the raw vocab strings) reveals the delimiter."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if byte_level:
        table = {"\n": "\u010a", " ": "\u0120"}  # GPT-2's byte-to-unicode map for the bytes we use
        vocab = ["".join(table.get(c, c) for c in token) for token in vocab]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    split = pre_tokenizers.Split(Regex("\\.\\n\\n|\\n\\n\\n|\\n\\n|[\\s\\S]"), behavior="isolated")
    if byte_level:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
    else:
        tokenizer.pre_tokenizer = split
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


@pytest.mark.parametrize("byte_level", [False, True])
def test_boundary_table_catches_merged_delimiters(byte_level):
    tokenizer = _word_level_tokenizer(MERGING_VOCAB, byte_level=byte_level)
    ids = tokenizer("a.\n\nb\n\n\nb\n\na")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[1] in (".\n\n", ".\u010a\u010a")  # the delimiter arrives merged
    table = boundary_table_from_tokenizer(tokenizer)
    assert table.dtype == torch.bool and table.shape == (len(MERGING_VOCAB),)
    expected = {MERGING_VOCAB.index(t) for t in ["\n\n", ".\n\n", "\n\n\n", "x\n\ny"]}
    assert set(torch.nonzero(table).flatten().tolist()) == expected
    # End to end: "a.\n\n" "b\n\n\n" "b\n\n" "a" -> four segments.
    seg = segment_ids(torch.tensor([ids]), torch.ones(1, len(ids)), table)
    assert seg[0].tolist() == [0, 0, 1, 1, 2, 2, 3]


def test_boundary_table_custom_delimiters_and_vocab_size():
    tokenizer = _word_level_tokenizer(MERGING_VOCAB)
    table = boundary_table_from_tokenizer(tokenizer, delimiters=("Step",), vocab_size=16)
    assert table.shape == (16,)  # a model's embedding may be padded past the tokenizer's vocabulary
    assert torch.nonzero(table).flatten().tolist() == [MERGING_VOCAB.index("Step")]
    table = boundary_table_from_tokenizer(tokenizer, delimiters=("\n\n", "Step"))
    assert bool(table[MERGING_VOCAB.index("Step")]) and bool(table[MERGING_VOCAB.index(".\n\n")])


def test_tokenizer_without_delimiter_token_raises():
    # A plain character tokenizer: "\n\n" is two "\n" tokens, so no single token contains the delimiter.
    tokenizer = _word_level_tokenizer(["[UNK]", "a", "b", ".", " ", "\n"])
    with pytest.raises(ValueError, match="delimiters"):
        boundary_table_from_tokenizer(tokenizer)
