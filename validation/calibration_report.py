"""The report of the calibration study (``validation/calibrate.py``): distributions, threshold scans, the verdicts
of the package's default thresholds, a figure, and the generated block of ``docs/validation.md``.

Pure post-processing of ``docs/calibration_results.json``: every verdict here is recomputed from the stored
per-layer metrics with :func:`nrc_audit.core.verdicts.condition_passed`, the package's own policy, so the numbers
follow ``nrc_audit.config.Thresholds`` (the one home of the defaults).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from nrc_audit.config import Thresholds
from nrc_audit.config import NO_WEIGHT_DECAY_REGION
from nrc_audit.core.verdicts import (condition_passed, fails_only_the_noise_condition, in_no_weight_decay_region,
                                     is_collapsed)

REPO = Path(__file__).resolve().parents[1]
DOC, IMG = REPO / "docs" / "validation.md", REPO / "docs" / "img" / "calibration.png"
BEGIN, END = "<!-- BEGIN calibration results", "<!-- END calibration results -->"
WELL_FITTED_R2 = 0.9  # a model "fits" when its train MSE is ≤ 10 % of the targets' variance
KEYS = {"auto": "k = auto (default)", "t": "k = t"}
KINDS = {"rank-deficient": lambda run: run["r"] < run["t"], "full-rank": lambda run: run["r"] == run["t"]}


def well_fitted(run: dict) -> bool:
    return run["model_mse"] <= (1 - WELL_FITTED_R2) * run["target_variance"]


def collapsed(layer: dict, th: Thresholds) -> bool:
    return is_collapsed(condition_passed(layer, th))


def warned(layer: dict, th: Thresholds) -> bool:
    """Collapsed, but inside the no-weight-decay region: the report carries a layer warning saying so."""
    return in_no_weight_decay_region(layer, collapsed(layer, th))


def last(run: dict, key: str) -> dict:
    return run["audits"][key]["layers"][-1]


def top_collapsed(run: dict, key: str, th: Thresholds) -> int:
    """How many layers, counted down from the last, are collapsed without a break (0: the last is not)."""
    n = 0
    for layer in reversed(run["audits"][key]["layers"]):
        if not collapsed(layer, th):
            break
        n += 1
    return n


def span(values: Iterable[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return "—" if not vals else f"{min(vals):.3f}–{max(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def groups(runs: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(λ = 0, λ > 0 and well fitted, λ > 0 and not well fitted)."""
    zero = [r for r in runs if r["wd"] == 0]
    pos = [r for r in runs if r["wd"] > 0 and well_fitted(r)]
    return zero, pos, [r for r in runs if r["wd"] > 0 and not well_fitted(r)]


def separation(runs: list[dict], key: str, metric: str, higher_collapsed: bool) -> dict:
    """The last layer's ``metric`` for λ = 0 against λ > 0 (well fitted): ranges and the gap between them."""
    zero, pos, _ = groups(runs)
    z = [last(r, key)[metric] for r in zero if last(r, key)[metric] is not None]
    p = [last(r, key)[metric] for r in pos if last(r, key)[metric] is not None]
    gap = (min(p) - max(z)) if higher_collapsed else (min(z) - max(p))
    return {"zero": (min(z), max(z)), "pos": (min(p), max(p)), "gap": gap}


def scan(runs: list[dict], key: str, make: Callable[[float], Thresholds], grid: list[float]) -> list[dict]:
    zero, pos, _ = groups(runs)
    return [{"value": v, "zero_collapsed": sum(collapsed(last(r, key), make(v)) for r in zero),
             "pos_collapsed": sum(collapsed(last(r, key), make(v)) for r in pos)} for v in grid]  # fmt: skip


def misclassified(runs: list[dict], th: Thresholds) -> list[str]:
    """Every cell (architecture, targets, λ) where the defaults get a model wrong at its last layer (k = auto)."""
    zero, pos, _ = groups(runs)
    cells: dict[tuple, list[dict]] = {}
    for r in zero + pos:
        if collapsed(last(r, "auto"), th) != (r["wd"] > 0):
            cells.setdefault((r["arch"], r["target"], r["wd"]), []).append(r)
    out = []
    for (arch, target, wd), wrong in cells.items():
        ls = [last(r, "auto") for r in wrong]
        fails = sorted({c for l in ls for c, ok in condition_passed(l, th).items() if not ok})
        flagged = sum(warned(l, th) for l in ls)
        note = f" ({flagged} with the no-weight-decay warning)" if flagged else ""
        noise_only = sum(fails_only_the_noise_condition(l, condition_passed(l, th)) for l in ls)
        if noise_only:
            note = f" ({noise_only} with the noise-condition-alone warning)"
        out.append(f"{arch} {target} λ={wd:g}: {len(wrong)} seed(s) {'collapsed' if wd == 0 else 'not collapsed'}{note}"
                   f"{'' if wd == 0 else ' (fail ' + ', '.join(fails) + ')'}; NRC3 {span(l['nrc3'] for l in ls)}, "
                   f"noise alignment {span(l['noise_alignment'] for l in ls)}")  # fmt: skip
    return out


def fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def condition_table(runs: list[dict], key: str, th: Thresholds) -> list[str]:
    """One row per (target kind, architecture, λ): last-layer ranges over seeds and the verdict counts."""
    rows = ["| targets | model | λ | fitted | NRC1 | NRC3 | noise alignment | NRC4 ratio | stable_rank_w | "
            "last layer collapsed | top layers collapsed |",
            "|---|---|---:|---:|---|---|---|---|---|---:|---|"]  # fmt: skip
    for kind, pick in KINDS.items():
        for arch in dict.fromkeys(r["arch"] for r in runs):
            for wd in sorted({r["wd"] for r in runs}):
                cell = [r for r in runs if pick(r) and r["arch"] == arch and r["wd"] == wd]
                if not cell:
                    continue
                ls = [last(r, key) for r in cell]
                rows.append(
                    f"| {kind} | {arch} | {wd:g} | {sum(map(well_fitted, cell))}/{len(cell)} | "
                    f"{span(l['nrc1'] for l in ls)} | {span(l['nrc3'] for l in ls)} | "
                    f"{span(l['noise_alignment'] for l in ls)} | {span(l['nrc4_ratio'] for l in ls)} | "
                    f"{span(l['stable_rank_w'] for l in ls)} | {sum(collapsed(l, th) for l in ls)}/{len(cell)} | "
                    f"{', '.join(str(top_collapsed(r, key, th)) for r in cell)} |"
                )
    return rows


def verdict_counts(runs: list[dict], th: Thresholds) -> list[str]:
    rows = ["| k rule | targets | λ = 0: last layer fails | λ = 0: fails or warned | λ > 0, fitted: last layer "
            "collapsed | … of which warned | by λ |", "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for key, label in KEYS.items():
        for kind, pick in KINDS.items():
            zero, pos, _ = groups([r for r in runs if pick(r)])
            by = ", ".join(f"{wd:g}: {sum(collapsed(last(r, key), th) for r in pos if r['wd'] == wd)}/"
                           f"{sum(r['wd'] == wd for r in pos)}" for wd in sorted({r['wd'] for r in pos}))  # fmt: skip
            fails = sum(not collapsed(last(r, key), th) for r in zero)
            rows.append(f"| {label} | {kind} | {fails}/{len(zero)} | "
                        f"{fails + sum(warned(last(r, key), th) for r in zero)}/{len(zero)} | "
                        f"{sum(collapsed(last(r, key), th) for r in pos)}/{len(pos)} | "
                        f"{sum(warned(last(r, key), th) for r in pos)} | {by} |")  # fmt: skip
    return rows


def write_block(res: dict, th: Thresholds, old: Thresholds) -> str:
    runs, meta = res["runs"], res["meta"]
    zero, pos, unfit = groups(runs)
    lines = [f"{BEGIN} (generated by validation/calibration_report.py; do not edit by hand) -->", "",
             f"`{meta['command']}`: {len(runs)} models, {meta['cpu_s']:.0f} s of CPU ({meta['wall_s']:.0f} s "
             f"wall-clock), torch {meta['torch']}. λ = 0: {len(zero)} models; λ > 0: {len(pos)} fitted "
             f"(train R² ≥ {WELL_FITTED_R2}), {len(unfit)} not.", "",
             "**Separation of the last layer** (λ = 0 against fitted λ > 0; gap > 0: some threshold separates them):", "",
             "| k rule | targets | metric | λ = 0 | λ > 0 | gap |", "|---|---|---|---|---|---:|"]  # fmt: skip
    for key, label in KEYS.items():
        for kind, pick in KINDS.items():
            sub = [r for r in runs if pick(r)]
            for metric, higher in (("nrc3", True), ("noise_alignment", False)):
                s = separation(sub, key, metric, higher)
                lines.append(f"| {label} | {kind} | {metric} | {s['zero'][0]:.3f}–{s['zero'][1]:.3f} | "
                             f"{s['pos'][0]:.3f}–{s['pos'][1]:.3f} | {s['gap']:+.3f} |")  # fmt: skip
    for name, t in (("previous defaults", old), ("new defaults", th)):
        lines += ["", f"**Last-layer verdicts, {name}** ({describe(t)}):", "", *verdict_counts(runs, t)]
    lines += ["", "**Threshold scans** (k = auto, all targets; counts of last layers called collapsed):", ""]
    base = dataclasses.replace(th, noise_alignment_max=1.0)
    nrc3 = scan(runs, "auto", lambda v: dataclasses.replace(base, nrc3_min=v), [0.7, 0.8, 0.85, 0.9, 0.95])
    na = scan(runs, "auto", lambda v: dataclasses.replace(th, noise_alignment_max=v), [0.2, 0.3, 0.35, 0.4, 0.45, 0.5])
    lines += ["| rule | value | λ = 0 collapsed | λ > 0 fitted collapsed |", "|---|---:|---:|---:|"]
    lines += [f"| nrc3_min (no noise gate) | {s['value']:g} | {s['zero_collapsed']}/{len(zero)} | "
              f"{s['pos_collapsed']}/{len(pos)} |" for s in nrc3]  # fmt: skip
    lines += [f"| noise_alignment_max (nrc3_min {th.nrc3_min}) | {s['value']:g} | {s['zero_collapsed']}/{len(zero)} | "
              f"{s['pos_collapsed']}/{len(pos)} |" for s in na]  # fmt: skip
    region = " and ".join(f"{f} > {b:g}" for f, b in NO_WEIGHT_DECAY_REGION.items())
    lines += ["", f"**No-weight-decay region** ({region}; a collapsed layer there gets a layer warning): "
              f"λ = 0 last layers collapsed there {sum(warned(last(r, 'auto'), th) for r in zero)}/"
              f"{sum(collapsed(last(r, 'auto'), th) for r in zero)} of those collapsed; fitted λ > 0 last layers "
              f"warned, by λ: " + ", ".join(f"{wd:g}: {sum(warned(last(r, 'auto'), th) for r in pos if r['wd'] == wd)}/"
                                          f"{sum(r['wd'] == wd for r in pos)}" for wd in sorted({r['wd'] for r in pos}))
              + "; every layer (not only the last) of fitted λ > 0 models, collapsed and warned: "
              f"{sum(warned(l, th) for r in pos for l in r['audits']['auto']['layers'])}/"
              f"{sum(collapsed(l, th) for r in pos for l in r['audits']['auto']['layers'])}."]  # fmt: skip
    wrong = misclassified(runs, th)
    lines += ["", f"**Misclassified by the new defaults at k = auto** ({len(wrong)} cells of 3 seeds):", ""] + ([f"- {w}" for w in wrong] or ["- none"])
    for key, label in KEYS.items():
        lines += ["", f"**Per condition, {label}, new defaults** (last layer; ranges over the 3 seeds; top layers "
                  "collapsed: per seed, how many layers from the last down are collapsed):", "",
                  *condition_table(runs, key, th)]  # fmt: skip
    lines += ["", "![calibration: last-layer NRC3 and noise alignment against λ](img/calibration.png)", "", END]
    return "\n".join(lines)


def describe(th: Thresholds) -> str:
    d = th.to_dict()
    return ", ".join(f"{k} {v:g}" for k, v in d.items())


def plot(runs: list[dict], th: Thresholds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wds = sorted({r["wd"] for r in runs})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    markers = {"mlp4x32": "o", "mlp6x64": "s", "resnet": "^"}
    colours = {"rank-deficient": "tab:blue", "full-rank": "tab:orange"}
    for col, key in enumerate(KEYS):
        for row, (metric, line) in enumerate((("nrc3", th.nrc3_min), ("noise_alignment", th.noise_alignment_max))):
            ax = axes[row, col]
            for i, r in enumerate(runs):
                kind = next(k for k, pick in KINDS.items() if pick(r))
                x = wds.index(r["wd"]) + (0.25 if kind == "full-rank" else -0.25) + 0.04 * (r["seed"] - 1) + \
                    {"mlp4x32": -0.1, "mlp6x64": 0.0, "resnet": 0.1}[r["arch"]]  # fmt: skip
                v = last(r, key)[metric]
                if v is not None:
                    ax.scatter(x, v, marker=markers[r["arch"]], s=22, alpha=0.75, color=colours[kind],
                               facecolors=colours[kind] if well_fitted(r) else "none")  # fmt: skip
            ax.axhline(line, ls="--", color="k", lw=1)
            ax.set_title(f"last layer {metric}, {KEYS[key]}")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds])
            ax.set_xlabel("weight decay λ")
    handles = [plt.Line2D([], [], ls="", marker=m, color="grey", label=a) for a, m in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=k) for k, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False)
    fig.suptitle("Calibration: dashed = default threshold (hollow = not fitted)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


PREVIOUS = Thresholds(nrc1_max=0.25, nrc2_min=0.6, nrc3_min=0.7, nrc4_ratio_max=2.0, noise_alignment_max=1.0)


def main(results: Path) -> None:
    res = json.loads(results.read_text())
    th = Thresholds()
    plot(res["runs"], th, IMG)
    block = write_block(res, th, PREVIOUS)
    doc = DOC.read_text()
    if BEGIN in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)
    print(block)


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "calibration_results.json")
