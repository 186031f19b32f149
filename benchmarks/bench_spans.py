"""Span extraction throughput: completions of 256 tokens turned into span ids per second, on the CPU.

Uses the builtin extractor and a byte-level BPE tokenizer trained (in memory) on the `output` fields of the Dolly
training split in `../shared/data/dolly/train.jsonl` (falls back, with a message, to the other Dolly splits, then
to the package's sample sentences). Each sequence is a left-padded row of a prompt (masked out) and 256 completion
tokens of real text, cut wherever the 256th token falls (often mid-word, like a truncated generation).

Writes `benchmarks/results/spans.json` and prints it. The share of a training step is measured by the step
benchmark; this script only exposes the throughput.

    python benchmarks/bench_spans.py [--sequences 512] [--batch-size 8] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trl_mgsr import spans as spans_mod  # noqa: E402
from trl_mgsr.spans import get_span_extractor, span_counts, span_ids_from_tokens, span_pair_mask  # noqa: E402
from trl_mgsr.testing import SAMPLE_TEXTS, build_tokenizer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dolly"


def load_texts(data_dir: Path, limit: int) -> tuple[list[str], str]:
    for name in ("train.jsonl", "dev.jsonl", "valid.jsonl"):
        path = data_dir / name
        if path.exists():
            if name != "train.jsonl":
                print(f"[bench_spans] {data_dir / 'train.jsonl'} not found; using {path} instead.", file=sys.stderr)
            texts = []
            with path.open(encoding="utf-8") as f:
                for line in f:
                    out = json.loads(line).get("output")
                    if isinstance(out, str) and out.strip():
                        texts.append(out)
                    if len(texts) >= limit:
                        break
            return texts, str(path)
    print(
        f"[bench_spans] no Dolly data under {data_dir} (expected train.jsonl with an `output` field, see "
        "../shared/data/README.md); falling back to trl_mgsr.testing.SAMPLE_TEXTS, which is far less realistic.",
        file=sys.stderr,
    )
    return SAMPLE_TEXTS * 50, "trl_mgsr.testing.SAMPLE_TEXTS"


def make_rows(tokenizer, texts: list[str], n: int, completion_len: int, prompt_len: int) -> list[list[int]]:
    """`n` completions of exactly `completion_len` tokens: consecutive outputs joined by blank lines, then cut."""
    rows, buf = [], []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    i = 0
    while len(rows) < n:
        buf += tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"] + sep
        i += 1
        while len(buf) >= completion_len and len(rows) < n:
            rows.append(buf[:completion_len])
            buf = buf[completion_len:]
    prompt = (tokenizer("Below is an instruction. " * 40, add_special_tokens=False)["input_ids"])[:prompt_len]
    return [prompt + r for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--completion-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--train-texts", type=int, default=5000, help="outputs used to train the tokenizer")
    parser.add_argument("--extractor", default="builtin")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all sequences (best is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spans.json")
    args = parser.parse_args()

    texts, source = load_texts(args.data_dir, args.train_texts)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size)
    tokenizer_train_s = time.perf_counter() - t0
    tokenizer.model_max_length = 10**9  # long outputs are cut into 256-token rows below
    rows = make_rows(tokenizer, texts, args.sequences, args.completion_len, args.prompt_len)

    batches = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        width = max(map(len, chunk)) + 3  # a little left padding
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, r in enumerate(chunk):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - args.completion_len :] = True
        batches.append((ids, mask))

    extractor = get_span_extractor(args.extractor)
    span_ids_from_tokens(tokenizer, *batches[0], extractor)  # warm-up
    best, outputs = float("inf"), []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = [span_ids_from_tokens(tokenizer, ids, mask, extractor) for ids, mask in batches]
        best = min(best, time.perf_counter() - start)

    # where the time goes: incremental decoding with offsets alone, and the extractor alone
    special = spans_mod._special_ids(tokenizer)
    completions = [ids[i][mask[i]].tolist() for ids, mask in batches for i in range(ids.shape[0])]
    start = time.perf_counter()
    decoded = [spans_mod._char_offsets(tokenizer, c, special)[0] for c in completions]
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    for text in decoded:
        extractor(text)
    extract_s = time.perf_counter() - start

    n = len(rows)
    spans_per_seq = sum(span_counts(o).sum().item() for o in outputs) / n
    pairs = sum(span_pair_mask(o, torch.where(m, i, -100)).sum().item() for o, (i, m) in zip(outputs, batches))
    in_span = sum((o >= 0).sum().item() for o in outputs) / (n * args.completion_len)
    result = {
        "benchmark": "span extraction throughput (span_ids_from_tokens)",
        "sequences_per_second": round(n / best, 1),
        "completion_tokens_per_second": round(n * args.completion_len / best),
        "ms_per_batch": round(1000 * best / len(batches), 2),
        "breakdown_seconds_per_pass": {
            "total": round(best, 4),
            "decode_with_offsets": round(decode_s, 4),
            "extractor": round(extract_s, 4),
            "mapping_and_rest": round(max(best - decode_s - extract_s, 0.0), 4),
        },
        "spans_per_sequence": round(spans_per_seq, 2),
        "pairs_per_sequence": round(pairs / n, 2),
        "share_of_completion_tokens_in_spans": round(in_span, 3),
        "config": {
            "sequences": n,
            "batch_size": args.batch_size,
            "completion_len": args.completion_len,
            "prompt_len": args.prompt_len,
            "extractor": args.extractor,
            "tokenizer": f"byte-level BPE trained in memory, vocab {len(tokenizer)}",
            "tokenizer_train_seconds": round(tokenizer_train_s, 1),
            "text_source": source,
            "repeats": args.repeats,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
