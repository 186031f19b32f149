"""Benchmark: peak memory and time of forward+backward of chunked DAC-KL vs TRL's `generalized_jsd_loss` (CPU).

    python benchmarks/bench_dac_kl.py            # vocab 32k (2k, 8k tokens) and 128k (2k tokens)
    python benchmarks/bench_dac_kl.py --quick    # smaller shapes, a sanity run in about a minute

Every measurement runs in a fresh subprocess on the same seeded random logits `[1, tokens, vocab]` (student
requires grad, teacher does not; a few positions labelled -100).

Peak memory: the rise of the process's max RSS over forward+backward (`benchmarks/_peak.py`), which includes the
gradient w.r.t. the student logits (the same size for every method). Time: wall clock of forward+backward, the
memory-measuring run itself, or the best of `--repeats` further runs.

Methods: `gkd_beta0.5` (GKD's default generalized JSD), `gkd_beta0` (forward KL), `dac_exact` (chunked DAC-KL,
learned band, full sort: `dac_top_k=None`), `dac_topk` (same with `dac_top_k=--top-k`). Ratios are ours / GKD with
beta=0.5 (GKD's default) and / beta=0. Results go to `benchmarks/results/dac_kl.json` and a table is printed.
Targets (issue 3): peak-memory ratio <= 1.0 at vocab 128k, time ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _peak import fmt, measure, time_and_peak, write_results

RESULTS = Path(__file__).parent / "results" / "dac_kl.json"


def _worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    tokens, vocab = spec["tokens"], spec["vocab"]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, tokens, vocab, generator=g).mul_(2).requires_grad_()
    teacher = torch.randn(1, tokens, vocab, generator=g).mul_(3)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[0, :: 16] = -100

    method = spec["method"]
    if method.startswith("gkd"):
        from trl.experimental.gkd import GKDTrainer

        beta = float(method.removeprefix("gkd_beta"))

        def run():
            loss = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta)
            loss.backward()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from trl_mgsr.losses import DACBandNet, chunked_dac_kl_loss

        net = DACBandNet()
        top_k = spec["top_k"] if method == "dac_topk" else None

        def run():
            term = chunked_dac_kl_loss(student, teacher, labels, band_net=net, top_k=top_k,
                                       chunk_size=spec["chunk_size"])
            (term.total / term.num_items).backward()

    out = time_and_peak(run, spec["repeats"], reset=lambda: setattr(student, "grad", None))
    if method == "dac_topk":  # how good the approximation is on these logits (first 64 positions, fixed band)
        with torch.no_grad():
            kw = dict(labels=labels[:, :64], lo=0.0, hi=0.95, chunk_size=64)
            exact = chunked_dac_kl_loss(student[:, :64], teacher[:, :64], **kw).total
            approx = chunked_dac_kl_loss(student[:, :64], teacher[:, :64], top_k=top_k, **kw).total
            top_mass = torch.softmax(teacher[0, :64], -1).topk(top_k, -1).values.sum(-1).mean()
        out.update(topk_rel_err=abs(approx - exact).item() / exact.item(), topk_mass=top_mass.item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (512 tokens)")
    ap.add_argument("--top-k", type=int, default=1024, help="dac_top_k of the dac_topk method")
    ap.add_argument("--chunk-size", type=int, default=1024, help="loss_chunk_size of the DAC-KL methods")
    ap.add_argument("--repeats", type=int, default=0,
                    help="extra timed runs after the memory run (0: the memory run is also the timed one)")
    ap.add_argument("--threads", type=int, default=torch_threads())
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    shapes = [(32_000, 512), (128_000, 512)] if args.quick else [(32_000, 2048), (32_000, 8192), (128_000, 2048)]
    repeats = args.repeats
    methods = ["gkd_beta0.5", "gkd_beta0", "dac_exact", "dac_topk"]
    rows = []
    for vocab, tokens in shapes:
        res = {}
        for method in methods:
            spec = dict(method=method, vocab=vocab, tokens=tokens, top_k=args.top_k, chunk_size=args.chunk_size,
                        repeats=repeats, threads=args.threads)
            res[method] = measure(__file__, spec)
            print(f"  vocab={vocab} tokens={tokens} {method}: {res[method]}", file=sys.stderr, flush=True)
        for method in ("dac_exact", "dac_topk"):
            row = dict(vocab=vocab, tokens=tokens, method=method, **res[method])
            for base in ("gkd_beta0.5", "gkd_beta0"):
                b = res[base]
                row[f"{base}_peak_mib"], row[f"{base}_time_s"] = b.get("peak_mib"), b.get("time_s")
                if "error" not in b and "error" not in res[method]:
                    row[f"mem_ratio_vs_{base}"] = res[method]["peak_mib"] / max(b["peak_mib"], 1e-9)
                    row[f"time_ratio_vs_{base}"] = res[method]["time_s"] / b["time_s"]
            rows.append(row)

    targets = {"mem_ratio_max_at_128k": 1.0, "time_ratio_max": 1.5}
    for row in rows:
        r_mem, r_time = row.get("mem_ratio_vs_gkd_beta0.5"), row.get("time_ratio_vs_gkd_beta0.5")
        row["meets_mem_target"] = None if row["vocab"] < 128_000 or r_mem is None else r_mem <= 1.0
        row["meets_time_target"] = None if r_time is None else r_time <= 1.5
    meta = dict(device="cpu", threads=args.threads, chunk_size=args.chunk_size, top_k=args.top_k, repeats=repeats,
                quick=args.quick, dtype="float32", memory="ru_maxrss delta per fresh subprocess", targets=targets)
    write_results(RESULTS, meta, rows)

    head = (f"{'vocab':>7} {'tokens':>6} {'method':>9} | {'peak MiB':>8} {'time s':>7} | {'GKD.5 MiB':>9} "
            f"{'GKD.5 s':>7} {'mem/.5':>6} {'time/.5':>7} | {'GKD0 MiB':>8} {'GKD0 s':>6} {'mem/0':>6} {'time/0':>6}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['vocab']:>7} {r['tokens']:>6} {r['method']:>9} | {fmt(r.get('peak_mib'), 0):>8} "
              f"{fmt(r.get('time_s')):>7} | {fmt(r['gkd_beta0.5_peak_mib'], 0):>9} {fmt(r['gkd_beta0.5_time_s']):>7} "
              f"{fmt(r.get('mem_ratio_vs_gkd_beta0.5')):>6} {fmt(r.get('time_ratio_vs_gkd_beta0.5')):>7} | "
              f"{fmt(r['gkd_beta0_peak_mib'], 0):>8} {fmt(r['gkd_beta0_time_s']):>6} "
              f"{fmt(r.get('mem_ratio_vs_gkd_beta0')):>6} {fmt(r.get('time_ratio_vs_gkd_beta0')):>6}")
    print(f"targets: peak-memory ratio <= 1.0 at vocab 128k, time ratio <= 1.5 (vs GKD beta=0.5); "
          f"results in {RESULTS}")


def torch_threads() -> int:
    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
