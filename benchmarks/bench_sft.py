"""Benchmark: peak memory and time of forward+backward of the chunked SFT term vs the reference (CPU).

    python benchmarks/bench_sft.py            # vocab 32k (2k, 8k tokens) and 128k (2k tokens), float32 and bf16
    python benchmarks/bench_sft.py --quick    # 512 tokens, a sanity run in under a minute

The reference is `trl_mgsr.losses.sft_loss`: the completion rows of the logits upcast to float32 and
`F.cross_entropy(reduction="sum")`, which is how a causal LM's own loss (and so TRL's SFT) computes it. Ours is
`chunked_sft_loss` with `--chunk-size` rows at a time, what `MGSRTrainer` uses. Every measurement runs in a fresh
subprocess on the same seeded random logits `[1, tokens, vocab]` (a few positions labelled -100); peak memory is
the rise of max RSS over the first forward+backward (`benchmarks/_peak.py`), time the best of `--repeats` further
runs. Results go to `benchmarks/results/sft.json` and a table with the ratios ours / reference is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _peak import fmt, measure, time_and_peak, write_results

RESULTS = Path(__file__).parent / "results" / "sft.json"


def _worker(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trl_mgsr.losses import chunked_sft_loss, sft_loss

    torch.set_num_threads(spec["threads"])
    tokens, vocab = spec["tokens"], spec["vocab"]
    g = torch.Generator().manual_seed(0)
    # drawn in the target dtype: a float32 draw converted afterwards would raise the baseline max RSS
    logits = torch.randn(1, tokens, vocab, generator=g, dtype=getattr(torch, spec["dtype"])).mul_(2).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[0, ::16] = -100

    def run():
        if spec["method"] == "chunked":
            term = chunked_sft_loss(logits, labels, chunk_size=spec["chunk_size"])
        else:
            term = sft_loss(logits, labels)
        (term.total / term.num_items).backward()

    return time_and_peak(run, spec["repeats"], reset=lambda: setattr(logits, "grad", None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (512 tokens)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="loss_chunk_size of the chunked method")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the memory run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    shapes = [(32_000, 512)] if args.quick else [(32_000, 2048), (32_000, 8192), (128_000, 2048)]
    rows = []
    for vocab, tokens in shapes:
        for dtype in ("float32", "bfloat16"):
            res = {}
            for method in ("reference", "chunked"):
                spec = dict(method=method, vocab=vocab, tokens=tokens, dtype=dtype, chunk_size=args.chunk_size,
                            repeats=args.repeats, threads=args.threads)
                res[method] = measure(__file__, spec)
                print(f"  vocab={vocab} tokens={tokens} {dtype} {method}: {res[method]}", file=sys.stderr, flush=True)
            row = dict(vocab=vocab, tokens=tokens, dtype=dtype, reference=res["reference"], chunked=res["chunked"])
            if "error" not in res["reference"] and "error" not in res["chunked"]:
                row["mem_ratio"] = res["chunked"]["peak_mib"] / max(res["reference"]["peak_mib"], 1e-9)
                row["time_ratio"] = res["chunked"]["time_s"] / res["reference"]["time_s"]
            rows.append(row)

    meta = dict(device="cpu", threads=args.threads, chunk_size=args.chunk_size, repeats=args.repeats,
                quick=args.quick, memory="ru_maxrss delta per fresh subprocess")
    write_results(RESULTS, meta, rows)

    head = (f"{'vocab':>7} {'tokens':>6} {'dtype':>8} | {'ref MiB':>8} {'ref s':>6} | {'ours MiB':>8} {'ours s':>6} "
            f"| {'mem ratio':>9} {'time ratio':>10}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ref, ours = r["reference"], r["chunked"]
        print(f"{r['vocab']:>7} {r['tokens']:>6} {r['dtype']:>8} | {fmt(ref.get('peak_mib'), 0):>8} "
              f"{fmt(ref.get('time_s')):>6} | {fmt(ours.get('peak_mib'), 0):>8} {fmt(ours.get('time_s')):>6} "
              f"| {fmt(r.get('mem_ratio')):>9} {fmt(r.get('time_ratio')):>10}")
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
