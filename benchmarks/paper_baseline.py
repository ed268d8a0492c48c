"""A faithful re-implementation of how the paper's ``run_measurements.py`` measures an MLP (PAPER_NOTES §2).

For each layer ℓ, as ``compute_nrc_mlp`` does:

1. a full forward pass over the data with one forward hook that keeps the layer's *input*; all batches
   are concatenated into H (N, h) — one forward pass per layer, the whole H in memory;
2. ``Sh = H_cᵀH_c / N`` and its SVD (rows of V_H are the eigenvectors);
3. NRC1 = |1 − tr(V_H[:t] Sh V_H[:t]ᵀ) / tr Sh|; stable rank of Σ_H as Σλ²/λ₁² (the code's convention);
4. CKA from N×N Gram matrices K = HHᵀ, L = YYᵀ, double-centred, HSIC(K,L)/√(HSIC(K,K)·HSIC(L,L)) with
   eps 1e-12 (``compute_cka_core``). **Here on the full H**: the paper's code keeps only the first t
   columns (``H1 = H1[:, :H2.shape[1]]``, a bug); ``--paper-cka-bug`` reproduces that as well;
5. NRC3 = mean of svdvals(V_H[:t] V_W[:t]ᵀ), V_W the right singular vectors of W;
6. NRC4 = MSELoss(H P, Y_c) with P = pinv(H, rtol=1e-3) Y_c — H *uncentred*, Y centred, no intercept,
   exactly as the code. Because that is not nrc-audit's definition (centred H with an intercept), the
   same pinv formula is also evaluated on the centred H_c (``nrc4_centred``), which *is* nrc-audit's nrc4.

Two deliberate, documented departures, both of which only make the baseline *faster* or *more exact*:

* **Precision.** The forward pass runs in the model's float32, as in the paper, but H and Y are then cast
  to float64 for every metric (``dtype=torch.float32`` gives the paper's precision). In float32 the N×N
  HSIC sums and the SVD of Σ_H are not accurate to the 1e-6 the comparison asks for.
* **Centring.** The paper centres with an explicit N×N matrix, ``centering @ K @ centering``: two N³
  matmuls per Gram plus three more for the HSIC traces (``trace(Kc @ Lc)`` forms the product). That is
  reproduced by ``centring="matmul"``. The default ``centring="subtract"`` computes the same Kc by
  subtracting row, column and grand means (O(N²)) and tr(Kc Lc) as Σ Kc∘Lc (Kc, Lc symmetric): identical
  values, and still the paper's memory footprint (the N×N matrices K, L, Kc, Lc), but O(N² h) time
  instead of O(N³); timings with it are a *lower bound* on the paper script's time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

EPS = 1e-12  # compute_cka_core's eps


@dataclass
class PaperLayer:
    name: str
    nrc1: float
    stable_rank_cov: float
    cka_full: float
    cka_first_t: float | None
    nrc3: float
    stable_rank_w: float
    nrc4_paper: float  # uncentred H, as the code
    nrc4_centred: float  # the same pinv formula on centred H (nrc-audit's definition)


@dataclass
class PaperResult:
    layers: list[PaperLayer] = field(default_factory=list)
    target_stable_rank: float = 0.0


def collect_inputs(model: nn.Module, module: nn.Module, loader, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over the whole loader with a hook on ``module``; returns (H (N, h), Y (N, t))."""
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda mod, inp, out: store.__setitem__("h", inp[0].detach()))
    all_h, all_y = [], []
    try:
        with torch.no_grad():
            for inputs, labels in loader:
                model(inputs)
                all_h.append(store["h"].clone())  # the paper clones every batch
                all_y.append(labels)
                store.clear()
    finally:
        handle.remove()
    return torch.cat(all_h, dim=0).to(dtype), torch.cat(all_y, dim=0).to(dtype)


def compute_cka_core(h1: torch.Tensor, h2: torch.Tensor, centring: str = "subtract", first_t: bool = False) -> float:
    """Linear CKA through N×N Gram matrices, double-centred (the paper's ``compute_cka_core``).

    Args:
        h1: (N, D1) features; h2: (N, D2) targets.
        centring: "matmul" (the paper's J K J with J = I − 11ᵀ/N, O(N³)) or "subtract" (same values, O(N²)).
        first_t: keep only the first D2 columns of h1, as the paper's code does (its bug).
    """
    n = h1.shape[0]
    if first_t:
        h1 = h1[:, : h2.shape[1]]
    k = h1 @ h1.T  # (N, N)
    l = h2 @ h2.T  # (N, N)
    if centring == "matmul":
        centering = torch.eye(n, dtype=h1.dtype) - torch.ones(n, n, dtype=h1.dtype) / n
        kc = centering @ k @ centering
        lc = centering @ l @ centering  # K, L and the centring matrix stay alive, as in the paper
        hsic_kl = torch.trace(kc @ lc)
        hsic_kk = torch.trace(kc @ kc)
        hsic_ll = torch.trace(lc @ lc)
    else:
        kc = _double_centre_(k)
        lc = _double_centre_(l)
        kv, lv = kc.reshape(-1), lc.reshape(-1)
        hsic_kl = torch.dot(kv, lv)  # = tr(Kc Lc) for symmetric Kc, Lc, without forming the product
        hsic_kk = torch.dot(kv, kv)
        hsic_ll = torch.dot(lv, lv)
    denom = torch.sqrt(hsic_kk * hsic_ll + EPS)
    if denom <= EPS:
        return 0.0
    return float(hsic_kl / denom)


def _double_centre_(k: torch.Tensor) -> torch.Tensor:
    """J K J in place, for symmetric K: subtract row and column means, add back the grand mean."""
    row = k.mean(dim=1, keepdim=True)  # (N, 1); column means are the same for symmetric K
    grand = row.mean()
    k -= row
    k -= row.T
    k += grand
    return k


def measure_layer(model: nn.Module, module: nn.Module, name: str, loader, t: int, dtype: torch.dtype,
                  centring: str, paper_cka_bug: bool) -> PaperLayer:  # fmt: skip
    """``compute_nrc_mlp`` for one layer (all four NRC metrics and the stable ranks)."""
    h, y = collect_inputs(model, module, loader, dtype)
    n = h.shape[0]
    h_center = h - h.mean(dim=0)
    y_center = y - y.mean(dim=0)

    sh = (h_center.T @ h_center) / n
    _, s_h, v_h = torch.linalg.svd(sh, full_matrices=False)
    nrc1 = abs(1.0 - float(torch.trace(v_h[:t] @ (sh @ v_h[:t].T)) / torch.trace(sh).item()))
    stable_rank_cov = float(s_h.norm() ** 2 / s_h[0] ** 2)

    cka_full = compute_cka_core(h.clone(), y.clone(), centring)
    cka_first_t = compute_cka_core(h.clone(), y.clone(), centring, first_t=True) if paper_cka_bug else None

    w = module.weight.detach().to(dtype)
    _, s_w, v_w = torch.linalg.svd(w, full_matrices=False)
    nrc3 = float(torch.linalg.svdvals(v_h[:t] @ v_w[:t].T).mean())
    stable_rank_w = float(s_w.norm() ** 2 / s_w[0] ** 2)

    mse = nn.MSELoss()
    p = torch.linalg.pinv(h, rtol=1e-3) @ y_center
    nrc4_paper = float(mse(h @ p, y_center))
    del p
    p_c = torch.linalg.pinv(h_center, rtol=1e-3) @ y_center
    nrc4_centred = float(mse(h_center @ p_c, y_center))
    return PaperLayer(name, nrc1, stable_rank_cov, cka_full, cka_first_t, nrc3, stable_rank_w, nrc4_paper,
                      nrc4_centred)  # fmt: skip


def run_measurements(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                     dtype: torch.dtype = torch.float64, centring: str = "subtract",
                     paper_cka_bug: bool = False) -> PaperResult:  # fmt: skip
    """Every Linear layer of ``model``, one forward pass each, on (x (N, d), y (N, t)) in fixed order.

    The paper's loader shuffles and drops the last incomplete batch; here the order is fixed and every
    row is used, so that the result is comparable row for row with nrc-audit's.
    """
    model = model.eval()  # the forward pass stays in the model's dtype (float32), as in the paper
    loader = [(x[a : a + batch_size], y[a : a + batch_size]) for a in range(0, len(x), batch_size)]
    t = y.shape[1]
    result = PaperResult()
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in linears:
        result.layers.append(measure_layer(model, mod, name, loader, t, dtype, centring, paper_cka_bug))
    y64 = y.to(dtype)
    y_center = y64 - y64.mean(dim=0)
    s_y = torch.linalg.svdvals(y_center.T @ y_center / len(y64))
    result.target_stable_rank = float(s_y.norm() ** 2 / s_y[0] ** 2)
    return result
