"""Outputs a run cannot turn against the user (docs/reliability.md, "Outputs: all or nothing"):

- the partial store is created fresh beside the store, never through a planted symlink, under a lock file
  that is never followed either; a folder in its place is refused;
- every output of a run is staged before any is put in place: a failure while writing one (full disk,
  read-only folder) exits 2 with every earlier output byte-identical, the feature store included;
- the store's space is planned at its worst case, compressed or not, so a full disk is an exit 2 before the
  pass and never an HDF5 crash;
- the default store name carries a hash of the model's path and never lands in a model folder.

Full disks and read-only folders are real: a 2 MiB tmpfs and a read-only bind mount (root only; the tests
skip where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import nrc_audit
from conftest import make_mlp, write_h5
from nrc_audit.cli.app import audit_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args):
    return CliRunner().invoke(audit_app, [str(a) for a in args] + ["--no-progress", "--require-collapsed", "0"])


def flat(text: str) -> str:
    return " ".join(text.split())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@contextlib.contextmanager
def mounted(target: Path, *options: str, source: str = "tmpfs"):
    """``mount`` (root only) for the duration; skips the test where mounting is not permitted."""
    target.mkdir(exist_ok=True)
    cmd = ["mount", *(["-t", "tmpfs"] if source == "tmpfs" else ["--bind"]), *options, source, str(target)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def linear_case(tmp_path: Path) -> dict:
    """One Linear layer on incompressible data: the store is mostly X itself, which gzip barely shrinks."""
    ckpt = nrc_audit.save_checkpoint(make_mlp([12, 3], seed=1), tmp_path / "lin.safetensors",
                                     arch={"family": "mlp", "activation": "relu"})  # fmt: skip
    rng = np.random.default_rng(0)
    n = 40_000  # 1.92 MB of features: under 2 MiB, but the outputs and targets take the store past it
    x, y = rng.uniform(-1, 1, (n, 12)).astype(np.float32), rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    return {"ckpt": ckpt, "data": write_h5(tmp_path / "d.h5", X=x, Y=y)}


def test_symlinked_partial_and_lock_pointing_at_inputs_are_never_written_through(mlp_case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ckpt_bytes, data_bytes = mlp_case["ckpt"].read_bytes(), mlp_case["data"].read_bytes()
    (out / ".f.h5.partial").symlink_to(mlp_case["ckpt"])  # planted, or left by a run of an older version
    (out / ".f.h5.lock").symlink_to(mlp_case["data"])
    result = run(mlp_case["ckpt"], mlp_case["data"], "--features", out / "f.h5")
    assert result.exit_code == 0, result.stderr
    assert mlp_case["ckpt"].read_bytes() == ckpt_bytes and mlp_case["data"].read_bytes() == data_bytes
    with h5py.File(out / "f.h5") as fh:
        assert bool(fh.attrs["complete"]) is True
    assert sorted(p.name for p in out.iterdir()) == ["f.h5"]  # the links are gone, no lock file stays


def test_symlink_planted_between_the_lock_and_the_creation_is_refused_not_followed(mlp_case, tmp_path, monkeypatch):
    from nrc_audit.io import store_lock

    out = tmp_path / "out"
    out.mkdir()
    ckpt_bytes = mlp_case["ckpt"].read_bytes()
    cleared = store_lock._clear_partial

    def clear_then_plant(partial: Path, shown: Path) -> None:  # the race: a link appears right after the check
        cleared(partial, shown)
        partial.symlink_to(mlp_case["ckpt"])

    monkeypatch.setattr(store_lock, "_clear_partial", clear_then_plant)
    result = run(mlp_case["ckpt"], mlp_case["data"], "--features", out / "f.h5")
    assert result.exit_code == 2, result.stderr
    assert mlp_case["ckpt"].read_bytes() == ckpt_bytes
    assert not (out / "f.h5").exists() and not (out / ".f.h5.lock").exists()


def test_stale_partial_of_a_dead_run_is_replaced_and_a_folder_there_is_refused(mlp_case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".f.h5.partial").write_bytes(b"half a store")  # its run was SIGKILLed: nobody holds the lock
    (out / ".f.h5.lock").write_bytes(b"")
    assert run(mlp_case["ckpt"], mlp_case["data"], "--features", out / "f.h5").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["f.h5"]
    (out / ".g.h5.partial").mkdir()
    refused = run(mlp_case["ckpt"], mlp_case["data"], "--features", out / "g.h5")
    assert refused.exit_code == 2 and "a folder" in flat(refused.stderr)
    assert not (out / "g.h5").exists() and not (out / ".g.h5.lock").exists()


def test_failing_output_leaves_every_earlier_output_byte_identical(mlp_case, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    paths = {"--json": out / "r.json", "--markdown": out / "r.md", "--junit-xml": out / "r.xml",
             "--model-index": out / "mi.yaml", "--model-card": out / "README.md", "--features": out / "f.h5"}
    args = [mlp_case["ckpt"], mlp_case["data"], "--dataset-id", "me/data"]
    args += [a for option, path in paths.items() for a in (option, path)]
    assert run(*args).exit_code == 0
    before = snapshot(out)
    from nrc_audit.outputs import ci

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ci, "junit_xml", disk_full)  # written after the JSON, markdown, index and card
    y = mlp_case["y"] * 2.0  # a different audit: every output would change
    data = write_h5(tmp_path / "other.h5", X=mlp_case["x"], Y=y)
    failed = run(*[data if a == mlp_case["data"] else a for a in args])
    assert failed.exit_code == 2, failed.stderr
    assert snapshot(out) == before  # no new report beside the exit 2, the store included; no temporary file


def test_markdown_on_a_full_disk_keeps_the_report_and_store(mlp_case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with mounted(tmp_path / "full", "-o", "size=2m") as full:
        args = [mlp_case["ckpt"], mlp_case["data"], "--json", out / "r.json", "--features", out / "f.h5",
                "--markdown", full / "r.md"]  # fmt: skip
        assert run(*args).exit_code == 0
        before, md = snapshot(out), (full / "r.md").read_bytes()
        with open(full / "filler", "wb", buffering=0) as fh:  # fill the disk up to the last byte
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        y = mlp_case["y"] * 2.0
        failed = run(*[write_h5(tmp_path / "o.h5", X=mlp_case["x"], Y=y) if a == mlp_case["data"] else a
                       for a in args])  # fmt: skip
        assert failed.exit_code == 2, failed.stderr
        assert "No space left" in flat(failed.stderr) and "Traceback" not in failed.stderr
        assert snapshot(out) == before and (full / "r.md").read_bytes() == md
        assert sorted(p.name for p in full.iterdir()) == ["filler", "r.md"]


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"], ids=["plain", "gzip", "lzf"])
def test_store_on_a_full_tmpfs_exits_2_before_the_pass_compressed_or_not(linear_case, tmp_path, compression):
    with mounted(tmp_path / "small", "-o", "size=2m") as small:
        earlier = small / "f.h5"
        earlier.write_bytes(b"an earlier store")
        args = [linear_case["ckpt"], linear_case["data"], "--features", earlier]
        args += ["--features-compression", compression] if compression else []
        # a subprocess: before, HDF5 crashed the whole process (SIGSEGV, exit 139) with a compressed store
        done = subprocess.run([sys.executable, "-m", "nrc_audit", *map(str, args), "--no-progress",
                               "--require-collapsed", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "the store needs up to" in flat(done.stderr) and "compressed stores are planned" in flat(done.stderr)
        assert earlier.read_bytes() == b"an earlier store"
        assert sorted(p.name for p in small.iterdir()) == ["f.h5"]


def test_read_only_output_folder_exits_2_before_the_pass(mlp_case, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "r.json").write_text("earlier")
    with mounted(tmp_path / "ro", "-o", "ro", source=str(src)) as ro:
        for option in ("--plot", "--json", "--markdown", "--model-card"):
            result = run(mlp_case["ckpt"], mlp_case["data"], "--no-features", option, ro / "r.json")
            assert result.exit_code == 2, (option, result.stderr)
            assert "is not writable" in flat(result.stderr), result.stderr
        assert (src / "r.json").read_text() == "earlier" and sorted(p.name for p in src.iterdir()) == ["r.json"]


def test_read_only_working_folder_hints_at_features_path_or_no_features(mlp_case, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    with mounted(tmp_path / "ro", "-o", "ro", source=str(src)) as ro:
        monkeypatch.chdir(ro)
        result = run(mlp_case["ckpt"], mlp_case["data"])
        assert result.exit_code == 2
        assert "--features PATH" in flat(result.stderr) and "--no-features" in flat(result.stderr)
        assert run(mlp_case["ckpt"], mlp_case["data"], "--no-features").exit_code == 0


def test_default_store_names_differ_per_model_and_stay_out_of_model_folders(mlp_case, tmp_path, monkeypatch):
    from nrc_audit.io.store_lock import default_store_path

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(mlp_case["ckpt"].read_bytes())
    monkeypatch.chdir(tmp_path)
    one, two = default_store_path(a / "model.safetensors"), default_store_path(b / "model.safetensors")
    assert one != two and one.name.startswith("model-") and one.parent == Path(".")
    assert default_store_path(Path("a/model.safetensors")) == one  # the same model, however it is named
    monkeypatch.chdir(a)
    inside = default_store_path(Path("."))  # `nrc-audit . data.h5` in a model folder
    assert inside.parent == tmp_path and inside.name.startswith("a-")  # beside the model folder, not in it


def test_auditing_a_model_folder_from_inside_keeps_its_hash(tmp_path, monkeypatch):
    from conftest import make_xy

    folder = tmp_path / "saved"
    folder.mkdir()
    nrc_audit.save_checkpoint(make_mlp([12, 16, 3], seed=1), folder / "model.safetensors",
                              arch={"family": "mlp", "activation": "relu"})  # fmt: skip
    x, y = make_xy(200, 12, 3)
    data = write_h5(tmp_path / "data.h5", X=x, Y=y)
    monkeypatch.chdir(folder)
    shas = []
    for _ in range(2):
        result = run(".", data, "--format", "json")
        assert result.exit_code == 0, result.stderr
        shas.append(json.loads(result.stdout)["model"]["sha256"])
    assert shas[0] == shas[1] and sorted(os.listdir(folder)) == ["model.safetensors"]
    assert len(list(tmp_path.glob("saved-*.features.h5"))) == 1
