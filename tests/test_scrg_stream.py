"""`stream_scrg` (SCRG while sampling) against the reference: `generate`, then `scrg_revise`.

With a deterministic student (top-k 1) both compute the same completions, corrections and teacher logits; with
sampling the invariants of SCRG hold on every row.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig

from trl_mgsr.data import position_ids_from_mask
from trl_mgsr.scrg import SCRGSettings, completion_from_generate, scrg_revise
from trl_mgsr.scrg_stream import _selectable, sample_tokens, stream_scrg, streamable
from trl_mgsr.testing import build_pair, build_tokenizer

N = 12


def make_setup(family):
    tok = build_tokenizer()
    student, teacher = build_pair(tok, family, seed=5)
    student.eval(), teacher.eval()  # GPT-2 has dropout, which `generate` (the reference) would apply
    with torch.no_grad():
        # a peaked teacher: it rejects some student tokens and accepts others
        teacher.get_output_embeddings().weight.mul_(4)
    texts = ["The quick brown fox", "What is the capital of France? Tell me.", "Hi", "Numbers like 42",
             "A transformer predicts", "the", "Write a short poem about the sea.", "ok ok"]
    enc = tok(texts, return_tensors="pt", padding=True)
    return tok, student, teacher, enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def setup():
    return make_setup("llama")


def settings(tok, top_k=1, **kw):
    gen = GenerationConfig(max_new_tokens=N, do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return dict(generation_config=gen, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                keep_teacher_logits=True, **kw)


def reference(student, teacher, pid, pm, rounds, **kw):
    with torch.no_grad():
        out = student.generate(input_ids=pid, attention_mask=pm, generation_config=kw["generation_config"])
    cid, cm = completion_from_generate(out, pid.shape[1], kw["eos_token_ids"])
    return scrg_revise(student, teacher, pid, pm, cid, cm, rounds=rounds, **kw)


def fresh_teacher_logits(teacher, pid, pm, res):
    ids = torch.cat([pid, res.completion_ids], dim=1)
    mask = torch.cat([pm, res.completion_mask], dim=1)
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return logits[:, pid.shape[1] - 1: -1]


def masked(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def assert_same_revision(new, ref, teacher, pid, pm):
    """`new` has `ref`'s tokens and corrections, and the teacher's logits of its final rows."""
    assert masked(new.completion_ids, new.completion_mask) == masked(ref.completion_ids, ref.completion_mask)
    assert torch.equal(new.error_pos, ref.error_pos)
    fresh = fresh_teacher_logits(teacher, pid, pm, new)
    m = new.completion_mask.bool()
    torch.testing.assert_close(new.teacher_logits[m], fresh[m], rtol=1e-4, atol=1e-4)


def frequent_tokens(tok, student, pid, pm, places=((0, 3), (2, 6))):
    """Tokens the deterministic student draws mid-completion (row, position): made end tokens, rows end early."""
    with torch.no_grad():
        out = student.generate(input_ids=pid, attention_mask=pm, generation_config=settings(tok)["generation_config"])
    return [tok.eos_token_id] + [int(out[row, pid.shape[1] + at]) for row, at in places]


@pytest.mark.parametrize("rounds,continuation,block_size,allow_eos,early_ends", [
    (1, "regenerate", 4, True, False), (1, "regenerate", 1, True, False), (2, "regenerate", 3, True, False),
    (1, "stop", 4, True, False), (3, "regenerate", 16, False, False), (1, "regenerate", 4, True, True),
    (2, "regenerate", 2, False, True),
])
def test_deterministic_student_matches_generate_then_scrg_revise(setup, rounds, continuation, block_size,
                                                                  allow_eos, early_ends):
    tok, student, teacher, pid, pm = setup
    kw = settings(tok, reject_ratio=0.05, continuation=continuation, allow_eos=allow_eos)
    if early_ends:
        kw["eos_token_ids"] = kw["generation_config"].eos_token_id = frequent_tokens(tok, student, pid, pm)
    ref = reference(student, teacher, pid, pm, rounds, **kw)
    new = stream_scrg(student, teacher, pid, pm, rounds=rounds, block_size=block_size, **kw)
    assert ref.corrected.any() and not ref.corrected.all()  # the setting exercises both kinds of row
    assert not early_ends or (ref.completion_mask.sum(1) < N).any()
    assert masked(new.completion_ids, new.completion_mask) == masked(ref.completion_ids, ref.completion_mask)
    for field in ("corrected", "error_pos", "teacher_token", "regen_len", "num_corrections"):
        assert torch.equal(getattr(new, field), getattr(ref, field)), field
    torch.testing.assert_close(new.divergence, ref.divergence, rtol=1e-4, atol=1e-5)
    # every position's teacher logits are the teacher's on the final rows
    assert torch.equal(new.teacher_valid, new.completion_mask.sum(1))
    fresh = fresh_teacher_logits(teacher, pid, pm, new)
    m = new.completion_mask.bool()
    torch.testing.assert_close(new.teacher_logits[m], fresh[m], rtol=1e-4, atol=1e-4)
    assert (new.teacher_logits[~m] == 0).all()


def test_deterministic_student_matches_the_reference_with_absolute_positions():
    # GPT-2 embeds positions itself: the position ids after a correction must be the row's, not the slot's
    tok, student, teacher, pid, pm = make_setup("gpt2")
    kw = settings(tok, reject_ratio=0.05)
    ref = reference(student, teacher, pid, pm, 2, **kw)
    new = stream_scrg(student, teacher, pid, pm, rounds=2, block_size=4, **kw)
    assert ref.corrected.any()
    assert_same_revision(new, ref, teacher, pid, pm)


def test_sample_tokens_draws_from_each_row(monkeypatch):
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 1.0],
                          [0.0, 0.25, 0.25, 0.5, 0.0]])
    torch.manual_seed(0)
    n = 20000
    drawn = torch.stack([sample_tokens(probs) for _ in range(n)], dim=1)  # [3, n]
    freq = torch.stack([torch.bincount(row, minlength=5) for row in drawn]).float() / n
    assert (freq[probs == 0] == 0).all()  # a token of probability 0 never comes
    assert torch.allclose(freq, probs, atol=4 * math.sqrt(0.25 / n))  # 4 binomial std at most
    # the ends of the uniform's range (0, and 1 as rounding can make it) land on tokens of positive probability
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)
    assert sample_tokens(probs).tolist() == [0, 4, 1]
    monkeypatch.setattr(torch, "rand_like", torch.ones_like)
    assert sample_tokens(probs).tolist() == [3, 4, 3]


def test_sampled_rows_keep_scrg_invariants(setup):
    tok, student, teacher, pid, pm = setup
    ratio = 0.3
    torch.manual_seed(0)
    kw = settings(tok, top_k=0, reject_ratio=ratio)
    res = stream_scrg(student, teacher, pid.repeat(4, 1), pm.repeat(4, 1), rounds=1, block_size=4, **kw)
    pid, pm = pid.repeat(4, 1), pm.repeat(4, 1)
    log_p = F.log_softmax(fresh_teacher_logits(teacher, pid, pm, res), dim=-1)
    gap = log_p.gather(-1, res.completion_ids.unsqueeze(-1)).squeeze(-1) - log_p.max(-1).values
    lengths = res.completion_mask.sum(1)
    assert res.corrected.any() and (lengths <= N).all()
    for r in range(pid.shape[0]):
        j = int(res.error_pos[r])
        upto = j if res.corrected[r] else int(lengths[r])
        assert (gap[r, :upto] >= math.log(ratio) - 1e-5).all()  # the teacher accepts every student token before j
        if res.corrected[r]:
            assert res.completion_ids[r, j] == log_p[r, j].argmax() == res.teacher_token[r]
            assert res.regen_len[r] == lengths[r] - j - 1
        ids = res.completion_ids[r, : int(lengths[r])].tolist()
        assert tok.eos_token_id not in ids[:-1]  # a row ends at its first end token


def test_rounds_zero_only_samples(setup):
    tok, student, teacher, pid, pm = setup
    res = stream_scrg(student, teacher, pid, pm, rounds=0, block_size=4, **settings(tok, reject_ratio=0.9))
    assert not res.corrected.any() and (res.error_pos == -1).all()
    with torch.no_grad():
        out = student.generate(input_ids=pid, attention_mask=pm, generation_config=settings(tok)["generation_config"])
    cid, cm = completion_from_generate(out, pid.shape[1], tok.eos_token_id)
    assert masked(res.completion_ids, res.completion_mask) == masked(cid, cm)


def teacher_calls(teacher, run):
    """The number of input tokens of each teacher forward during `run()`, and its result."""
    calls = []
    handle = teacher.register_forward_hook(lambda m, a, k, o: calls.append(k["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        return calls, run()
    finally:
        handle.remove()


def test_one_teacher_forward_per_block_blocks_doubling(setup):
    tok, student, teacher, pid, pm = setup
    kw = settings(tok, reject_ratio=1e-30)  # the teacher accepts every token: every block is judged
    calls, res = teacher_calls(teacher, lambda: stream_scrg(student, teacher, pid, pm, rounds=1, block_size=5, **kw))
    assert not res.corrected.any() and res.completion_mask.sum(1).max() == N
    assert calls == [pid.shape[1] + 2, 4, 5]  # the prompt and 2 tokens, then 4, then at most 5 (N - 1 = 11 steps)


def test_rows_that_have_ended_leave_both_models_batches(setup):
    # once the teacher has judged a row's last token, the later forwards of both models run without it
    tok, student, teacher, pid, pm = setup
    kw = settings(tok, reject_ratio=0.05)
    kw["eos_token_ids"] = kw["generation_config"].eos_token_id = frequent_tokens(tok, student, pid, pm)
    rows = {"student": [], "teacher": []}
    handles = [model.register_forward_hook(lambda m, a, k, o, _n=name: rows[_n].append(k["input_ids"].shape[0]),
                                           with_kwargs=True)
               for name, model in (("student", student), ("teacher", teacher))]
    try:
        res = stream_scrg(student, teacher, pid, pm, rounds=1, block_size=2, **kw)
    finally:
        for handle in handles:
            handle.remove()
    lengths = res.completion_mask.sum(1)
    B = pid.shape[0]
    assert rows["teacher"][0] == rows["student"][0] == B
    assert rows["teacher"] == sorted(rows["teacher"], reverse=True) and rows["teacher"][-1] < B
    assert (lengths == lengths.max()).sum() <= rows["student"][-1] < B  # the longest rows decode to the end
    assert_same_revision(res, reference(student, teacher, pid, pm, 1, **kw), teacher, pid, pm)


def test_rows_stay_when_a_cache_layer_cannot_select_them(setup):
    tok, student, teacher, pid, pm = setup
    cache = DynamicCache()
    with torch.no_grad():
        student(input_ids=pid, attention_mask=pm, past_key_values=cache, use_cache=True)
    assert _selectable(cache)
    cache.layers.append(object())  # e.g. a recurrent layer's state, which row selection would leave behind
    assert not _selectable(cache)


def test_no_judging_once_no_sampling_row_can_be_corrected(setup):
    tok, student, teacher, pid, pm = setup
    # rounds=0: nothing to judge, the teacher reads everything at the end for the loss
    calls, res = teacher_calls(teacher, lambda: stream_scrg(student, teacher, pid, pm, rounds=0, block_size=4,
                                                            **settings(tok, reject_ratio=0.5)))
    assert calls == [pid.shape[1] + N - 1]
    # a ratio that rejects nearly everything: after the first block every row has used its one correction
    calls, res = teacher_calls(teacher, lambda: stream_scrg(student, teacher, pid, pm, rounds=1, block_size=4,
                                                            **settings(tok, reject_ratio=0.999)))
    assert res.corrected.all() and len(calls) == 2


def test_streamable_and_bad_settings(setup):
    tok, student, teacher, pid, pm = setup
    assert streamable(SCRGSettings(**settings(tok)))
    assert not streamable(SCRGSettings(**settings(tok, error_rule="max_divergence")))
    penalised = settings(tok)
    penalised["generation_config"].repetition_penalty = 1.2
    assert not streamable(SCRGSettings(**penalised))
    with pytest.raises(ValueError, match="first_rejected"):
        stream_scrg(student, teacher, pid, pm, **settings(tok, error_rule="max_divergence"))
    with pytest.raises(ValueError, match="block_size"):
        stream_scrg(student, teacher, pid, pm, block_size=0, **settings(tok))


def test_models_back_in_their_modes(setup):
    tok, student, teacher, pid, pm = setup
    student.train()
    teacher.eval()
    seen = []
    handle = student.register_forward_hook(lambda m, a, o: seen.append(m.training))
    try:
        stream_scrg(student, teacher, pid, pm, **settings(tok))
        assert student.training and not teacher.training  # restored
        assert seen and not any(seen)  # sampled in eval mode (no dropout)
    finally:
        handle.remove()
        student.eval()


def _synced_rank(rank: int, port: int, out_dir: str) -> None:
    """One process of `test_synced_processes_run_the_same_forwards`: its own prompts and end token."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tok = build_tokenizer()
    student, teacher = build_pair(tok, "llama", seed=5)
    enc = tok(["Hi", "The quick brown fox"] if rank == 0 else ["Numbers like 42 and more", "ok"],
              return_tensors="pt", padding=True)
    kw = settings(tok, reject_ratio=0.5)
    if rank == 0:  # rank 0's rows end within 3 tokens (the deterministic student draws these again), rank 1's later
        first = stream_scrg(student, teacher, enc["input_ids"], enc["attention_mask"], **kw)
        kw["eos_token_ids"] = kw["generation_config"].eos_token_id = first.completion_ids[:, 2].tolist()
    alone = stream_scrg(student, teacher, enc["input_ids"], enc["attention_mask"], **kw)
    calls = {"student": 0, "teacher": 0}
    for name, model in (("student", student), ("teacher", teacher)):
        model.register_forward_hook(lambda *a, _n=name: calls.__setitem__(_n, calls[_n] + 1))
    synced = stream_scrg(student, teacher, enc["input_ids"], enc["attention_mask"], always_generate=True, **kw)
    same = masked(synced.completion_ids, synced.completion_mask) == masked(alone.completion_ids,
                                                                          alone.completion_mask)
    torch.save({"calls": calls, "same": same, "lengths": synced.completion_mask.sum(1)}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_synced_processes_run_the_same_forwards(tmp_path):
    # ZeRO-3/FSDP: every forward is a collective, so a process whose rows have ended keeps stepping until all have.
    import torch.multiprocessing as mp

    mp.spawn(_synced_rank, args=(29571, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert ranks[0]["lengths"].max() < ranks[1]["lengths"].max()  # the processes needed different step counts
    assert ranks[0]["calls"] == ranks[1]["calls"]
    assert ranks[0]["same"] and ranks[1]["same"]  # waiting changes no process's result
