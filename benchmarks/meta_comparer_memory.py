"""Peak memory and throughput of the meta-comparer: a training step and inference at the default size,
and how the peak grows as N_Q x N_R doubles.

Every measurement runs in a fresh subprocess. Peak memory is, on CUDA, ``torch.cuda.max_memory_allocated``
above what was allocated before the measured call; on CPU, the process's peak resident set (VmHWM, reset
through ``/proc/self/clear_refs``) above its resident set before the call.

    python benchmarks/meta_comparer_memory.py --out runs/meta_comparer_memory          # default 128 px
    python benchmarks/meta_comparer_memory.py --image-size 256 --out runs/meta_comparer_memory_256

Rows:
- ``train_step``: forward + backward + Adam step of MetaComparer on B episodes (B queries + B x R references).
- ``inference``: anomaly scores + maps of B test images against every patch of ``--bank-images`` references
  (the bank built beforehand). ``--inference-only`` measures just this row.
- ``pairs``: co-attention + comparer + the three losses, forward + backward, on random patch features at one
  scale, for N_Q x N_R doubling; with ``max_pair_elements`` small, the comparer runs in recomputed chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, device: str, repeats: int) -> dict:
    """Runs ``fn`` once to warm up, then ``repeats`` times: peak MiB above the start, seconds per call."""
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    return {"peak_mib": round((peak - before) / 2**20, 1), "seconds": round(seconds, 4)}


def child(spec: dict) -> dict:
    import torch

    from lightning_modules.meta_comparer import MetaComparer
    from lightning_modules.meta_comparer.losses import attention_loss, classification_loss, ranking_loss

    torch.manual_seed(0)
    device = spec["device"]
    batch, size = spec["batch"], spec["image_size"]
    if spec["kind"] == "pairs":
        model = MetaComparer(channels=spec["channels"], max_pair_elements=spec["max_pair_elements"]).model.to(device)
        queries = torch.randn(batch, spec["nq"], spec["channels"], device=device, requires_grad=True)
        references = torch.randn(batch, spec["nr"], spec["channels"], device=device, requires_grad=True)
        labels = torch.randint(0, 2, (batch,), device=device)

        def step():
            attention = model.co_attention(queries, references)
            logits = model.comparer(queries, references)
            loss = (classification_loss([logits], labels) + attention_loss([attention], labels)
                    + ranking_loss([logits], [attention.amax(2).detach()], num_pairs=1024))
            loss.backward()

        return measure(step, device, spec["repeats"])

    module = MetaComparer(num_query_patches=spec["nq"], num_reference_patches=spec["nr"]).to(device)
    if spec["kind"] == "train_step":
        module.train()
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        batch_dict = {"query": {"image": torch.rand(batch, 3, size, size, device=device),
                                "label": torch.arange(batch, device=device) % 2},
                      "references": torch.rand(batch, spec["references"], 3, size, size, device=device)}

        def step():
            optimizer.zero_grad(set_to_none=True)
            sum(module.loss_terms(batch_dict).values()).backward()
            optimizer.step()

        result = measure(step, device, spec["repeats"])
    else:
        module.eval()
        with torch.no_grad():
            start = time.perf_counter()
            module.bank = module.model.reference_bank(torch.rand(spec["bank_images"], 3, size, size, device=device),
                                                      batch)
            bank_seconds = time.perf_counter() - start
        bank_patches = [int(scale.shape[1]) for scale in module.bank]
        images = torch.rand(batch, 3, size, size, device=device)

        def step():
            with torch.no_grad():
                module.anomaly_scores(images)

        result = measure(step, device, spec["repeats"])
        result.update(bank_seconds=round(bank_seconds, 2), bank_patches=bank_patches)
    result["images_per_second"] = round(batch / result["seconds"], 2)
    return result


def run_child(spec: dict) -> dict:
    # A fixed mmap threshold makes glibc give freed tensors back at once, so the resident set tracks live memory.
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({**spec, **result}), flush=True)
    return {**spec, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--references", type=int, default=2, help="reference images per training query")
    parser.add_argument("--num-query-patches", type=int, default=128)
    parser.add_argument("--num-reference-patches", type=int, default=128)
    parser.add_argument("--bank-images", type=int, default=100, help="reference images of the inference bank")
    parser.add_argument("--pair-sizes", nargs="+", type=int, default=[64, 128, 256, 512, 1024],
                        help="N_Q = N_R values; the products in between (N_Q, 2 N_Q) are measured too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inference-only", action="store_true", help="skip the training step and pair rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "meta_comparer_memory")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    base = {"device": args.device, "batch": args.batch, "image_size": args.image_size, "threads": args.threads,
            "repeats": args.repeats, "references": args.references, "nq": args.num_query_patches,
            "nr": args.num_reference_patches,
            "bank_images": args.bank_images, "channels": 64, "max_pair_elements": 2**25}
    rows = [run_child({**base, "kind": "inference"})]
    if not args.inference_only:
        rows.insert(0, run_child({**base, "kind": "train_step"}))
    for chunked in () if args.inference_only else (False, True):
        for n in args.pair_sizes:
            for nq, nr in ((n, n), (n, 2 * n)):
                if nq == args.pair_sizes[-1] and nr > nq:
                    continue
                rows.append(run_child({**base, "kind": "pairs", "nq": nq, "nr": nr, "repeats": 1,
                                       "max_pair_elements": 2**20 if chunked else 2**30}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Device: {args.device}, {args.threads} thread(s); batch {args.batch}; {args.image_size} px.", "",
             "| measurement | N_Q | N_R | peak memory (MiB) | s / call | images / s |", "|---|---|---|---|---|---|"]
    for row in rows[:1 if args.inference_only else 2]:
        label = (f"training step (B={args.batch} queries, R={args.references} refs each)" if row["kind"] == "train_step"
                 else f"inference (B={args.batch}; bank: {args.bank_images} refs, "
                      f"every patch: {' / '.join(map(str, row['bank_patches']))} per scale, built in {row['bank_seconds']} s)")
        lines.append(f"| {label} | {row['nq']} | {row['nr']} | {row['peak_mib']} | {row['seconds']} | "
                     f"{row['images_per_second']} |")
    pairs = [r for r in rows if r["kind"] == "pairs"]
    if pairs:
        lines += ["", "Peak memory of co-attention + comparer + losses (forward + backward, one scale, B="
                  f"{args.batch}, D=64, hidden 64) as N_Q x N_R doubles:", "",
                  "| N_Q x N_R | N_Q | N_R | unchunked peak (MiB) | chunked (2^20 pair elements) peak (MiB) |",
                  "|---|---|---|---|---|"]
    plain = [r for r in pairs if r["max_pair_elements"] == 2**30]
    chunked = {(r["nq"], r["nr"]): r for r in pairs if r["max_pair_elements"] == 2**20}
    for row in plain:
        lines.append(f"| {row['nq'] * row['nr']} | {row['nq']} | {row['nr']} | {row['peak_mib']} | "
                     f"{chunked[(row['nq'], row['nr'])]['peak_mib']} |")
    (args.out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
