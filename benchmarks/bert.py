"""A BERT-base-width regressor: the audit against a bare forward over the same batches, with and without the store.

    python benchmarks/bert.py                                   # 4 blocks, T = 32, N = 2000, 2 reps (≈ 15 min, 2 cores)
    python benchmarks/bert.py --blocks 12 --reps 1 --section bert-12
    python benchmarks/bert.py --seq 128 --n 2000 --reps 1 --section bert-t128

Model: ``BertForSequenceClassification`` built from a ``transformers.BertConfig`` (hidden 768, intermediate
3072, 12 heads, ``--blocks`` layers, vocabulary 2000, 4 regression targets; random init, nothing downloaded),
saved with ``save_pretrained`` and audited through the CLI's path (``run_audit`` with ``--model-def``, every
Linear layer: q, k, v, attention output, intermediate, output per block, then pooler and classifier; token
inputs (B, T, h) mean-pooled). Data: N rows of random token ids (T = ``--seq``) and targets from a fixed linear
map of token counts. All in this one process, interleaved (A B C D, A B C D, …), each row the minimum over reps:

* **bare forward**: read the ids in batches from HDF5, forward the model, nothing kept;
* **bare forward + h5py**: the same with hooks that pool every Linear input as the audit does and write outputs,
  targets and features with plain h5py — the reference of the with-store figure;
* **audit, no store** and **audit with store**: ``run_audit``; the share of the analysis (``report_of``:
  eigh of Σ_H, W's subspace and the conditions for every layer) is timed inside.

Peak RSS: each audit once more in a fresh process (``ru_maxrss``). Updates the ``bert`` section of
docs/performance.md (or ``--section``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nrc_audit.engine.threads import quiet_idle_threads  # noqa: E402 — before numpy and torch load

quiet_idle_threads()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _tv_ops  # noqa: E402,F401 — torchvision's op schemas, so that transformers imports against the CPU torch

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import Machine, drop_dirty_pages, load_average, markdown_table, peak_rss_mib, stamp, update_doc_section  # noqa: E402
from nrc_audit.config import AuditConfig, DataOptions, ModelOptions  # noqa: E402
from nrc_audit.engine import run as engine_run  # noqa: E402

BUILDER = '''def bert(config):
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig.from_dict(config))
'''
VOCAB, T_OUT = 2000, 4


def bert_model(blocks: int, seq: int, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=blocks, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=max(128, seq), num_labels=T_OUT,
                     problem_type="regression", attn_implementation="eager")  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def make_workload(folder: Path, blocks: int, seq: int, n: int) -> tuple[Path, Path, Path]:
    model = bert_model(blocks, seq)
    model_dir = folder / "bert"
    model.save_pretrained(model_dir, safe_serialization=True)
    (folder / "hf.py").write_text(BUILDER, encoding="utf-8")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(n, seq), dtype=np.int64)
    counts = np.stack([np.bincount(row % 64, minlength=64) for row in ids]).astype(np.float64)  # (n, 64)
    y = counts @ rng.standard_normal((64, T_OUT)) / np.sqrt(seq) + 0.1 * rng.standard_normal((n, T_OUT))
    data = folder / "data.h5"
    with h5py.File(data, "w") as fh:
        fh["X"], fh["Y"] = ids, y.astype(np.float32)
    return model_dir, folder / "hf.py", data


def bare_pass(model: nn.Module, data: Path, n: int, batch: int, out_path: Path | None) -> float:
    """Forward over the first n rows; with ``out_path`` also pool every Linear input and write it with h5py."""
    start = time.perf_counter()
    captured: list[torch.Tensor] = []
    hooks = []
    if out_path is not None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        hooks = [m.register_forward_pre_hook(lambda _, inp: captured.append(
            inp[0].mean(dim=1) if inp[0].ndim == 3 else inp[0])) for m in linears]  # fmt: skip
    out_fh = h5py.File(out_path, "w") if out_path is not None else None
    sinks: list[h5py.Dataset] = []
    try:
        with h5py.File(data, "r") as fh:
            for a in range(0, n, batch):
                b = min(a + batch, n)
                x, y = torch.from_numpy(fh["X"][a:b]), fh["Y"][a:b].astype(np.float64)
                with torch.inference_mode():
                    out = model(x).logits
                if out_fh is not None:
                    arrays = [out.numpy(), y, *[f.numpy() for f in captured]]
                    if not sinks:
                        sinks = [out_fh.create_dataset(f"d{i}", shape=(n, arr.shape[1]), dtype=arr.dtype)
                                 for i, arr in enumerate(arrays)]  # fmt: skip
                    for sink, arr in zip(sinks, arrays):
                        sink[a:b] = arr
                    captured.clear()
    finally:
        for hk in hooks:
            hk.remove()
        if out_fh is not None:
            out_fh.close()
    return time.perf_counter() - start


class AnalysisClock:
    """Times ``engine.run.report_of`` (the per-layer analysis and the report built from it) inside ``run_audit``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = engine_run.report_of

    def __enter__(self) -> "AnalysisClock":
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._inner(*args, **kwargs)
            finally:
                self.seconds = time.perf_counter() - start

        engine_run.report_of = timed
        return self

    def __exit__(self, *exc) -> None:
        engine_run.report_of = self._inner


def audit_pass(model_dir: Path, builder: Path, data: Path, n: int, batch: int, store: Path | None) -> tuple[float, float]:
    config = AuditConfig(model_dir, data, model=ModelOptions(model_def=f"{builder}:bert"), data=DataOptions(limit=n),
                         batch_size=batch, features_path=store, progress=False)  # fmt: skip
    with AnalysisClock() as clock:
        start = time.perf_counter()
        engine_run.run_audit(config)
        wall = time.perf_counter() - start
    return wall, clock.seconds


def child(args: argparse.Namespace) -> None:
    store = Path(args.dir) / "child-store.h5" if args.store else None
    wall, _ = audit_pass(Path(args.dir) / "bert", Path(args.dir) / "hf.py", Path(args.dir) / "data.h5", args.n,
                         args.batch_size, store)  # fmt: skip
    print(json.dumps({"wall": wall, "peak_rss_mib": peak_rss_mib()}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak RSS runs")
    p.add_argument("--section", default="bert")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    machine = Machine.here()
    with tempfile.TemporaryDirectory(prefix="nrc-bert-") as tmp:
        folder = Path(tmp)
        model_dir, builder, data = make_workload(folder, args.blocks, args.seq, args.n)
        model = bert_model(args.blocks, args.seq)
        store, bare = folder / "store.h5", folder / "bare.h5"
        audit_pass(model_dir, builder, data, 2 * args.batch_size, args.batch_size, None)  # warm-up
        seen: dict[str, list[tuple[float, float, float]]] = {k: [] for k in ("fwd", "fwd+h5", "audit", "audit+store")}
        for rep in range(args.reps):
            for name in seen:
                drop_dirty_pages()
                load = load_average()
                if name.startswith("fwd"):
                    wall, share = bare_pass(model, data, args.n, args.batch_size, bare if "h5" in name else None), 0.0
                else:
                    wall, share = audit_pass(model_dir, builder, data, args.n, args.batch_size,
                                             store if "store" in name else None)  # fmt: skip
                seen[name].append((wall, share, load))
                print(f"rep {rep + 1} {name}: {wall:.1f} s (analysis {share:.1f} s), load {load:.2f}", file=sys.stderr, flush=True)
                store_mib = store.stat().st_size / 2**20 if store.exists() else 0.0
                for path in (store, bare):
                    path.unlink(missing_ok=True)
        rss = {}
        if not args.no_rss:
            from _common import run_child

            for with_store in (False, True):
                extra = ["--store"] if with_store else []
                rss[with_store] = run_child(Path(__file__), ["--dir", tmp, "--n", str(args.n), "--batch-size",
                                                             str(args.batch_size), *extra])["peak_rss_mib"]  # fmt: skip
    body = render(args, machine, seen, store_mib, rss)
    print(body)
    if not args.no_doc:
        update_doc_section(args.section, body)


def render(args, machine: Machine, seen: dict, store_mib: float, rss: dict) -> str:
    best = {k: min(v, key=lambda r: r[0]) for k, v in seen.items()}
    loads = [r[2] for v in seen.values() for r in v]
    labels = {"fwd": "bare forward", "fwd+h5": "bare forward + h5py writes", "audit": "audit, no feature store",
              "audit+store": "audit with feature store"}  # fmt: skip
    rows = [[labels[k], f"{best[k][0]:.1f}", f"{best[k][1]:.1f}" if k.startswith("audit") else "—",
             f"{100 * best[k][1] / best[k][0]:.0f} %" if k.startswith("audit") else "—",
             f"{best[k][2]:.1f}"] for k in seen]  # fmt: skip
    table = markdown_table(["run", "wall s (min)", "analysis s", "analysis share", "1-min load at its start"], rows)
    rss_line = (f" Peak RSS of the audit in a fresh process: **{rss[False]:,.0f} MiB** without the store, "
                f"**{rss[True]:,.0f} MiB** with it." if rss else "")  # fmt: skip
    return "\n".join([
        f"{stamp(machine)} BERT-width regressor: {args.blocks} blocks, hidden 768, intermediate 3072, T = {args.seq}, "
        f"N = {args.n:,}, batch {args.batch_size}, {6 * args.blocks + 2} Linear layers audited; {args.reps} interleaved "
        f"repetitions (minimum shown); the feature store is {store_mib:,.0f} MiB. Load during the runs: "
        f"{min(loads):.1f}–{max(loads):.1f} (the benchmark's own 2 threads count up to 2).",
        "",
        table,
        "",
        f"**audit without store ÷ bare forward = {best['audit'][0] / best['fwd'][0]:.2f}×**; "
        f"**audit with store ÷ (bare forward + h5py) = {best['audit+store'][0] / best['fwd+h5'][0]:.2f}×**.{rss_line}",
        "",
        f"Command: `python benchmarks/bert.py {' '.join(sys.argv[1:])}`",
    ])


if __name__ == "__main__":
    sys.exit(main())
