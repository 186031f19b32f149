"""ROUGE-L evaluation: the pure scorer against rouge-score, and `trl-mgsr eval` end to end on a tiny model."""

import json

import pytest
import torch
from rouge_score import rouge_scorer

from trl_mgsr.cli import main
from trl_mgsr.evaluation import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    EvalError,
    render_prompt,
    row_references,
    score_generations,
)
from trl_mgsr.testing import build_llama


def direct(prediction, references):
    """rouge-score used directly: F-measure x100, max over references."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    references = [references] if isinstance(references, str) else references
    return max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references) * 100


def test_score_generations_matches_rouge_score_and_takes_max_over_references():
    predictions = ["The cats are running in the garden", "Paris is the capital", "", "completely unrelated"]
    references = [
        "a cat runs in the garden",  # stemming: cats/cat, running/runs
        ["Berlin", "The capital of France is Paris"],
        "something",
        ["no overlap here", "none either"],
    ]
    expected = sum(direct(p, r) for p, r in zip(predictions, references)) / 4
    assert score_generations(predictions, references) == pytest.approx(expected)
    assert direct(predictions[1], references[1]) > direct(predictions[1], references[1][0])  # the max matters
    assert score_generations(["the cat sat"], [["a dog", "the cat sat"]]) == pytest.approx(100.0)
    assert score_generations([], []) == 0.0
    with pytest.raises(EvalError):
        score_generations(["a"], [])


def test_prompts_and_references_from_rows():
    assert render_prompt({"prompt": "P", "instruction": "ignored"}) == "P"
    assert render_prompt({"instruction": "Do X", "input": ""}) == ALPACA_PROMPT_NO_INPUT.format(instruction="Do X")
    assert render_prompt({"instruction": "Do X", "input": "Y"}) == ALPACA_PROMPT.format(instruction="Do X", input="Y")
    assert row_references({"output": "a"}) == ["a"] and row_references({"output": ["a", "b"]}) == ["a", "b"]
    with pytest.raises(EvalError, match="no string `prompt` or `instruction`"):
        render_prompt({"question": "q"})


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    model = build_llama(tokenizer, hidden_size=16, num_layers=1, seed=3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def run_eval(model_dir, data, output_dir, seeds=("1", "2")):
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--seeds", *seeds, "--max_new_tokens", "8",
            "--batch_size", "2", "--output_dir", str(output_dir), "--no_progress"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    results = json.loads((output_dir / "results.json").read_text())
    generations = [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]
    return results, generations


def test_eval_cli_score_equals_rouge_score_on_its_generations(tiny_model_dir, tmp_path):
    rows = [
        {"instruction": "Name a color.", "input": "", "output": "Red"},
        {"instruction": "Repeat", "input": "The quick brown fox", "output": ["The quick brown fox", "fox"]},
        {"prompt": "What is the capital of France?\n", "output": "Paris"},
        {"instruction": "Count", "input": "", "output": "one two three"},
        {"instruction": "Say hi", "input": "", "output": ["hi", "hello"]},
    ]
    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, first_gens = run_eval(tiny_model_dir, data, tmp_path / "first")
    assert len(first_gens) == 10 and first["sets"]["five"]["n"] == 5

    # A random tiny model rarely overlaps with real references, so make the references from its own seed-1
    # samples (a list: an unrelated string first, the sample second) and evaluate again: the same seed must
    # give the same samples, and the scores become large, so the comparison below is not 0 == 0.
    by_seed1 = {g["index"]: g["prediction"] for g in first_gens if g["seed"] == 1}
    for i, row in enumerate(rows):
        sample_words = by_seed1[i].split()
        row["output"] = ["zzz unrelated reference", " ".join(sample_words[: max(1, len(sample_words) - 1)]) or "x"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, gens = run_eval(tiny_model_dir, data, tmp_path / "second")

    assert [g["prediction"] for g in gens if g["seed"] == 1] == [by_seed1[i] for i in range(5)]
    for seed in (1, 2):
        preds = [g for g in gens if g["seed"] == seed]
        expected = sum(direct(g["prediction"], g["references"]) for g in preds) / len(preds)
        assert results["sets"]["five"]["scores"][str(seed)] == pytest.approx(expected)
        for g in preds:
            assert g["rougeL"] == pytest.approx(direct(g["prediction"], g["references"]))
    assert results["sets"]["five"]["scores"]["1"] > 50  # max over references picked the matching one
    assert results["sets"]["five"]["mean"] == pytest.approx(
        (results["sets"]["five"]["scores"]["1"] + results["sets"]["five"]["scores"]["2"]) / 2
    )
    assert results["protocol"]["top_k"] == 0 and results["protocol"]["temperature"] == 1.0
    table = (tmp_path / "second" / "results.md").read_text()
    assert "| five | 5 |" in table and "seed 1" in table


def _generate_inputs(model, tokenizer, prompts, **kwargs):
    """The prompt ids `generate` feeds the model (padding removed), captured from `model.generate`."""
    from trl_mgsr.evaluation import generate

    seen, original = [], model.generate

    def spy(input_ids, attention_mask, **kw):
        seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return original(input_ids=input_ids, attention_mask=attention_mask, **kw)

    model.generate = spy
    outputs = generate(model, tokenizer, prompts, seed=0, max_new_tokens=4, progress=False, **kwargs)
    return seen, outputs


def test_long_prompts_keep_their_first_tokens_and_bos_comes_once():
    from tokenizers import processors

    from trl_mgsr.testing import build_tokenizer

    tok = build_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    model = build_llama(tok, hidden_size=16, num_layers=1)
    long_prompt = "Write a long story about the capital of France and its river. " * 4
    seen, _ = _generate_inputs(model, tok, [long_prompt, "<bos>Say hi."], max_prompt_length=8)
    full = tok(long_prompt)["input_ids"]
    assert seen[0] == full[:8]  # MiniLLM keeps the start of the prompt
    assert seen[1] == tok("Say hi.")["input_ids"]  # one BOS, not two


def test_sampling_ignores_settings_saved_with_the_model(tokenizer):
    import copy

    clean = build_llama(tokenizer, hidden_size=16, num_layers=1, seed=3)
    tuned = copy.deepcopy(clean)
    tuned.generation_config.update(repetition_penalty=5.0, suppress_tokens=list(range(20, len(tokenizer))))
    prompts = ["What is the capital of France?", "Name a river."]
    assert _generate_inputs(tuned, tokenizer, prompts)[1] == _generate_inputs(clean, tokenizer, prompts)[1]


def test_truncated_prompts_get_our_warning_with_the_count_not_transformers_message(tokenizer):
    import warnings

    model = build_llama(tokenizer, hidden_size=16, num_layers=1)
    tokenizer.model_max_length, before = 8, tokenizer.model_max_length  # transformers' "indexing errors" threshold
    tokenizer.deprecation_warnings.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _generate_inputs(model, tokenizer, ["Write a long story about the capital of France. " * 4, "Hi."],
                             max_prompt_length=6)
    finally:
        tokenizer.model_max_length = before
    assert [str(w.message) for w in caught] == [
        "1 of 2 prompts are longer than max_prompt_length=6 tokens and keep their first 6 (cut on the right, as in "
        "MiniLLM)"
    ]
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tokenizer.deprecation_warnings  # not shown
