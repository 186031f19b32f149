"""Tests of SCRG (trl_mgsr/scrg.py).

Most tests use `TableLM`, a bigram model whose next-token logits are a row of a lookup table indexed by the previous
token, so teacher/student disagreements, divergences and generations are known exactly. Token ranges:

- 0 = pad, 1 = eos;
- the teacher's next token `tnext[a]` is in 2..11, the student's `snext[a]` in 12..21 (so a re-generated suffix that
  comes from the student is recognisable), 22..31 are free tokens used to place divergences;
- teacher logits: `h[a]` on `tnext[a]`, 0 elsewhere; student logits: `g[a]` on `snext[a]`, 0 elsewhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from trl_mgsr.scrg import (
    assemble_on_policy_batch,
    completion_from_generate,
    completion_mask_from_ids,
    scrg_revise,
)

V = 32
PAD, EOS = 0, 1


# ----------------------------------------------------------------------------------------------------------------------
# A model whose logits we control
# ----------------------------------------------------------------------------------------------------------------------


class TableConfig(PretrainedConfig):
    model_type = "scrg_table_lm"

    def __init__(self, vocab_size: int = V, **kwargs):
        self.vocab_size = vocab_size
        self.num_hidden_layers = 1
        super().__init__(**kwargs)


class TableLM(PreTrainedModel, GenerationMixin):
    """Next-token logits = `table[previous token]`; ignores the cache (recomputes from `input_ids`)."""

    config_class = TableConfig

    def __init__(self, config: TableConfig, table: torch.Tensor | None = None):
        super().__init__(config)
        self.table = torch.nn.Parameter(
            torch.zeros(config.vocab_size, config.vocab_size) if table is None else table.clone().float()
        )
        self.dropout = torch.nn.Dropout(0.0)
        self.forward_calls = 0
        self.training_seen: list[bool] = []
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        self.forward_calls += 1
        self.training_seen.append(self.training)
        logits = self.dropout(self.table[input_ids])
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def tnext_default(a: int) -> int:
    return 2 + a % 10


def snext_default(a: int) -> int:
    return 12 + a % 10


def make_pair(h=None, g=None, tnext=None, snext=None, pad=PAD, eos=EOS, vocab=V):
    """(student, teacher) TableLMs; `h`, `g`, `tnext`, `snext`: dicts overriding the defaults per previous token."""
    h, g, tnext, snext = h or {}, g or {}, tnext or {}, snext or {}
    T = torch.zeros(vocab, vocab)
    S = torch.zeros(vocab, vocab)
    for a in range(vocab):
        T[a, tnext.get(a, tnext_default(a))] = h.get(a, 2.0)
        S[a, snext.get(a, snext_default(a))] = g.get(a, 5.0)
    cfg = dict(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos)
    return TableLM(TableConfig(**cfg), S), TableLM(TableConfig(**cfg), T)


def ref_D(teacher, student, a: int, reverse: bool = False) -> float:
    """KL between the two models' next-token distributions after token `a`, computed directly."""
    lp = F.log_softmax(teacher.table[a].detach().double(), -1)
    lq = F.log_softmax(student.table[a].detach().double(), -1)
    if reverse:
        lp, lq = lq, lp
    return float((lp.exp() * (lp - lq)).sum())


def teacher_argmax(teacher, a: int) -> int:
    return int(teacher.table[a].argmax())


def batch(prompts, completions, lengths=None, pad=PAD):
    """Left-pad prompts, right-pad completions; `lengths[r]` real completion tokens (default: all)."""
    P = max(len(p) for p in prompts)
    L = max(len(c) for c in completions)
    pid = torch.full((len(prompts), P), pad, dtype=torch.long)
    pm = torch.zeros((len(prompts), P), dtype=torch.long)
    cid = torch.full((len(prompts), L), pad, dtype=torch.long)
    cm = torch.zeros((len(prompts), L), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        pid[r, P - len(p):] = torch.tensor(p)
        pm[r, P - len(p):] = 1
        cid[r, : len(c)] = torch.tensor(c)
        n = len(c) if lengths is None else lengths[r]
        cm[r, :n] = 1
    return pid, pm, cid, cm


def greedy(max_new_tokens, pad=PAD, eos=EOS, **kw):
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos, use_cache=False, **kw
    )


def revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, pad=PAD, eos=EOS, **kw):
    """`scrg_revise` with greedy re-generation; the paper's error rule unless the test names another."""
    kw.setdefault("error_rule", "max_divergence")
    return scrg_revise(
        student, teacher, pid, pm, cid, cm,
        generation_config=kw.pop("generation_config", None) or greedy(max_new_tokens, pad=pad, eos=eos),
        eos_token_ids=kw.pop("eos_token_ids", eos), pad_token_id=pad, **kw,
    )


def row_tokens(ids, mask, r):
    return ids[r][mask[r].bool()].tolist()


def check_invariants(res, cid, cm, max_new_tokens, eos_ids=(EOS,)):
    """Invariants every SCRG result must satisfy, whatever the models."""
    B = cid.shape[0]
    lengths = res.completion_mask.sum(1)
    assert (lengths <= max_new_tokens).all()
    positions = torch.arange(res.completion_mask.shape[1])
    # mask is contiguous from the start
    assert torch.equal(res.completion_mask.bool(), positions.unsqueeze(0) < lengths.unsqueeze(1))
    for r in range(B):
        toks = row_tokens(res.completion_ids, res.completion_mask, r)
        # nothing after the first end token
        ends = [i for i, x in enumerate(toks) if x in eos_ids]
        assert not ends or ends[0] == len(toks) - 1
        if res.corrected[r]:
            j = int(res.error_pos[r])
            if res.num_corrections[r] == 1:  # else the prefix is the previous round's output
                assert toks[:j] == cid[r, :j].tolist()
            assert toks[j] == int(res.teacher_token[r])
            assert len(toks) == j + 1 + int(res.regen_len[r])
        else:
            assert toks == row_tokens(cid, cm, r)
            assert res.error_pos[r] == -1 and res.teacher_token[r] == -1
            assert res.divergence[r] == 0 and res.regen_len[r] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Error position, correction and re-generation
# ----------------------------------------------------------------------------------------------------------------------

# Row used by several tests: prompt [2, 3], completion y = [5, 22, 4, 23, EOS] then padding.
#   pos 0: y0 = 5 = tnext[3]                  match,    D(3)  large (h=9)  -> not a candidate
#   pos 1: y1 = 22 != tnext[5] = 7            mismatch, D(5)  medium (h=4) -> the expected j
#   pos 2: y2 = 4 = tnext[22]                 match,    D(22) large (h=8)  -> not a candidate
#   pos 3: y3 = 23 != tnext[4] = 6            mismatch, D(4)  small (h=1)
#   pos 4: y4 = EOS != tnext[23] = 3          mismatch, D(23) small (h=1.5)
#   pos 5..: padding (mask 0), mismatching,   D(EOS), D(PAD) largest (h=10, 12) -> not candidates
H_ROW = {3: 9.0, 5: 4.0, 22: 8.0, 4: 1.0, 23: 1.5, EOS: 10.0, PAD: 12.0}
PROMPT, COMPLETION = [2, 3], [5, 22, 4, 23, EOS, PAD, PAD]


def test_error_position_is_argmax_over_mismatching_real_tokens():
    student, teacher = make_pair(h=H_ROW)
    pid, pm, cid, cm = batch([PROMPT], [COMPLETION], lengths=[5])
    d = {i: ref_D(teacher, student, a) for i, a in enumerate([3] + COMPLETION[:-1])}  # D_i depends on y_{i-1}
    # The construction: the matching positions 0, 2 and the padding positions 5, 6 have a larger D than position 1.
    assert min(d[0], d[2], d[5], d[6]) > d[1] > max(d[3], d[4])

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8)

    assert res.corrected.tolist() == [True]
    assert res.error_pos.tolist() == [1]
    assert res.teacher_token.tolist() == [teacher_argmax(teacher, 5)] == [7]
    assert res.divergence[0].item() == pytest.approx(d[1], rel=1e-5)
    toks = row_tokens(res.completion_ids, res.completion_mask, 0)
    assert toks[:1] == [5]  # prefix before j unchanged
    assert toks[1] == 7  # teacher token at j
    # The suffix is the student's greedy chain from 7 (student range 12..21), not the teacher's (2..11).
    expected_suffix, a = [], 7
    for _ in range(8 - 2):
        a = snext_default(a)
        expected_suffix.append(a)
    assert toks[2:] == expected_suffix
    assert all(12 <= x <= 21 for x in toks[2:])
    assert res.regen_len.tolist() == [6]
    check_invariants(res, cid, cm, 8)


# Row for `error_rule="first_rejected"`: prompt [2, 3], completion y = [23, 24, 25, 26, EOS]; every token mismatches
# the teacher's, whose probability ratio p(y_i) / max p is exp(-h[y_{i-1}]):
#   pos 0: h[3] = 1   ratio 0.37    pos 1: h[23] = 3   ratio 0.050    pos 2: h[24] = 8   ratio 3e-4 (largest D)
#   pos 3: h[25] = 1                pos 4: h[26] = 1
H_REJECT = {3: 1.0, 23: 3.0, 24: 8.0, 25: 1.0, 26: 1.0}
REJECT_COMPLETION = [23, 24, 25, 26, EOS]


@pytest.mark.parametrize("ratio, expected_j", [(0.5, 0), (0.1, 1), (0.01, 2)])
def test_first_rejected_is_the_first_token_below_the_ratio(ratio, expected_j):
    student, teacher = make_pair(h=H_REJECT)
    pid, pm, cid, cm = batch([PROMPT], [REJECT_COMPLETION])
    paper = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8)
    assert paper.error_pos.tolist() == [2]  # the paper's rule picks the largest divergence, not the first error

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, error_rule="first_rejected",
                 reject_ratio=ratio)

    prev = ([3] + REJECT_COMPLETION)[expected_j]
    assert res.error_pos.tolist() == [expected_j]
    assert res.teacher_token.tolist() == [teacher_argmax(teacher, prev)]
    assert res.divergence[0].item() == pytest.approx(H_REJECT[prev], rel=1e-5)  # log(max p / p(y_j))
    check_invariants(res, cid, cm, 8)


def test_first_rejected_leaves_accepted_rows_alone_and_needs_no_student_forward():
    student, teacher = make_pair(h=H_REJECT)
    # Row 0 is the rejected row; row 1's tokens all have ratio exp(-1) (h = 1 after 3, 25, 26): accepted whole.
    pid, pm, cid, cm = batch([PROMPT, PROMPT], [REJECT_COMPLETION, [25, 26, EOS, PAD, PAD]], lengths=[5, 3])
    calls = []
    orig = student.generate
    student.generate = lambda *a, **k: calls.append(k["input_ids"].shape[0]) or orig(*a, **k)
    before = student.forward_calls

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, error_rule="first_rejected")

    assert res.corrected.tolist() == [True, False]
    assert row_tokens(res.completion_ids, res.completion_mask, 1) == [25, 26, EOS]
    assert calls == [1]  # only the corrected row is re-generated
    regenerated = int(res.regen_len[0])
    assert student.forward_calls - before == regenerated  # generate's own steps; no teacher-forced student pass
    check_invariants(res, cid, cm, 8)


def test_stop_continuation_ends_corrected_rows_at_the_correction_without_generating():
    student, teacher = make_pair(h=H_REJECT)
    pid, pm, cid, cm = batch([PROMPT, PROMPT], [REJECT_COMPLETION, [25, 26, EOS, PAD, PAD]], lengths=[5, 3])
    regenerated = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, error_rule="first_rejected")
    student.generate = lambda *a, **k: pytest.fail("'stop' must not generate")

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, error_rule="first_rejected",
                 continuation="stop", always_generate=True)

    j = int(res.error_pos[0])
    assert res.corrected.tolist() == [True, False] and j == int(regenerated.error_pos[0])  # same decisions
    assert row_tokens(res.completion_ids, res.completion_mask, 0) == row_tokens(
        regenerated.completion_ids, regenerated.completion_mask, 0)[: j + 1]  # y_<j + [t_j], nothing after
    assert row_tokens(res.completion_ids, res.completion_mask, 1) == [25, 26, EOS]
    assert res.regen_len.tolist() == [0, 0]
    again = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, error_rule="first_rejected",
                   continuation="stop", rounds=2)
    assert torch.equal(again.completion_ids, res.completion_ids)  # a second round finds nothing left to correct
    with pytest.raises(ValueError, match="continuation"):
        revise(student, teacher, pid, pm, cid, cm, error_rule="first_rejected", continuation="truncate")


@pytest.mark.parametrize("continuation", ["regenerate", "stop"])
def test_kept_teacher_logits_predict_the_revised_rows_up_to_teacher_valid(continuation):
    student, teacher = make_pair(h=H_REJECT)
    pid, pm, cid, cm = batch([PROMPT, PROMPT], [REJECT_COMPLETION, [25, 26, EOS, PAD, PAD]], lengths=[5, 3])
    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, error_rule="first_rejected",
                 continuation=continuation, keep_teacher_logits=True)
    assert res.teacher_valid.tolist() == [int(res.error_pos[0]) + 1, cid.shape[1]]
    ids = torch.cat([pid, res.completion_ids], 1)
    forced = teacher.table.detach()[ids[:, pid.shape[1] - 1 : -1]]  # TableLM: logits = table[previous token]
    for r in range(2):
        n = int(res.teacher_valid[r])
        torch.testing.assert_close(res.teacher_logits[r, :n], forced[r, :n])
    plain = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, error_rule="first_rejected")
    assert plain.teacher_logits is None and plain.teacher_valid is None


def test_first_rejected_rejects_bad_ratio():
    student, teacher = make_pair()
    pid, pm, cid, cm = batch([PROMPT], [REJECT_COMPLETION])
    with pytest.raises(ValueError, match="reject_ratio"):
        revise(student, teacher, pid, pm, cid, cm, error_rule="first_rejected", reject_ratio=1.0)
    with pytest.raises(ValueError, match="error_rule"):
        revise(student, teacher, pid, pm, cid, cm, error_rule="last")


def test_agreeing_row_is_unchanged_and_corrected_row_next_to_it():
    student, teacher = make_pair(h=H_ROW)
    # Row 1 follows the teacher's chain exactly (then padding that mismatches, which must not count).
    agree, a = [], 6
    for _ in range(4):
        a = tnext_default(a)
        agree.append(a)
    pid, pm, cid, cm = batch([PROMPT, [2, 6]], [COMPLETION, agree + [PAD, PAD, PAD]], lengths=[5, 4])

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8)

    assert res.corrected.tolist() == [True, False]
    assert res.error_pos[1] == -1 and res.teacher_token[1] == -1
    assert res.divergence[1] == 0 and res.regen_len[1] == 0 and res.num_corrections[1] == 0
    L = cid.shape[1]
    assert torch.equal(res.completion_ids[1, :L], cid[1]) and torch.equal(res.completion_mask[1, :L], cm[1])
    assert not res.completion_mask[1, L:].any()
    check_invariants(res, cid, cm, 8)


@pytest.mark.parametrize("max_new_tokens", [3, 5, 7])
def test_suffix_from_student_and_budget_respected(max_new_tokens):
    # Three rows whose errors sit at positions 0, 2 and 4 (one free token 22 with a big D before each error).
    student, teacher = make_pair(h={22: 9.0})
    rows = []
    for j in (0, 2, 4):
        prompt = [3, 22] if j == 0 else [3]
        comp, a = [], prompt[-1]
        for i in range(max_new_tokens):
            if i == j - 1:
                a = 22
            elif i == j:
                a = 30  # != tnext[22]
            else:
                a = tnext_default(a)
            comp.append(a)
        rows.append((prompt, comp))
    pid, pm, cid, cm = batch([p for p, _ in rows], [c for _, c in rows])

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=max_new_tokens)

    check_invariants(res, cid, cm, max_new_tokens)
    assert res.completion_mask.sum(1).max() <= max_new_tokens
    for r, j in enumerate((0, 2, 4)):
        if j >= max_new_tokens:
            assert not res.corrected[r]
            continue
        assert res.error_pos[r] == j
        toks = row_tokens(res.completion_ids, res.completion_mask, r)
        assert len(toks) == max_new_tokens  # the student never ends: it fills the budget exactly
        assert res.regen_len[r] == max_new_tokens - j - 1
        assert all(12 <= x <= 21 for x in toks[j + 1:])  # student tokens, never the teacher's


def test_student_regeneration_stops_at_its_end_token():
    # The student ends after token 19 (snext[19] = EOS): the re-generated row 7 -> 19 -> EOS ends with that EOS.
    student, teacher = make_pair(h=H_ROW, snext={19: EOS})
    pid, pm, cid, cm = batch([PROMPT], [COMPLETION], lengths=[5])
    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8)
    toks = row_tokens(res.completion_ids, res.completion_mask, 0)
    assert toks == [5, 7, 19, EOS]
    assert res.regen_len.tolist() == [2]
    _, _, labels = assemble_on_policy_batch(pid, pm, res.completion_ids, res.completion_mask, PAD)
    assert labels[0, pid.shape[1]:][labels[0, pid.shape[1]:] != -100].tolist() == [5, 7, 19, EOS]


def test_one_teacher_forward_one_student_forward_one_generate_per_round():
    student, teacher = make_pair(h=H_ROW)
    pid, pm, cid, cm = batch([PROMPT, [4, 3], [2, 2, 3]], [COMPLETION] * 3, lengths=[5, 5, 5])
    calls = []
    orig = student.generate

    def counting_generate(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append((kwargs["input_ids"].shape[0], out.sequences.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    student.generate = counting_generate
    before_t, before_s = teacher.forward_calls, student.forward_calls
    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, rounds=2)
    assert res.corrected.all()
    assert len(calls) == 2 and all(rows == 3 for rows, _ in calls)  # one batched call per round, all rows
    assert teacher.forward_calls - before_t == 2
    # student: one teacher-forced forward per round + one forward per generated token of each generate call
    assert student.forward_calls - before_s == 2 + sum(steps for _, steps in calls)


def test_always_generate_calls_generate_without_corrections():
    student, teacher = make_pair()
    agree, a = [], 3
    for _ in range(4):
        a = tnext_default(a)
        agree.append(a)
    pid, pm, cid, cm = batch([[2, 3]], [agree])
    calls = []
    orig = student.generate
    student.generate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    res = revise(student, teacher, pid, pm, cid, cm)
    assert not res.corrected.any() and calls == []
    res = revise(student, teacher, pid, pm, cid, cm, always_generate=True)
    assert not res.corrected.any() and calls == [1]
    assert torch.equal(res.completion_ids[:, : cid.shape[1]], cid)


# ----------------------------------------------------------------------------------------------------------------------
# Batched == row by row
# ----------------------------------------------------------------------------------------------------------------------


def _rows_alone_equal_batched(student, teacher, prompts, completions, lengths, max_new_tokens, pad, eos, **kw):
    pid, pm, cid, cm = batch(prompts, completions, lengths, pad=pad)
    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=max_new_tokens, pad=pad, eos=eos, **kw)
    check_invariants(res, cid, cm, max_new_tokens, eos_ids=(eos,))
    for r in range(len(prompts)):
        n = lengths[r]
        p1, pm1, c1, cm1 = batch([prompts[r]], [completions[r][:n]], pad=pad)
        alone = revise(student, teacher, p1, pm1, c1, cm1, max_new_tokens=max_new_tokens, pad=pad, eos=eos, **kw)
        assert row_tokens(res.completion_ids, res.completion_mask, r) == row_tokens(
            alone.completion_ids, alone.completion_mask, 0
        )
        for field in ("corrected", "error_pos", "teacher_token", "regen_len"):
            assert getattr(res, field)[r] == getattr(alone, field)[0], field
        assert res.divergence[r].item() == pytest.approx(alone.divergence[0].item(), rel=1e-4, abs=1e-6)
    return res


def test_batched_equals_row_by_row_table_model():
    student, teacher = make_pair(h={**H_ROW, 25: 7.0, 26: 3.0}, snext={19: EOS})
    prompts = [PROMPT, [4], [2, 2, 2, 26], [9, 25]]
    completions = [COMPLETION, [6, 25, 30, 12, EOS], [4, 6, 8, 27], [31, 2, 4, 6, 8, 10]]
    lengths = [5, 5, 4, 6]
    res = _rows_alone_equal_batched(student, teacher, prompts, completions, lengths, 8, PAD, EOS, rounds=2)
    assert res.corrected.sum() >= 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: absolute positions, so position ids must be right
def test_batched_equals_row_by_row_tiny_models(family):
    from trl_mgsr.testing import build_pair, build_tokenizer

    tok = build_tokenizer()
    student, teacher = build_pair(tok, family, seed=3)
    torch.manual_seed(0)
    texts = ["The quick brown fox", "What is the capital of France?", "Hi"]
    enc = tok(texts, return_tensors="pt", padding=True)
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    out = student.generate(**enc, generation_config=gen)
    cid, cm = completion_from_generate(out, enc["input_ids"].shape[1], tok.eos_token_id)
    # make the completions of different lengths
    cm[1, 6:] = 0
    cm[2, 3:] = 0
    prompts = [enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist() for r in range(3)]
    completions = [cid[r].tolist() for r in range(3)]
    lengths = cm.sum(1).tolist()
    res = _rows_alone_equal_batched(
        student, teacher, prompts, completions, lengths, 10, tok.pad_token_id, tok.eos_token_id,
        generation_config=GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                                           eos_token_id=tok.eos_token_id),
    )
    assert res.corrected.any()


# ----------------------------------------------------------------------------------------------------------------------
# End tokens, padding and labels
# ----------------------------------------------------------------------------------------------------------------------


def test_eos_correction_with_pad_equal_eos_keeps_labels_right():
    # pad == eos == 1. After token 24 the teacher says EOS (large h); the completion continues instead.
    pad = eos = 1
    # Row 1 follows the teacher (3 -> 5 -> 7 -> 9 -> EOS), its own EOS included.
    student, teacher = make_pair(h={24: 9.0, 2: 0.5}, tnext={24: eos, 9: eos}, pad=pad, eos=eos)
    prompts = [[2, 3], [2, 2, 2, 3]]
    row0 = [5, 24, 30, 2, 4]  # pos 2: teacher wants EOS after 24 -> j = 2, the row ends with EOS at 2
    agree, a = [], 3
    for _ in range(3):
        a = tnext_default(a)
        agree.append(a)
    row1 = agree + [eos, eos]  # agrees with the teacher, ends with its own EOS (== pad) at position 3
    pid, pm, cid, cm = batch(prompts, [row0, row1], lengths=[5, 4], pad=pad)
    # the EOS at position 3 of row 1 is a real token, the 1 after it is padding
    assert cm[1].tolist() == [1, 1, 1, 1, 0]

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, pad=pad, eos=eos)

    assert res.corrected.tolist() == [True, False]
    assert res.error_pos[0] == 2 and res.teacher_token[0] == eos and res.regen_len[0] == 0
    assert res.completion_mask[0].tolist()[:5] == [1, 1, 1, 0, 0]
    input_ids, attn, labels = assemble_on_policy_batch(pid, pm, res.completion_ids, res.completion_mask, pad)
    P = pid.shape[1]
    assert (labels[:, :P] == -100).all()
    assert torch.equal(attn[:, :P], pm)
    # row 0: labels = y_<j + [EOS], nothing after; row 1: its tokens and its single EOS
    assert labels[0, P:][labels[0, P:] != -100].tolist() == [5, 24, eos]
    assert labels[1, P:][labels[1, P:] != -100].tolist() == agree + [eos]
    assert labels[0, P + 3:].eq(-100).all() and labels[1, P + 4:].eq(-100).all()
    assert attn[0, P:].tolist()[:5] == [1, 1, 1, 0, 0]
    check_invariants(res, cid, cm, 8, eos_ids=(eos,))


def test_allow_eos_false_excludes_end_token_corrections():
    student, teacher = make_pair(h={24: 9.0, 30: 3.0}, tnext={24: EOS})
    pid, pm, cid, cm = batch([[2, 3]], [[5, 24, 30, 28, 4]])
    d_eos, d_other = ref_D(teacher, student, 24), ref_D(teacher, student, 30)
    assert d_eos > d_other  # the EOS correction at position 2 is the argmax with allow_eos=True

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, allow_eos=True)
    assert res.error_pos.tolist() == [2] and res.teacher_token.tolist() == [EOS]
    assert row_tokens(res.completion_ids, res.completion_mask, 0) == [5, 24, EOS]

    res = revise(student, teacher, pid, pm, cid, cm, max_new_tokens=8, allow_eos=False)
    assert res.error_pos.tolist() == [3]  # next best mismatch: after 30, D(30)
    assert res.teacher_token.tolist() == [tnext_default(30)]
    assert res.divergence[0].item() == pytest.approx(d_other, rel=1e-5)
    check_invariants(res, cid, torch.ones_like(cid), 8)


def test_completion_from_generate_and_assemble():
    seqs = torch.tensor([[0, 7, 3, 4, 1, 1, 1], [7, 7, 3, 1, 9, 2, 1], [7, 7, 3, 4, 5, 6, 8]])
    ids, mask = completion_from_generate(seqs, 3, 1)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    _, mask2 = completion_from_generate(seqs, 3, [9, 1])
    assert mask2.tolist() == mask.tolist()
    _, mask3 = completion_from_generate(seqs, 3, [5])
    assert mask3.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    _, mask4 = completion_from_generate(seqs, 3, None)
    assert mask4.eq(1).all()
    assert completion_mask_from_ids(torch.zeros(2, 0, dtype=torch.long), 1).shape == (2, 0)

    # pad == eos == 1 and a prompt containing the pad id as real text (masks decide, never ids)
    prompt = torch.tensor([[1, 1, 5], [1, 6, 1], [7, 7, 7]])
    pmask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    input_ids, attn, labels = assemble_on_policy_batch(prompt, pmask, ids, mask, pad_token_id=1)
    assert attn.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert labels.tolist() == [
        [-100, -100, -100, 4, 1, -100, -100],
        [-100, -100, -100, 1, -100, -100, -100],
        [-100, -100, -100, 4, 5, 6, 8],
    ]
    assert input_ids[:, :3].tolist() == prompt.tolist()
    # stale tokens after the end token are overwritten with the pad id
    _, _, labels_b = assemble_on_policy_batch(prompt, pmask, seqs[:, 3:], mask, pad_token_id=0)
    ids_b = assemble_on_policy_batch(prompt, pmask, seqs[:, 3:], mask, pad_token_id=0)[0]
    assert ids_b[1, 4:].tolist() == [0, 0, 0] and labels_b[1, 3:].tolist() == [1, -100, -100, -100]


# ----------------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------------


def test_reverse_kl_picks_by_reverse_divergence():
    # Position 1 (after token 5): soft teacher, sharp student -> large forward KL(p || q).
    # Position 3 (after token 25): sharp teacher, soft student -> large reverse KL(q || p).
    # Positions 2 and 4 (after 30, 31): both uniform, D = 0.
    student, teacher = make_pair(h={5: 0.5, 25: 8.0, 30: 0.0, 31: 0.0}, g={5: 9.0, 25: 0.5, 30: 0.0, 31: 0.0})
    pid, pm, cid, cm = batch([[2, 3]], [[5, 30, 25, 31, 9]])
    fwd = {i: ref_D(teacher, student, a) for i, a in ((1, 5), (3, 25))}
    rev = {i: ref_D(teacher, student, a, reverse=True) for i, a in ((1, 5), (3, 25))}
    assert fwd[1] > fwd[3] and rev[3] > rev[1]

    res_f = revise(student, teacher, pid, pm, cid, cm, kl_direction="forward")
    res_r = revise(student, teacher, pid, pm, cid, cm, kl_direction="reverse")
    assert res_f.error_pos.tolist() == [1] and res_r.error_pos.tolist() == [3]
    assert res_r.divergence[0].item() == pytest.approx(rev[3], rel=1e-5)
    check_invariants(res_r, cid, cm, 8)
    with pytest.raises(ValueError, match="kl_direction"):
        revise(student, teacher, pid, pm, cid, cm, kl_direction="sideways")


def test_teacher_token_sample_is_a_teacher_sample():
    # After token 5 the teacher is uniform over the whole vocabulary (h = 0): its argmax would always be token 0.
    student, teacher = make_pair(h={5: 0.0, 3: 0.0})
    pid, pm, cid, cm = batch([[2, 3]] * 6, [[5, 30, 6]] * 6)
    picks = set()
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        res = revise(student, teacher, pid, pm, cid, cm, teacher_token="sample", generator=gen)
        again = revise(student, teacher, pid, pm, cid, cm, teacher_token="sample",
                       generator=torch.Generator().manual_seed(seed))
        assert torch.equal(res.completion_ids, again.completion_ids)  # reproducible with the generator
        check_invariants(res, cid, cm, 8)
        for r in range(6):
            if res.corrected[r]:
                j = int(res.error_pos[r])
                assert res.teacher_token[r] != cid[r, j]
                picks.add(int(res.teacher_token[r]))
    assert len(picks) >= 5  # sampled, not the argmax


def test_rounds_two_equals_one_round_twice():
    # Row 2 follows the teacher (3 -> 5 -> 7 -> 9) and then the teacher wants EOS: corrected in round 1 only.
    student, teacher = make_pair(h={**H_ROW, 25: 7.0}, snext={19: EOS}, tnext={9: EOS})
    pid, pm, cid, cm = batch(
        [PROMPT, [9, 25], [2, 3]], [COMPLETION, [31, 2, 4, 6, 8, 10], [5, 7, 9, 30]], lengths=[5, 6, 4]
    )
    once = revise(student, teacher, pid, pm, cid, cm, rounds=1)
    twice = revise(student, teacher, pid, pm, once.completion_ids, once.completion_mask, rounds=1)
    res = revise(student, teacher, pid, pm, cid, cm, rounds=2)
    for r in range(2):
        assert row_tokens(res.completion_ids, res.completion_mask, r) == row_tokens(
            twice.completion_ids, twice.completion_mask, r
        )
    # records: the last correction (round 2 where the row was corrected again, else round 1)
    for field in ("error_pos", "teacher_token", "regen_len", "divergence"):
        expected = torch.where(twice.corrected, getattr(twice, field), getattr(once, field))
        assert torch.allclose(getattr(res, field).float(), expected.float()), field
    assert torch.equal(res.num_corrections, once.corrected.long() + twice.corrected.long())
    assert res.num_corrections.tolist() == [2, 2, 1]
    assert res.error_pos[2] == 3 and res.teacher_token[2] == EOS
    assert row_tokens(res.completion_ids, res.completion_mask, 2) == [5, 7, 9, EOS]
    assert torch.equal(res.corrected, once.corrected | twice.corrected)
    zero = revise(student, teacher, pid, pm, cid, cm, rounds=0)
    assert torch.equal(zero.completion_ids, cid) and not zero.corrected.any()


def test_vocab_size_truncates_padded_teacher_vocab():
    student, _ = make_pair(h=H_ROW)
    _, big = make_pair(h=H_ROW, vocab=V + 8)
    big.table.data[:, V:] = 50.0  # padding rows that would win every argmax
    pid, pm, cid, cm = batch([PROMPT], [COMPLETION], lengths=[5])
    with pytest.raises(ValueError, match="vocab"):
        revise(student, big, pid, pm, cid, cm)
    res = revise(student, big, pid, pm, cid, cm, vocab_size=V)
    _, small = make_pair(h=H_ROW)
    ref = revise(student, small, pid, pm, cid, cm)
    assert res.error_pos.tolist() == ref.error_pos.tolist() == [1]
    assert torch.equal(res.completion_ids, ref.completion_ids)
    assert torch.allclose(res.divergence, ref.divergence)


def test_student_logits_from_generation_skip_the_student_forward():
    student, teacher = make_pair(h=H_ROW)
    pid, pm, cid, cm = batch([PROMPT], [COMPLETION], lengths=[5])
    full = torch.cat([pid, cid], 1)
    s_logits = student.table.detach()[full][:, pid.shape[1] - 1: -1]
    before = student.forward_calls
    res = revise(student, teacher, pid, pm, cid, cm, student_logits=s_logits)
    assert student.forward_calls - before == 6  # only the re-generation's forwards
    ref = revise(student, teacher, pid, pm, cid, cm)
    assert torch.equal(res.completion_ids, ref.completion_ids) and torch.equal(res.error_pos, ref.error_pos)


def test_models_run_in_eval_mode_and_training_flags_are_restored():
    student, teacher = make_pair(h=H_ROW)
    student.train()
    student.dropout.eval()  # a submodule deliberately in eval mode stays so
    teacher.eval()
    pid, pm, cid, cm = batch([PROMPT], [COMPLETION], lengths=[5])
    student.training_seen.clear()
    revise(student, teacher, pid, pm, cid, cm)
    assert student.training_seen and not any(student.training_seen)
    assert student.training and not student.dropout.training and not teacher.training


def test_empty_batch_and_empty_completions():
    student, teacher = make_pair(h=H_ROW)
    pid = torch.tensor([[2, 3], [0, 4]])
    pm = torch.tensor([[1, 1], [0, 1]])
    empty = torch.zeros(2, 0, dtype=torch.long)
    res = revise(student, teacher, pid, pm, empty, empty, always_generate=True)
    assert res.completion_ids.shape == (2, 0) and not res.corrected.any()
    res = revise(student, teacher, pid[:0], pm[:0], empty[:0], empty[:0], always_generate=True)
    assert res.completion_ids.shape == (0, 0) and res.error_pos.shape == (0,)
    # a row whose completion is empty (mask all 0) next to a corrected one
    p2, pm2, cid, cm = batch([PROMPT, [2, 3]], [COMPLETION, [PAD] * 7], lengths=[5, 0])
    res = revise(student, teacher, p2, pm2, cid, cm)
    assert res.corrected.tolist() == [True, False] and res.completion_mask[1].sum() == 0


def test_metrics():
    student, teacher = make_pair(h=H_ROW)
    agree, a = [], 3
    for _ in range(5):
        a = tnext_default(a)
        agree.append(a)
    pid, pm, cid, cm = batch([PROMPT, [2, 3]], [COMPLETION, agree], lengths=[5, 5])
    res = revise(student, teacher, pid, pm, cid, cm)
    m = res.metrics()
    assert m["scrg/corrected_frac"] == 0.5
    assert m["scrg/error_pos"] == 1.0
    assert m["scrg/regen_len"] == 6.0
    assert m["scrg/divergence"] == pytest.approx(res.divergence[0].item())
    sums = res.metric_sums()
    assert sums["rows"].item() == 2 and sums["corrected"].item() == 1


# ----------------------------------------------------------------------------------------------------------------------
# Real models end to end
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("same_pad_and_eos", [False, True])
def test_tiny_llama_end_to_end(peft, same_pad_and_eos):
    from trl_mgsr.testing import build_pair, build_tokenizer

    tok = build_tokenizer(same_pad_and_eos=same_pad_and_eos)
    student, teacher = build_pair(tok, "llama", seed=1)
    if peft:
        peft_mod = pytest.importorskip("peft")
        student = peft_mod.get_peft_model(
            student, peft_mod.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
        )
        student.train()
    torch.manual_seed(0)
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in ("Write a short poem.", "What is the capital of France? Answer in a few words please.")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    max_new = 12
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        out = student.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               generation_config=gen, return_dict_in_generate=True)
    P = enc["input_ids"].shape[1]
    cid, cm = completion_from_generate(out.sequences, P, [tok.eos_token_id])

    res = scrg_revise(
        student, teacher, enc["input_ids"], enc["attention_mask"], cid, cm,
        generation_config=gen, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, rounds=2,
        error_rule="max_divergence",
    )
    check_invariants(res, cid, cm, max_new, eos_ids=(tok.eos_token_id,))
    assert res.corrected.all()  # random tiny models disagree somewhere
    if peft:
        assert student.training  # restored
    input_ids, attn, labels = assemble_on_policy_batch(
        enc["input_ids"], enc["attention_mask"], res.completion_ids, res.completion_mask, tok.pad_token_id
    )
    B, W = input_ids.shape
    assert B == 2 and W == P + res.completion_ids.shape[1] and W <= P + max_new
    assert attn.shape == labels.shape == (B, W)
    assert (labels[:, :P] == -100).all()
    assert torch.equal((labels != -100).long()[:, P:], res.completion_mask.long())
    assert torch.equal(attn[:, P:], res.completion_mask.long())
    # the assembled batch is a valid forward input for both models
    with torch.no_grad():
        logits = teacher(input_ids=input_ids, attention_mask=attn).logits
    assert logits.shape[:2] == (B, W) and torch.isfinite(logits).all()
