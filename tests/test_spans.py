"""Span extraction: the extractors, the text -> token mapping on each tokenizer family, and the pair mask."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trl_mgsr import spans as spans_mod
from trl_mgsr.spans import (
    CLOSED_CLASS_WORDS,
    SpanBackendUnavailableError,
    builtin_spans,
    get_span_extractor,
    nltk_spans,
    span_ids_from_tokens,
    span_counts,
    span_pair_mask,
    spacy_spans,
    spans_for_token_ids,
)
from trl_mgsr.testing import SAMPLE_TEXTS, build_tokenizer

# --------------------------------------------------------------------------------------------------------------------
# Tokenizers of each family, trained offline
# --------------------------------------------------------------------------------------------------------------------

TRAIN_TEXTS = SAMPLE_TEXTS * 4


def _wrap(tok: Tokenizer, **specials) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **specials)


def build_unigram_metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece-Unigram style (T5, ALBERT): Metaspace '▁' pre-tokenizer and decoder."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "<eos>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(TRAIN_TEXTS, trainer=trainer)
    return _wrap(tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama-2/Mistral style: Metaspace pre-tokenizer, BPE with byte fallback (<0xE5> pieces), Sequence decoder."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TRAIN_TEXTS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def build_wordpiece() -> PreTrainedTokenizerFast:
    """BERT style: WordPiece with '##' continuation pieces."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[SEP]"], show_progress=False)
    tok.train_from_iterator(TRAIN_TEXTS, trainer=trainer)
    return _wrap(tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]")


FAMILIES = {
    "byte_level_bpe": lambda: build_tokenizer(vocab_size=400),
    "unigram_metaspace": build_unigram_metaspace,
    "sentencepiece_bpe": build_sentencepiece_bpe,
    "wordpiece": build_wordpiece,
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "\ufffd"


def _continues_word(name: str, tokenizer, prev_id: int, next_id: int) -> bool:
    """Independent of spans.py: whether token `next_id` is a further piece of the word that `prev_id` is in,
    read from the token strings of each family's own convention."""
    prev, nxt = tokenizer.convert_ids_to_tokens([prev_id, next_id])
    if name == "wordpiece":
        return nxt.startswith("##")
    if name == "byte_level_bpe":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {v: k for k, v in bytes_to_unicode().items()}
        pb, nb = bytes(byte_of[c] for c in prev), bytes(byte_of[c] for c in nxt)
        word_byte = lambda b: b >= 0x80 or chr(b).isalnum()  # noqa: E731
        return bool(pb and nb) and word_byte(pb[-1]) and word_byte(nb[0])
    # Metaspace families: a new word starts with '▁'; byte-fallback pieces '<0xNN>' are parts of a character.
    if nxt.startswith("▁"):
        return False
    byte_piece = re.compile(r"<0x[0-9A-F]{2}>")
    prev_ok = bool(byte_piece.fullmatch(prev)) or (prev.strip("▁") != "" and _word_char(prev[-1]))
    next_ok = bool(byte_piece.fullmatch(nxt)) or _word_char(nxt[0])
    return prev_ok and next_ok


def _alnum(text: str) -> str:
    return re.sub(r"[\W_]", "", text)


def _span_texts(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Letters and digits of each span, decoded token by token group (whitespace and punctuation removed)."""
    out = []
    for s in range(max(labels, default=-1) + 1):
        toks = [i for i, l in zip(ids, labels) if l == s]
        out.append(_alnum(tokenizer.decode(toks)))
    return out


def _check_invariants(name, tokenizer, ids: list[int], labels: list[int]) -> None:
    assert len(ids) == len(labels)
    n_spans = max(labels, default=-1) + 1
    # ids are 0..n-1, numbered in order of first appearance, each on a contiguous run of >= 2 tokens
    first = [labels.index(s) for s in range(n_spans)]
    assert first == sorted(first)
    assert set(labels) <= set(range(-1, n_spans))
    for s in range(n_spans):
        where = [i for i, l in enumerate(labels) if l == s]
        assert len(where) >= 2, (s, labels)
        assert where == list(range(where[0], where[-1] + 1)), (s, labels)
    # pieces of one word always share a span (both in the same span, or both outside)
    for i in range(len(ids) - 1):
        if _continues_word(name, tokenizer, ids[i], ids[i + 1]):
            assert labels[i] == labels[i + 1], (i, tokenizer.convert_ids_to_tokens(ids), labels)


# --------------------------------------------------------------------------------------------------------------------
# builtin extractor
# --------------------------------------------------------------------------------------------------------------------


def _texts(text, spans):
    return [text[a:b] for a, b in spans]


def test_builtin_fixed_sentences():
    text = "The quick brown fox jumps over the lazy dog."
    assert builtin_spans(text) == [(4, 25), (35, 43)]
    assert _texts(text, builtin_spans(text)) == ["quick brown fox jumps", "lazy dog"]

    text = "What is the capital of France? The capital of France is Paris."
    assert _texts(text, builtin_spans(text)) == ["capital", "France", "capital", "France", "Paris"]

    text = "Knowledge distillation trains a small student model to imitate a large teacher model."
    assert _texts(text, builtin_spans(text)) == [
        "Knowledge distillation trains",
        "small student model",
        "imitate",
        "large teacher model",
    ]


def test_builtin_punctuation_newlines_numbers_unicode():
    assert _texts("red, green; blue", builtin_spans("red, green; blue")) == ["red", "green", "blue"]
    assert _texts("green tea\nblack coffee", builtin_spans("green tea\nblack coffee")) == ["green tea", "black coffee"]
    text = "Numbers like 42 and 3.14 appear, naïve cafés and 東京."
    assert _texts(text, builtin_spans(text)) == ["Numbers", "42", "3.14 appear", "naïve cafés", "東京"]
    text = "  leading spaces stay here  "
    assert builtin_spans(text) == [(2, 26)]


def test_builtin_closed_class_and_contractions():
    text = "It's a well-known fact that we don't know, and they can't sleep."
    assert _texts(text, builtin_spans(text)) == ["well-known fact", "know", "sleep"]
    assert builtin_spans("it is of the and or but") == []
    assert builtin_spans("") == []
    assert _texts("quick brown fox", builtin_spans("quick brown fox", extra_closed_class=["Brown"])) == ["quick", "fox"]
    for cls in ("determiners", "pronouns", "prepositions", "conjunctions", "auxiliaries"):
        assert CLOSED_CLASS_WORDS[cls]


# --------------------------------------------------------------------------------------------------------------------
# get_span_extractor
# --------------------------------------------------------------------------------------------------------------------


def test_get_span_extractor_builtin_callable_and_unknown():
    assert get_span_extractor("builtin") is builtin_spans
    assert get_span_extractor("builtin", extra_closed_class=["fox"])("quick fox") == [(0, 5)]

    def whole(text, margin=0):
        return [(margin, len(text))]

    assert get_span_extractor(whole) is whole
    assert get_span_extractor(whole, margin=2)("abcdef") == [(2, 6)]
    with pytest.raises(ValueError, match="Unknown span extractor"):
        get_span_extractor("stanza")


# --------------------------------------------------------------------------------------------------------------------
# NLTK
# --------------------------------------------------------------------------------------------------------------------

FOX_TAGS = {"The": "DT", "quick": "JJ", "brown": "JJ", "fox": "NN", "jumps": "VBZ", "over": "IN", "the": "DT",
            "lazy": "JJ", "dog": "NN", ".": "."}


def test_nltk_chunker_with_given_tagger():
    pytest.importorskip("nltk")
    text = "The quick brown fox jumps over the lazy dog."
    spans = nltk_spans(text, tagger=lambda words: [(w, FOX_TAGS[w]) for w in words])
    assert _texts(text, spans) == ["The quick brown fox", "jumps", "over the lazy dog"]
    only_np = "NP: {<DT>?<JJ>*<NN>}"
    spans = nltk_spans(text, grammar=only_np, tagger=lambda words: [(w, FOX_TAGS[w]) for w in words])
    assert _texts(text, spans) == ["The quick brown fox", "the lazy dog"]


def test_nltk_with_real_tagger_data():
    nltk = pytest.importorskip("nltk")
    try:
        nltk.pos_tag(["test"])
    except LookupError:
        pytest.skip("NLTK tagger data averaged_perceptron_tagger_eng is not installed")
    text = "The quick brown fox jumps over the lazy dog."
    assert "lazy dog" in " ".join(_texts(text, nltk_spans(text)))


def test_nltk_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # `import nltk` raises ImportError
    with pytest.raises(SpanBackendUnavailableError, match=r"pip install nltk") as err:
        nltk_spans("some text")
    assert "averaged_perceptron_tagger_eng" in str(err.value)
    with pytest.raises(ImportError, match=r"pip install nltk"):
        get_span_extractor("nltk")


def test_nltk_missing_tagger_data_error(monkeypatch):
    nltk = pytest.importorskip("nltk")

    def no_data(words, *args, **kwargs):
        raise LookupError("Resource averaged_perceptron_tagger_eng not found.")

    monkeypatch.setattr(nltk, "pos_tag", no_data)
    with pytest.raises(SpanBackendUnavailableError, match=r"python -m nltk\.downloader averaged_perceptron_tagger_eng"):
        nltk_spans("The quick brown fox.")
    with pytest.raises(SpanBackendUnavailableError, match=r"nltk\.downloader"):
        get_span_extractor("nltk")  # checked up front, not in the middle of training


# --------------------------------------------------------------------------------------------------------------------
# spaCy
# --------------------------------------------------------------------------------------------------------------------


def test_spacy_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)
    spans_mod._load_spacy.cache_clear()
    try:
        with pytest.raises(SpanBackendUnavailableError, match=r"pip install spacy") as err:
            spacy_spans("some text")
        assert "python -m spacy download en_core_web_sm" in str(err.value)
        with pytest.raises(ImportError, match=r"pip install spacy"):
            get_span_extractor("spacy")
    finally:
        spans_mod._load_spacy.cache_clear()


def test_spacy_missing_model_error():
    pytest.importorskip("spacy")
    with pytest.raises(SpanBackendUnavailableError, match=r"python -m spacy download trl_mgsr_no_such_pipeline"):
        spacy_spans("some text", model="trl_mgsr_no_such_pipeline")
    with pytest.raises(SpanBackendUnavailableError, match=r"python -m spacy download trl_mgsr_no_such_pipeline"):
        get_span_extractor("spacy", model="trl_mgsr_no_such_pipeline")


def test_spacy_pipeline_without_parser_error():
    spacy = pytest.importorskip("spacy")
    with pytest.raises(SpanBackendUnavailableError, match=r"dependency parser"):
        spacy_spans("The quick brown fox.", model=spacy.blank("en"))


def test_spacy_noun_chunks_to_char_spans():
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import Doc

    vocab = spacy.blank("en").vocab

    def parsed(text):  # a hand-parsed Doc, standing in for a trained pipeline
        assert text == "The quick fox saw a dog."
        return Doc(
            vocab,
            words=["The", "quick", "fox", "saw", "a", "dog", "."],
            spaces=[True, True, True, True, True, False, False],
            pos=["DET", "ADJ", "NOUN", "VERB", "DET", "NOUN", "PUNCT"],
            deps=["det", "amod", "nsubj", "ROOT", "det", "dobj", "punct"],
            heads=[2, 2, 3, 3, 5, 3, 3],
        )

    text = "The quick fox saw a dog."
    assert _texts(text, spacy_spans(text, model=parsed)) == ["The quick fox", "a dog"]
    assert _texts(text, get_span_extractor("spacy", model=parsed)(text)) == ["The quick fox", "a dog"]


# --------------------------------------------------------------------------------------------------------------------
# span_ids_from_tokens on each tokenizer family
# --------------------------------------------------------------------------------------------------------------------

PROMPT = "Describe the bright photosynthesis of green plants:"
COMPLETION = " The naïve café in 東京 serves photosynthesis, and the student distillation"
# builtin phrases of COMPLETION, letters and digits only
EXPECTED = ["naïvecafé", "東京servesphotosynthesis", "studentdistillation"]


def _batch(tokenizer, prompts, completions, eos=False):
    """Left-padded batch of prompt + completion ids, and the completion mask."""
    rows, masks = [], []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = c if isinstance(c, list) else tokenizer(c, add_special_tokens=False)["input_ids"]
        if eos:
            c_ids = c_ids + [tokenizer.eos_token_id]
        rows.append(p_ids + c_ids)
        masks.append([False] * len(p_ids) + [True] * len(c_ids))
    width = max(map(len, rows)) + 2
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = torch.tensor(m)
    return ids, mask


def test_family_spans_expected_phrases(family):
    name, tok = family
    ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    text, labels = spans_for_token_ids(tok, ids)
    assert _alnum(text) == _alnum(COMPLETION)
    assert _span_texts(tok, ids, labels) == EXPECTED
    _check_invariants(name, tok, ids, labels)
    # the tokens of closed-class words and punctuation are outside spans
    for i, l in enumerate(labels):
        piece = _alnum(tok.decode([ids[i]]))
        if piece in {"The", "in", "and", "the"} and not (0 < i < len(ids) - 1 and labels[i - 1] == labels[i + 1] >= 0):
            assert l == -1, (tok.convert_ids_to_tokens([ids[i]]), labels)


def test_family_left_padded_batch_prompt_and_padding_outside(family):
    name, tok = family
    completions = [COMPLETION, "  Knowledge distillation trains small students.", " green plants"]
    ids, mask = _batch(tok, [PROMPT, "Hi", PROMPT + " Bright photosynthesis."], completions, eos=True)
    span_ids = span_ids_from_tokens(tok, ids, mask, "builtin")
    assert span_ids.dtype == torch.long and span_ids.shape == ids.shape and span_ids.device == ids.device
    assert (span_ids[~mask] == -1).all()  # no span in the prompt or the padding (the prompt has content words)
    assert (span_ids[:, -1] == -1).all()  # the eos token is not decoded, so in no span
    for b in range(ids.shape[0]):
        row_ids = ids[b][mask[b]].tolist()
        row_labels = span_ids[b][mask[b]].tolist()
        _check_invariants(name, tok, row_ids[:-1], row_labels[:-1])
    row0 = span_ids[0][mask[0]].tolist()
    assert _span_texts(tok, ids[0][mask[0]].tolist(), row0) == EXPECTED
    assert _span_texts(tok, ids[1][mask[1]].tolist(), span_ids[1][mask[1]].tolist()) == [
        "Knowledgedistillationtrainssmallstudents"
    ]
    assert _span_texts(tok, ids[2][mask[2]].tolist(), span_ids[2][mask[2]].tolist()) == ["greenplants"]
    # same row alone, without padding: same ids
    alone_ids, alone_mask = _batch(tok, [PROMPT], [COMPLETION], eos=True)
    alone = span_ids_from_tokens(tok, alone_ids, alone_mask)
    assert alone[alone_mask].tolist() == span_ids[0][mask[0]].tolist()


def test_family_completion_ending_mid_word(family):
    name, tok = family
    ids = tok(" the student distillation", add_special_tokens=False)["input_ids"]
    pieces = [i for i in range(1, len(ids)) if _continues_word(name, tok, ids[i - 1], ids[i])]
    assert pieces, "test precondition: 'distillation' is split into pieces"
    cut = ids[: pieces[-1]]  # drop the last piece: the text now ends inside "distillation"
    text, labels = spans_for_token_ids(tok, cut)
    assert _alnum(text) != "thestudentdistillation" and "distillation".startswith(_alnum(text)[len("thestudent"):])
    assert labels[-1] >= 0 and labels[-1] == labels[-2]
    assert _span_texts(tok, cut, labels) == [_alnum(text)[len("the"):]]
    _check_invariants(name, tok, cut, labels)


@pytest.mark.parametrize("name", ["byte_level_bpe", "sentencepiece_bpe"])
def test_completion_ending_mid_character(name):
    """A generation cut inside a multi-byte character: the dangling byte piece stays with its word."""
    tok = FAMILIES[name]()
    ids = tok(" big bağ", add_special_tokens=False)["input_ids"]  # 'ğ' (C4 9F) was never seen in training
    cut = ids[:-1]
    text, labels = spans_for_token_ids(tok, cut)
    assert text.endswith("\ufffd"), (text, tok.convert_ids_to_tokens(cut))  # precondition: cut inside 'ğ'
    assert labels[-1] >= 0 and len(set(labels[1:])) == 1
    _check_invariants(name, tok, cut, labels)


def test_leading_spaces_and_multibyte_offsets():
    tok = build_tokenizer(vocab_size=300)  # small vocabulary: multi-byte characters are split across tokens
    ids = tok("   naïve café 東京", add_special_tokens=False)["input_ids"]
    text, labels = spans_for_token_ids(tok, ids)
    assert text == "   naïve café 東京"
    assert set(labels) == {0, -1} or set(labels) == {0}
    span_tokens = [i for i, l in zip(ids, labels) if l == 0]
    assert tok.decode(span_tokens).strip() == "naïve café 東京"
    assert len(tok.convert_ids_to_tokens(ids)) > len(text.split())  # the words are made of several pieces


# --------------------------------------------------------------------------------------------------------------------
# custom extractors and word snapping
# --------------------------------------------------------------------------------------------------------------------


def test_custom_callable_extractor(family):
    name, tok = family
    completion = " photosynthesis converts light energy"
    ids, mask = _batch(tok, [PROMPT], [completion])
    whole = span_ids_from_tokens(tok, ids, mask, lambda text: [(0, len(text))])
    assert (whole[mask] == 0).all() and (whole[~mask] == -1).all()
    # a span that cuts a word in the middle is widened to the whole word: its pieces are never split
    cut = span_ids_from_tokens(tok, ids, mask, lambda text: [(text.index("photo") + 2, text.index("photo") + 4)])
    row_ids, row = ids[0][mask[0]].tolist(), cut[0][mask[0]].tolist()
    assert _span_texts(tok, row_ids, row) == ["photosynthesis"]
    _check_invariants(name, tok, row_ids, row)


def test_token_overlapping_two_spans_merges_them():
    tok = build_tokenizer(vocab_size=400)
    ids = tok(" photosynthesis converts", add_special_tokens=False)["input_ids"]
    text, _ = spans_for_token_ids(tok, ids)
    # two spans that meet inside the word "photosynthesis" become one span
    _, labels = spans_for_token_ids(tok, ids, lambda t: [(1, 6), (6, len(t))])
    assert set(labels) == {0}
    # spans covering a single token are dropped
    single = [i for i in range(len(ids)) if tok.decode([ids[i]]) == " converts"]
    if single:
        _, labels = spans_for_token_ids(tok, ids, lambda t: [(t.index("converts"), len(t))])
        assert labels == [-1] * len(ids)


def test_bad_extractor_output_is_a_clear_error():
    tok = build_tokenizer()
    ids, mask = _batch(tok, ["Hi"], [" quick brown fox"])
    with pytest.raises(TypeError, match=r"\(start_char, end_char\)"):
        span_ids_from_tokens(tok, ids, mask, lambda text: [5])
    with pytest.raises(ValueError, match="differ"):
        span_ids_from_tokens(tok, ids, mask[:, 1:])


def test_empty_completion_and_all_padding_rows():
    tok = build_tokenizer()
    ids = torch.full((2, 6), tok.pad_token_id)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    assert (span_ids_from_tokens(tok, ids, mask) == -1).all()


def test_speed_well_above_100_sequences_per_second():
    tok = build_tokenizer(TRAIN_TEXTS, vocab_size=500)
    text = " ".join(TRAIN_TEXTS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    reps = (256 // len(ids)) + 1
    row = (ids * reps)[:256]
    n = 64
    input_ids = torch.tensor([row] * n)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    span_ids_from_tokens(tok, input_ids[:2], mask[:2])  # warm-up
    start = time.perf_counter()
    span_ids = span_ids_from_tokens(tok, input_ids, mask)
    rate = n / (time.perf_counter() - start)
    assert (span_ids >= 0).any()
    assert rate > 200, f"{rate:.0f} sequences of 256 tokens per second"


# --------------------------------------------------------------------------------------------------------------------
# span_pair_mask
# --------------------------------------------------------------------------------------------------------------------


def test_span_pair_mask_hand_written():
    span_ids = torch.tensor([[-1, 0, 0, 0, 1, 1, -1, 2, 2], [0, 0, 1, 1, 1, -1, -1, 2, 2]])
    labels = torch.tensor([[-100, 5, 5, 5, 5, 5, 5, 5, 5], [-100, 5, 5, 5, -100, 5, 5, 5, 5]])
    expected = torch.tensor(
        [
            [False, True, True, False, True, False, False, True, False],
            [False, False, True, False, False, False, False, True, False],
        ]
    )
    assert torch.equal(span_pair_mask(span_ids, labels), expected)
    with pytest.raises(ValueError, match="differ"):
        span_pair_mask(span_ids, labels[:, 1:])


def test_span_pair_mask_never_crosses_boundaries(family):
    name, tok = family
    completions = [COMPLETION, "  Knowledge distillation trains small students.", " green plants"]
    ids, mask = _batch(tok, [PROMPT, "Hi", PROMPT], completions, eos=True)
    span_ids = span_ids_from_tokens(tok, ids, mask)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    pairs = span_pair_mask(span_ids, labels)
    assert pairs.any()
    assert not pairs[:, -1].any()
    b, k = pairs.nonzero(as_tuple=True)
    assert (span_ids[b, k] == span_ids[b, k + 1]).all() and (span_ids[b, k] >= 0).all()
    assert mask[b, k].all() and mask[b, k + 1].all()  # never the prompt or the padding
    # and every adjacent in-span couple is a pair
    same = (span_ids[:, :-1] == span_ids[:, 1:]) & (span_ids[:, :-1] >= 0)
    assert torch.equal(pairs[:, :-1], same)


def test_single_token_spans_are_dropped():
    tok = build_tokenizer(vocab_size=1000)
    text = " The quick brown fox jumps over the lazy dog"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    single = [w for w in text.split() if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(single) >= 2, "test precondition: some words are one token"
    w1, w2 = single[:2]
    at = lambda w: (text.index(" " + w) + 1, text.index(" " + w) + 1 + len(w))  # noqa: E731
    _, labels = spans_for_token_ids(tok, ids, lambda t: [at(w1)])
    assert labels == [-1] * len(ids)
    _, labels = spans_for_token_ids(tok, ids, lambda t: [at(w1), at(w2)])
    assert labels == [-1] * len(ids)
    _, labels = spans_for_token_ids(tok, ids, lambda t: [(at(w1)[0], at(w2)[1])])
    assert labels.count(0) >= 2 and set(labels) == {-1, 0}


def test_spans_are_merged_when_they_overlap_or_share_a_token():
    # overlapping character spans are merged; a span boundary inside a word is moved to the word's edges
    assert spans_mod._normalise_spans("abc def ghi", [(0, 5), (3, 7), (9, 10)]) == [[0, 7], [8, 11]]
    assert spans_mod._normalise_spans("don't 3.14 x", [(1, 2), (7, 8)]) == [[0, 5], [6, 10]]
    assert spans_mod._normalise_spans("abc", [(-5, 99), (2, 2)]) == [[0, 3]]
    # a token whose characters overlap two spans joins them into one span
    labels = spans_mod._token_span_ids([0, 3, 6, 9], [3, 7, 9, 12], [[0, 4], [5, 9], [10, 12]])
    assert labels == [0, 0, 0, -1]


def test_generic_fallback_path_gives_the_same_spans(family, monkeypatch):
    """Tokenizers whose decoder rewrites emitted text fall back to prefix decoding; it must agree."""
    name, tok = family
    ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    _, fast = spans_for_token_ids(tok, ids)

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidPrefix")

    monkeypatch.setattr(spans_mod, "_offsets_stream", broken)
    text, slow = spans_for_token_ids(tok, ids)
    assert _alnum(text) == _alnum(COMPLETION)
    assert _span_texts(tok, ids, slow) == EXPECTED
    _check_invariants(name, tok, ids, slow)
    assert slow == fast


def test_tokenizer_without_fast_backend(family):
    """A tokenizer with only `decode` (a slow tokenizer) goes through the generic path."""
    name, tok = family

    class SlowTokenizer:
        all_special_ids = tok.all_special_ids

        def decode(self, ids, **kwargs):
            return tok.decode(ids, **kwargs)

    ids, mask = _batch(tok, [PROMPT], [COMPLETION], eos=True)
    assert torch.equal(span_ids_from_tokens(SlowTokenizer(), ids, mask), span_ids_from_tokens(tok, ids, mask))


def test_span_counts():
    span_ids = torch.tensor([[-1, 0, 0, 1, 1, -1], [-1, -1, -1, -1, -1, -1], [0, 0, 1, 1, 2, 2]])
    assert span_counts(span_ids).tolist() == [2, 0, 3]
    assert span_counts(torch.zeros(2, 0, dtype=torch.long)).tolist() == [0, 0]


@pytest.mark.parametrize("extractor,kwargs", [("builtin", {"model": "x"}), ("spacy", {"bogus": 1}),
                                              (lambda text, n=1: [], {"m": 2})])
def test_kwargs_the_extractor_does_not_take_fail_when_it_is_built(extractor, kwargs):
    with pytest.raises(ValueError, match=r"span_extractor_kwargs .* do not fit"):
        get_span_extractor(extractor, **kwargs)
