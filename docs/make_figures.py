"""Regenerate the README's figures from the shipped samples: ``python docs/make_figures.py`` (repository root).

Writes docs/img/audit_mlp_wd.png, docs/img/audit_mlp_nowd.png (one model each, the ``--plot`` figure) and
docs/img/trend_mlp_wd.png (``nrc-audit trend``) through the CLI, exactly as a user would; CPU, about 10 s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, IMG = ROOT / "sample_checkpoints", ROOT / "docs" / "img"


def cli(*args: object) -> None:
    cmd = [sys.executable, "-m", "nrc_audit", *map(str, args)]
    code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
    if code not in (0, 1):  # 1: the gate failed, which the no-weight-decay figure shows on purpose
        raise SystemExit(f"{' '.join(cmd)} exited {code}")


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    data = SAMPLES / "data.h5"
    for name in ("mlp_wd", "mlp_nowd"):
        cli(SAMPLES / f"{name}.safetensors", data, "--no-features", "-q", "--plot", IMG / f"audit_{name}.png")
    trend = sorted((SAMPLES / "trend").glob("mlp_wd_epoch*.safetensors"))  # trend orders them by their stored epoch
    cli("trend", *trend, SAMPLES / "mlp_wd.safetensors", "--data", data, "-q", "--plot", IMG / "trend_mlp_wd.png")
    for png in sorted(IMG.glob("*.png")):
        print(png.relative_to(ROOT))


if __name__ == "__main__":
    main()
