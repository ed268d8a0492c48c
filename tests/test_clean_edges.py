"""Small files that would allocate gigabytes, documents read without a cap, and names that would inject escape
codes or markup: each is refused or neutralised with a clear message (docs/reliability.md, "Clean edges")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from nrc_audit.cli.app import audit_app
from nrc_audit.cli.commands import reanalyze_app, validate_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flat(text: str) -> str:
    return " ".join(text.split())


def run(*args, app=audit_app, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


class _Bomb:
    def __reduce__(self):
        return (bytearray, (2_000_000_000,))  # allowed by weights_only: 2 GB from a few bytes of pickle


def test_bytearray_bomb_in_a_small_pt_is_refused_before_it_allocates(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save({"0.weight": torch.zeros(3, 4), "extra": _Bomb()}, path)
    assert path.stat().st_size < 4000
    probe = (
        "import sys, torch\n"
        "from nrc_audit.io.checkpoint import load_checkpoint\n"
        "from nrc_audit.errors import CheckpointError\n"
        "def hwm():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024\n"
        "before = hwm()\n"
        "try:\n"
        "    load_checkpoint(sys.argv[1]); print('LOADED')\n"
        "except CheckpointError as e:\n"
        "    print(str(e).replace(chr(10), ' '))\n"
        "print('GROWTH_MB', hwm() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert "refused to load" in out and "builtins.bytearray" in out, out + done.stderr
    assert int(out.split("GROWTH_MB")[1]) < 200, out  # the 2 GB were never allocated


def test_storages_declared_beyond_the_memory_budget_are_refused_from_the_pickle(tmp_path):
    from nrc_audit.errors import CheckpointError
    from nrc_audit.io.pickle_scan import check_pt_pickle

    path = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(64, 64).state_dict(), path)
    os.environ["NRC_AUDIT_MAX_MEMORY"] = "1K"
    try:
        with pytest.raises(CheckpointError, match="declares tensor storages"):
            check_pt_pickle(path)
    finally:
        del os.environ["NRC_AUDIT_MAX_MEMORY"]
    check_pt_pickle(path)  # a plain state dict within the budget passes


@pytest.mark.parametrize("which", ["validate", "baseline"])
def test_endless_documents_are_read_with_a_cap(mlp_case, which):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    if which == "validate":
        result = run("/dev/zero", app=validate_app)
    else:
        result = run(mlp_case["ckpt"], mlp_case["data"], "--no-features", "--baseline", "/dev/zero")
    assert result.exit_code == 2, result.stderr
    assert "larger than 64 MiB" in flat(result.stderr)


def _address_space_cap() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))  # 1.5 GB: an uncapped read dies of MemoryError


@pytest.mark.parametrize("which", ["dev-zero", "sparse-8G"])
def test_trend_history_is_read_with_a_cap_in_bounded_memory(tmp_path, which):
    """``trend --history`` reads like validate and --baseline: the 64 MiB cap, not the whole file, under 1.5 GB."""
    if which == "dev-zero":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero")
        history = Path("/dev/zero")
    else:
        history = tmp_path / "history.jsonl"
        with open(history, "wb") as fh:
            fh.truncate(8 << 30)  # sparse: 8 GB of zeros that take no disk space
    done = subprocess.run([sys.executable, "-m", "nrc_audit", "trend", "--history", str(history)], capture_output=True,
                          text=True, timeout=300, preexec_fn=_address_space_cap)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"the history file {history} is larger than 64 MiB" in flat(done.stderr), done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-inf"])
def test_thresholds_no_report_can_hold_are_refused(mlp_case, value):
    result = run(mlp_case["ckpt"], mlp_case["data"], "--no-features", "--nrc4-ratio-max", value)
    assert result.exit_code == 2 and "nrc4_ratio_max" in result.stderr


def test_reanalyze_needs_complete_to_be_a_real_true(mlp_case, tmp_path):
    store = tmp_path / "f.h5"
    assert run(mlp_case["ckpt"], mlp_case["data"], "--features", store, "-q").exit_code in (0, 1)
    with h5py.File(store, "r+") as fh:
        fh.attrs["complete"] = "false"  # a non-empty string: truthy for bool()
    result = run(store, app=reanalyze_app)
    assert result.exit_code == 2 and "incomplete" in result.stderr


@pytest.mark.parametrize(("env", "named"), [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2", "RANK": "zero"}, "RANK"), ({"RANK": "-1"}, "RANK"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "NRC_AUDIT_DIST_TIMEOUT": "soon"},
     "NRC_AUDIT_DIST_TIMEOUT"),
    ({"NRC_AUDIT_MAX_MEMORY": "lots"}, "NRC_AUDIT_MAX_MEMORY"), ({"NRC_AUDIT_THREADS": "many"}, "NRC_AUDIT_THREADS"),
], ids=["world-size", "rank", "negative-rank", "timeout", "max-memory", "threads"])  # fmt: skip
def test_junk_environment_variables_get_a_message_not_an_internal_error(mlp_case, env, named):
    result = run(mlp_case["ckpt"], mlp_case["data"], "--no-features", env=env)
    assert result.exit_code == 2, result.stderr
    assert "internal error" not in result.stderr and named in result.stderr, result.stderr


def test_deeply_nested_model_kwargs_get_a_message(mlp_case):
    result = run(mlp_case["ckpt"], mlp_case["data"], "--no-features", "--model-kwargs", "[" * 100_000)
    assert result.exit_code == 2 and "internal error" not in result.stderr
    assert "--model-kwargs" in result.stderr


NAMES_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.names = names
        for name, (a, b) in zip(names, [(12, 16), (16, 3)]):
            self.add_module(name, nn.Linear(a, b))

    def forward(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
            x = torch.relu(x) if name != self.names[-1] else x
        return x


def build():
    return Net(["\\x1b[2J\\x1b[31mred", "<img src=x onerror=alert(1)>`|" + "n" * 1_000_000])
'''


def test_escape_codes_markup_and_huge_names_are_neutralised(tmp_path):
    from conftest import make_xy, write_h5
    import nrc_audit

    src = tmp_path / "names.py"
    src.write_text(NAMES_SOURCE)
    ns: dict = {}
    exec(compile(NAMES_SOURCE, str(src), "exec"), ns)
    ckpt = nrc_audit.save_checkpoint(ns["build"](), tmp_path / "n.safetensors")
    x, y = make_xy(100, 12, 3)
    data = write_h5(tmp_path / "d.h5", X=x, Y=y)
    md = tmp_path / "r.md"
    result = run(ckpt, data, "--model-def", f"{src}:build", "--no-features", "--markdown", md, "--json",
                 tmp_path / "r.json", "--require-collapsed", "0")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b[2J" in result.stdout  # shown, not executed
    assert "… (1000030" in result.stdout and len(result.stdout) < 100_000  # the note may wrap in the name column
    text = md.read_text()
    assert "\x1b" not in text and "`<img src=x onerror=alert(1)>'\\|" in text  # inside a code span, row intact
    assert len(text) < 100_000
    names = [layer["name"] for layer in json.loads((tmp_path / "r.json").read_text())["layers"]]
    assert names[0] == "\x1b[2J\x1b[31mred" and len(names[1]) == 1_000_030  # the JSON keeps the exact names


def test_non_utf8_file_names_get_a_message(mlp_case, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/m\xff.safetensors"))
    odd.write_bytes(mlp_case["ckpt"].read_bytes())
    result = run(odd, mlp_case["data"], "--no-features")
    assert result.exit_code == 2 and "internal error" not in result.stderr
    assert "not valid UTF-8" in flat(result.stderr) and "m\\xff.safetensors" in flat(result.stderr)


def test_error_messages_cut_a_1_mb_tensor_name_and_escape_control_characters(mlp_case, tmp_path):
    """A state dict nothing recognises is named in the error key by key: a 1 MB key is cut (its length noted),
    an escape code in a key is shown as text, the rest of the message stays whole."""
    from safetensors.torch import save_file

    huge, escape = "a" * (1 << 20), "\x1b[2J\x1b[31mred.weight"
    ckpt = tmp_path / "odd.safetensors"
    save_file({huge: torch.zeros(3, 4), escape: torch.zeros(2, 3)}, str(ckpt))
    result = run(ckpt, mlp_case["data"], "--no-features")
    assert result.exit_code == 2 and "internal error" not in result.stderr
    assert len(result.stderr) < 5000, len(result.stderr)  # was 1,048,874 characters
    message = flat(result.stderr)
    cut = re.search(r"a… \((\d+) characters\)", message)  # the key and the ")" after it: one word
    assert cut and int(cut.group(1)) >= 1 << 20 and "\\x1b[2J\\x1b[31mred.weight" in message
    assert "\x1b" not in result.stderr and "matches no known architecture" in message and "--model-def" in message
