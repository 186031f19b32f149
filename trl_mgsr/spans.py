"""Span level of MGSR: phrase spans of a completion's text, mapped to token positions.

A *span extractor* is any callable `text -> list[(start_char, end_char)]`. Three are provided:

- `builtin_spans` (default, offline, no data): a phrase splitter that breaks the text at punctuation, line breaks and
  closed-class English words; every maximal run of consecutive content words is a span.
- `nltk_spans`: a regular-expression NP/VP/PP chunker over `nltk.pos_tag` (needs `pip install nltk` and the
  tagger data `averaged_perceptron_tagger_eng`).
- `spacy_spans`: spaCy noun chunks (needs `pip install spacy` and a pipeline with a parser, e.g.
  `python -m spacy download en_core_web_sm`).

`span_ids_from_tokens` decodes the completion tokens of each row once, with per-token character offsets, runs the
extractor on that text and turns the character spans into a `[B, T]` tensor of span ids (-1 outside spans).
`span_pair_mask` turns span ids into the mask of adjacent in-span token pairs used by the span loss.
"""

from __future__ import annotations

import functools
import inspect
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

SpanExtractor = Callable[[str], list[tuple[int, int]]]

__all__ = [
    "CLOSED_CLASS_WORDS",
    "SPAN_EXTRACTOR_NAMES",
    "SpanBackendUnavailableError",
    "builtin_spans",
    "get_span_extractor",
    "nltk_spans",
    "spacy_spans",
    "span_ids_from_tokens",
    "spans_for_token_ids",
    "span_counts",
    "span_groups",
    "span_pair_mask",
]

SPAN_EXTRACTOR_NAMES = ("builtin", "nltk", "spacy")


class SpanBackendUnavailableError(ImportError):
    """An optional span extractor cannot run: its package or its model data is not installed."""


# --------------------------------------------------------------------------------------------------------------------
# Builtin extractor
# --------------------------------------------------------------------------------------------------------------------

#: Closed-class English words, by class. The builtin extractor never puts them in a span: they end the current
#: phrase. Lower case; matching is case-insensitive. Contractions are handled separately (see `_is_closed_class`).
CLOSED_CLASS_WORDS: dict[str, frozenset[str]] = {
    "determiners": frozenset(
        "a an the this that these those each every either neither some any no all both half few many much more most "
        "less least several such another other what which whatever whichever".split()
    ),
    "pronouns": frozenset(
        "i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its itself "
        "we us our ours ourselves they them their theirs themselves who whom whose whoever whomever someone somebody "
        "something anyone anybody anything everyone everybody everything nobody nothing none oneself".split()
    ),
    "prepositions": frozenset(
        "about above across after against along amid among amongst around as at before behind below beneath beside "
        "besides between beyond by despite down during except for from in inside into like near of off on onto out "
        "outside over past per since through throughout till to toward towards under underneath unlike until up upon "
        "via with within without".split()
    ),
    "conjunctions": frozenset(
        "and or but nor so yet although though because if unless whereas while whether than once when whenever where "
        "wherever why how".split()
    ),
    "auxiliaries": frozenset(
        "be am is are was were been being have has had having do does did will would shall should can could may might "
        "must ought".split()
    ),
    "particles": frozenset("not there".split()),
}

_CLOSED = frozenset().union(*CLOSED_CLASS_WORDS.values())
#: Negative contractions whose stem is not a closed-class word spelled out.
_NEG_CONTRACTIONS = frozenset("can't won't shan't ain't cannot".split())
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")

#: A word: a number with inner separators ("3.14", "1,000"), or letters/digits with inner apostrophes or hyphens
#: ("don't", "well-known"). Everything else that is not whitespace is punctuation.
_WORD_RE = re.compile(r"\d+(?:[.,:]\d+)+|\w+(?:['’\-]\w+)*")


def _is_closed_class(word: str, closed: frozenset[str]) -> bool:
    w = word.lower().replace("’", "'")
    if w in closed or w in _NEG_CONTRACTIONS:
        return True
    if w.endswith("n't"):
        return w[:-3] in closed
    for clitic in _CLITICS:
        if w.endswith(clitic):
            return w[: -len(clitic)] in closed
    return False


def builtin_spans(text: str, extra_closed_class: Iterable[str] = ()) -> list[tuple[int, int]]:
    """Offline phrase splitter: char spans `(start, end)` of the maximal runs of consecutive content words.

    Words are matched by `_WORD_RE` (numbers such as "3.14" and words with inner apostrophes or hyphens are one
    word). Two consecutive content words belong to the same phrase only if the text between them is whitespace
    without a line break; punctuation, line breaks and closed-class words (`CLOSED_CLASS_WORDS`: determiners,
    pronouns, prepositions, conjunctions, auxiliaries and modals, the particles "not"/"there", and their
    contractions such as "it's", "don't", "can't") end a phrase and are in no span. `extra_closed_class` adds words
    to the closed classes. A phrase of one word is returned too; `span_ids_from_tokens` drops the spans that cover
    fewer than 2 tokens.

    >>> builtin_spans("The quick brown fox jumps over the lazy dog.")
    [(4, 25), (35, 43)]
    """
    closed = _CLOSED | frozenset(w.lower() for w in extra_closed_class) if extra_closed_class else _CLOSED
    spans: list[tuple[int, int]] = []
    start = end = -1
    for m in _WORD_RE.finditer(text):
        if _is_closed_class(m.group(), closed):
            if start >= 0:
                spans.append((start, end))
                start = -1
            continue
        if start >= 0:
            gap = text[end : m.start()]
            if gap.isspace() and "\n" not in gap and "\r" not in gap:
                end = m.end()
                continue
            spans.append((start, end))
        start, end = m.start(), m.end()
    if start >= 0:
        spans.append((start, end))
    return spans


# --------------------------------------------------------------------------------------------------------------------
# Optional extractors
# --------------------------------------------------------------------------------------------------------------------

#: Default grammar of `nltk_spans`: noun phrases, prepositional phrases (a preposition and its NP) and verb groups.
NLTK_GRAMMAR = r"""
NP: {<DT|PDT|PRP\$|POS|CD>*<JJ.*|VBN|VBG|NN.*|CD>*<NN.*|CD>}
PP: {<IN|TO><NP>}
VP: {<MD>?<RB.*>*<VB.*>+<RP>?}
"""

_NLTK_TAGGER_RESOURCE = "averaged_perceptron_tagger_eng"
#: Tokens for the NLTK tagger: words as in `builtin_spans`, or single punctuation characters.
_NLTK_TOKEN_RE = re.compile(r"\d+(?:[.,:]\d+)+|\w+(?:['’\-]\w+)*|[^\w\s]")


def _import_nltk():
    try:
        import nltk
    except ImportError as e:
        raise SpanBackendUnavailableError(
            "span_extractor='nltk' needs the NLTK package: `pip install nltk` (or `pip install trl-mgsr[nltk]`), then "
            f"its tagger data: `python -m nltk.downloader {_NLTK_TAGGER_RESOURCE}`. The offline default is "
            "span_extractor='builtin'."
        ) from e
    return nltk


def _nltk_data_error(err: Exception) -> SpanBackendUnavailableError:
    return SpanBackendUnavailableError(
        f"span_extractor='nltk' needs NLTK's part-of-speech tagger data, which is not installed: run "
        f"`python -m nltk.downloader {_NLTK_TAGGER_RESOURCE}` (or `nltk.download('{_NLTK_TAGGER_RESOURCE}')`) on a "
        "machine with internet access, or point NLTK_DATA at a copy. The offline default is "
        f"span_extractor='builtin'. Original error: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
    )


@functools.lru_cache(maxsize=8)
def _nltk_parser(grammar: str):
    return _import_nltk().RegexpParser(grammar)


def nltk_spans(
    text: str, grammar: str | None = None, tagger: Callable[[list[str]], list[tuple[str, str]]] | None = None
) -> list[tuple[int, int]]:
    """Char spans of the top-level chunks of an NLTK regexp chunker (default grammar `NLTK_GRAMMAR`: NP, PP, VP).

    The text is split into words and punctuation with a regex (no punkt data needed) and tagged with `tagger`
    (default `nltk.pos_tag`, which needs the `averaged_perceptron_tagger_eng` data). Raises
    `SpanBackendUnavailableError` saying what to install when NLTK or its tagger data is missing.
    """
    nltk = _import_nltk()
    offsets = [(m.start(), m.end()) for m in _NLTK_TOKEN_RE.finditer(text)]
    if not offsets:
        return []
    words = [text[a:b] for a, b in offsets]
    try:
        tagged = (tagger or nltk.pos_tag)(words)
    except LookupError as e:
        raise _nltk_data_error(e) from e
    tree = _nltk_parser(grammar or NLTK_GRAMMAR).parse([(str(i), tag) for i, (_, tag) in enumerate(tagged)])
    spans = []
    for node in tree:
        if isinstance(node, nltk.Tree):
            leaves = node.leaves()
            spans.append((offsets[int(leaves[0][0])][0], offsets[int(leaves[-1][0])][1]))
    return spans


@functools.lru_cache(maxsize=4)
def _load_spacy(model: str):
    try:
        import spacy
    except ImportError as e:
        raise SpanBackendUnavailableError(
            "span_extractor='spacy' needs spaCy: `pip install spacy` (or `pip install trl-mgsr[spacy]`), then a "
            f"pipeline with a dependency parser: `python -m spacy download {model}`. The offline default is "
            "span_extractor='builtin'."
        ) from e
    try:
        return spacy.load(model)
    except OSError as e:
        raise SpanBackendUnavailableError(
            f"span_extractor='spacy' could not load the spaCy pipeline {model!r}: it is not installed. Run "
            f"`python -m spacy download {model}` on a machine with internet access (or pass "
            "span_extractor_kwargs={'model': '/path/to/pipeline'}). The offline default is span_extractor='builtin'."
        ) from e


def spacy_spans(text: str, model: str | Callable[[str], Any] = "en_core_web_sm") -> list[tuple[int, int]]:
    """Char spans of spaCy's noun chunks.

    `model`: a pipeline name or path for `spacy.load` (loaded once and cached), or a loaded pipeline (any callable
    `text -> Doc`). The pipeline needs a dependency parser. Raises `SpanBackendUnavailableError` saying what to
    install when spaCy or the pipeline is missing.
    """
    nlp = _load_spacy(model) if isinstance(model, str) else model
    doc = nlp(text)
    try:
        return [(chunk.start_char, chunk.end_char) for chunk in doc.noun_chunks]
    except ValueError as e:  # E029: noun_chunks requires the dependency parse
        raise SpanBackendUnavailableError(
            f"span_extractor='spacy': the pipeline {model!r} has no dependency parser, which noun chunks need; use a "
            "trained pipeline such as en_core_web_sm (`python -m spacy download en_core_web_sm`)."
        ) from e


_EXTRACTORS = {"builtin": builtin_spans, "nltk": nltk_spans, "spacy": spacy_spans}


def _check_kwargs(extractor: Callable, kwargs: dict[str, Any], name: str) -> None:
    """Raise a `ValueError` naming `span_extractor_kwargs` when `extractor(text, **kwargs)` cannot be called."""
    try:
        inspect.signature(extractor).bind_partial("text", **kwargs)
    except TypeError as err:
        raise ValueError(
            f"span_extractor_kwargs {kwargs} do not fit the {name} span extractor ({err}); its parameters: "
            f"{inspect.signature(extractor)}."
        ) from None
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass


def get_span_extractor(name_or_callable: str | SpanExtractor = "builtin", **kwargs: Any) -> SpanExtractor:
    """The extractor `text -> [(start_char, end_char)]` for `"builtin"`, `"nltk"`, `"spacy"` or a callable.

    `kwargs` are bound to it (e.g. `model="en_core_web_md"` for spaCy, `grammar=...` for NLTK,
    `extra_closed_class=[...]` for builtin). The optional backends are checked here, so a missing package or model
    fails at setup with `SpanBackendUnavailableError` rather than in the middle of training.
    """
    if callable(name_or_callable):
        _check_kwargs(name_or_callable, kwargs, getattr(name_or_callable, "__name__", "the callable"))
        return functools.partial(name_or_callable, **kwargs) if kwargs else name_or_callable
    if name_or_callable in SPAN_EXTRACTOR_NAMES:
        _check_kwargs(_EXTRACTORS[name_or_callable], kwargs, repr(name_or_callable))
    if name_or_callable == "builtin":
        return functools.partial(builtin_spans, **kwargs) if kwargs else builtin_spans
    if name_or_callable == "nltk":
        extractor = functools.partial(nltk_spans, **kwargs)
        extractor("Check the tagger.")  # raises SpanBackendUnavailableError when the tagger data is missing
        return extractor
    if name_or_callable == "spacy":
        model = kwargs.get("model", "en_core_web_sm")
        if isinstance(model, str):
            _load_spacy(model)
        return functools.partial(spacy_spans, **kwargs)
    raise ValueError(
        f"Unknown span extractor {name_or_callable!r}: use one of {SPAN_EXTRACTOR_NAMES} or a callable "
        "text -> list[(start_char, end_char)]."
    )


# --------------------------------------------------------------------------------------------------------------------
# Text -> tokens
# --------------------------------------------------------------------------------------------------------------------


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids of the special tokens (transformers' `all_special_ids` and the backend's special added tokens)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "decode_batch"):  # a raw `tokenizers.Tokenizer`
        backend = tokenizer
    if backend is not None:
        ids.update(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    return frozenset(ids)


def _offsets_stream(backend, ids: Sequence[int], special: frozenset[int]) -> tuple[str, list[int], list[int]]:
    """Decode `ids` once, incrementally, with `tokenizers`' DecodeStream; per-token char ranges in the text.

    Special tokens get an empty range and are not decoded. A token that completes no character yet (a byte of a
    multi-byte UTF-8 character, a lone "▁") gets the range of the text emitted by the next token that does, so the
    pieces of a split character overlap the same characters.
    """
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    n = len(ids)
    starts, ends = [0] * n, [0] * n
    pieces: list[str] = []
    pending: list[int] = []
    pos = 0
    for i, tid in enumerate(ids):
        if tid in special:
            starts[i] = ends[i] = pos
            continue
        chunk = stream.step(backend, tid)
        if chunk is None:
            pending.append(i)
            continue
        new = pos + len(chunk)
        starts[i], ends[i] = pos, new
        for j in pending:
            starts[j], ends[j] = pos, new
        pending.clear()
        pieces.append(chunk)
        pos = new
    text = "".join(pieces)
    if pending:  # the text ends inside a character (truncated generation): decode the rest as a whole
        full = backend.decode([t for t in ids if t not in special], skip_special_tokens=False)
        if full.startswith(text) and len(full) > len(text):
            for j in pending:
                starts[j], ends[j] = len(text), len(full)
            text = full
        else:
            for j in pending:
                starts[j] = ends[j] = len(text)
    return text, starts, ends


def _offsets_prefix(decode: Callable[[list[int]], str], ids: Sequence[int], special: frozenset[int]):
    """Fallback for tokenizers without a usable `tokenizers` backend: decode growing prefixes (O(T^2), slow but
    generic). A prefix whose text ends in U+FFFD (an incomplete character) is held back, like DecodeStream does, and
    its tokens get the range of the text that the completing token adds."""
    n = len(ids)
    starts, ends = [0] * n, [0] * n
    kept: list[int] = []
    pending: list[int] = []
    prev = ""

    def commit(cur: str) -> None:
        common, limit = 0, min(len(prev), len(cur))
        while common < limit and prev[common] == cur[common]:
            common += 1
        for j in pending:
            starts[j], ends[j] = common, len(cur)
        pending.clear()

    for i, tid in enumerate(ids):
        if tid in special:
            starts[i] = ends[i] = len(prev)
            continue
        kept.append(tid)
        pending.append(i)
        cur = decode(kept)
        if not cur.endswith("\ufffd"):
            commit(cur)
            prev = cur
    if pending:  # the text ends inside a character
        cur = decode(kept)
        commit(cur)
        prev = cur
    return prev, starts, ends


def _char_offsets(tokenizer, ids: Sequence[int], special: frozenset[int]) -> tuple[str, list[int], list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "decode_batch"):  # a raw `tokenizers.Tokenizer`
        backend = tokenizer
    if backend is not None:
        try:
            return _offsets_stream(backend, ids, special)
        except Exception:  # a decoder that rewrites already emitted text: fall back to the generic path
            return _offsets_prefix(lambda x: backend.decode(x, skip_special_tokens=False), ids, special)
    return _offsets_prefix(
        lambda x: tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False), ids, special
    )


_CONNECTORS = frozenset("'’-")


def _is_word_char(c: str) -> bool:
    # U+FFFD stands for a character cut by truncation: it belongs to the word it ends.
    return c.isalnum() or c == "_" or c == "\ufffd" or unicodedata.category(c)[0] == "M"


def _is_joiner(text: str, j: int) -> bool:
    """Whether text[j] joins its neighbours into one word: an apostrophe or hyphen between word characters
    ("don't", "well-known"), or a separator between digits ("3.14", "1,000")."""
    if j <= 0 or j + 1 >= len(text):
        return False
    c = text[j]
    if c in _CONNECTORS:
        return _is_word_char(text[j - 1]) and _is_word_char(text[j + 1])
    if c in ".,:":
        return text[j - 1].isdigit() and text[j + 1].isdigit()
    return False


def _inside_word(text: str, i: int) -> bool:
    """Whether the boundary between text[i-1] and text[i] lies inside one word."""
    if i <= 0 or i >= len(text):
        return False
    if _is_word_char(text[i - 1]) and _is_word_char(text[i]):
        return True
    return _is_joiner(text, i - 1) or _is_joiner(text, i)


def _normalise_spans(text: str, spans: Iterable[Sequence[int]]) -> list[list[int]]:
    """Validate, clip, widen to whole words, sort and merge overlapping spans."""
    n = len(text)
    out = []
    for span in spans:
        try:
            a, b = int(span[0]), int(span[1])
        except (TypeError, ValueError, IndexError) as e:
            raise TypeError(
                f"A span extractor must return a list of (start_char, end_char) pairs of ints; got {span!r}."
            ) from e
        a, b = max(a, 0), min(b, n)
        if a >= b:
            continue
        while _inside_word(text, a):
            a -= 1
        while _inside_word(text, b):
            b += 1
        out.append([a, b])
    out.sort()
    merged: list[list[int]] = []
    for a, b in out:
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _token_span_ids(starts: list[int], ends: list[int], spans: list[list[int]]) -> list[int]:
    """Span id per token (-1 outside spans): a token is in a span if its characters overlap it; a token that
    overlaps several spans merges them; spans of fewer than 2 tokens are dropped; ids are renumbered 0, 1, ..."""
    n = len(starts)
    labels = [-1] * n
    if not spans:
        return labels
    parent = list(range(len(spans)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    j = 0
    m = len(spans)
    for i in range(n):
        s, e = starts[i], ends[i]
        if s >= e:
            continue
        while j < m and spans[j][1] <= s:
            j += 1
        if j == m:
            break
        if spans[j][0] >= e:
            continue
        labels[i] = j
        k = j + 1
        while k < m and spans[k][0] < e:
            parent[find(k)] = find(j)
            k += 1
    counts: dict[int, int] = {}
    for i in range(n):
        if labels[i] >= 0:
            labels[i] = r = find(labels[i])
            counts[r] = counts.get(r, 0) + 1
    renumber: dict[int, int] = {}
    for i in range(n):
        r = labels[i]
        if r < 0:
            continue
        if counts[r] < 2:
            labels[i] = -1
            continue
        if r not in renumber:
            renumber[r] = len(renumber)
        labels[i] = renumber[r]
    return labels


def spans_for_token_ids(
    tokenizer, ids: Sequence[int], extractor: SpanExtractor = builtin_spans, special_ids: frozenset[int] | None = None
) -> tuple[str, list[int]]:
    """One sequence: `(text, span id per token)` for the token ids `ids` of a completion."""
    special = _special_ids(tokenizer) if special_ids is None else special_ids
    text, starts, ends = _char_offsets(tokenizer, ids, special)
    spans = _normalise_spans(text, extractor(text)) if text else []
    return text, _token_span_ids(starts, ends, spans)


@torch.no_grad()
def span_ids_from_tokens(
    tokenizer,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    extractor: str | SpanExtractor = "builtin",
) -> torch.Tensor:
    """Span ids `[B, T]` (long, on `input_ids.device`) of the completion tokens of each row; -1 elsewhere.

    For each row, the tokens where `completion_mask` is True (contiguous in practice; rows may be left-padded)
    are decoded once to text, with per-token character offsets (byte-level BPE, Metaspace/SentencePiece and
    WordPiece decoders, multi-byte characters split across tokens, text cut mid-word or mid-character). Special
    tokens (e.g. a final eos) are not decoded and are in no span. The extractor's character spans are widened to
    whole words (so the pieces of one word always share a span) and mapped to tokens: a token belongs to a span if
    its characters overlap it, and a token overlapping two spans joins them. Spans covering fewer than 2 tokens
    are dropped; the remaining ones are numbered 0, 1, 2, ... per row in text order.

    `tokenizer`: a fast `PreTrainedTokenizerFast` (or a `tokenizers.Tokenizer`); a slow tokenizer works through a
    generic, slower path. `extractor`: a name for `get_span_extractor` or a callable `text -> [(start, end)]`.
    The ids are aligned with `input_ids` (position t is the span of token t); shift them like the labels.
    """
    if input_ids.shape != completion_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and completion_mask {tuple(completion_mask.shape)} differ")
    extract = get_span_extractor(extractor) if isinstance(extractor, str) else extractor
    special = _special_ids(tokenizer)
    rows = input_ids.tolist()
    masks = completion_mask.bool().tolist()
    out = []
    for ids, mask in zip(rows, masks):
        row = [-1] * len(ids)
        positions = [t for t, keep in enumerate(mask) if keep]
        if positions:
            _, labels = spans_for_token_ids(tokenizer, [ids[t] for t in positions], extract, special)
            for t, label in zip(positions, labels):
                row[t] = label
        out.append(row)
    return torch.tensor(out, dtype=torch.long).reshape(input_ids.shape).to(input_ids.device)


def span_pair_mask(span_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]` bool: True at k iff (k, k+1) is a pair, i.e. same span id != -1 and both labels != -100.

    Position T-1 is always False. `span_ids` and `labels` must be aligned (both shifted the same way).
    """
    if span_ids.shape != labels.shape:
        raise ValueError(f"span_ids {tuple(span_ids.shape)} and labels {tuple(labels.shape)} differ")
    mask = torch.zeros_like(span_ids, dtype=torch.bool)
    valid = (span_ids != -1) & (labels != -100)
    mask[..., :-1] = valid[..., :-1] & valid[..., 1:] & (span_ids[..., :-1] == span_ids[..., 1:])
    return mask


def span_groups(span_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens of every span holding at least one pair (two adjacent labelled tokens of one span).

    Returns `(rows [n], group [n], num_groups)`: flat indices (into `[B * T]`, ascending) of those tokens, the
    index `0 .. num_groups - 1` of the span each belongs to, and the number of such spans (a long scalar tensor).
    """
    pairs = span_pair_mask(span_ids, labels)
    in_pair = pairs.clone()
    in_pair[..., 1:] |= pairs[..., :-1]
    starts = in_pair.clone()
    starts[..., 1:] &= ~pairs[..., :-1]  # a span's first paired token: not paired with its predecessor
    rows = in_pair.reshape(-1).nonzero().squeeze(-1)
    group = starts.reshape(-1).long().cumsum(0)[rows] - 1
    return rows, group, starts.sum()


def span_counts(span_ids: torch.Tensor) -> torch.Tensor:
    """Number of spans per row `[B]` (long) of a span-id tensor `[B, T]` (ids are 0, 1, ... per row, -1 elsewhere);
    for the "spans per sequence" metric."""
    if span_ids.shape[-1] == 0:
        return torch.zeros(span_ids.shape[:-1], dtype=torch.long, device=span_ids.device)
    return (span_ids.max(dim=-1).values + 1).clamp_min(0).long()
