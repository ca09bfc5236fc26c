"""The command line: ls, inspect, diff, verify, errors, ``python -m jaxckpt`` and the notebook."""

import glob
import io
import json
import os
import re
import subprocess
import sys

import jax
import nbformat
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from nbclient import NotebookClient

import jaxckpt as jc
from jaxckpt.format import checksum as _checksum
from jaxckpt.tools import scan as _scan
from jaxckpt.tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def seed_tree(step=10, scale=1.0):
    """The seed guide's state: a Dense(5) on 1 input, Adam slots, a step and an iterator."""
    kernel = (np.arange(5, dtype=np.float32).reshape(1, 5) * scale).astype(np.float32)
    bias = np.full(5, 0.5, np.float32)
    params = {"l1": {"kernel": kernel, "bias": bias}}

    def slots():
        return {"l1": {"kernel": np.zeros((1, 5), np.float32), "bias": np.zeros(5, np.float32)}}

    adam = {"count": np.int32(step), "mu": slots(), "nu": slots()}
    return {"params": params, "opt_state": (adam, {}), "step": step, "iterator": {"pos": step % 7}}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _disk(path):
    return sum(
        os.path.getsize(f) for f in glob.glob(f"{path}/**", recursive=True) if os.path.isfile(f)
    )


# ---------------------------------------------------------------------------- ls


def test_ls_lists_steps_sizes_times_metrics_and_debris(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with jc.CheckpointManager(run_dir, max_to_keep=3) as mngr:
        for step in (10, 20, 30, 40):
            mngr.save(step, seed_tree(step), metrics={"loss": 1.0 / step})
    # Metrics the checkpoint's own metadata lacks come from the manager's index.
    jc.save(run_dir / "ckpt-50", seed_tree(50), step=50)
    index = json.loads((run_dir / "checkpoint").read_text())
    del index["crc32c"]
    index["checkpoints"].append(
        {"step": 50, "path": "ckpt-50", "time": 0.0, "metrics": {"loss": 0.25}}
    )
    (run_dir / "checkpoint").write_bytes(_checksum.seal(json.dumps(index).encode()))
    os.makedirs(run_dir / "ckpt-60.jaxckpt-tmp-0123abcd")  # debris of saves that never committed
    os.makedirs(run_dir / "ckpt-70")
    code, out, _ = run(capsys, "ls", str(run_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "NAME", "SIZE", "SHARED", "OWN", "SAVED", "METRICS"]
    rows = [line.split() for line in lines[1:5]]
    assert [r[:2] for r in rows] == [
        ["20", "ckpt-20"],
        ["30", "ckpt-30"],
        ["40", "ckpt-40"],
        ["50", "ckpt-50"],
    ]
    assert [r[-1] for r in rows] == ["loss=0.05", "loss=0.0333333", "loss=0.025", "loss=0.25"]
    assert [" ".join(r[2:4]) for r in rows] == [
        _scan.human_bytes(_disk(run_dir / f"ckpt-{s}")) for s in (20, 30, 40, 50)
    ]
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\d", r[8]) and re.fullmatch(r"\d\d:\d\d:\d\d", r[9])
        for r in rows
    )
    # Files hard-linked into several checkpoints (incremental saves) count once.
    inodes = {
        os.stat(f).st_ino: os.path.getsize(f)
        for s in (20, 30, 40, 50)
        for f in glob.glob(f"{run_dir}/ckpt-{s}/**", recursive=True)
        if os.path.isfile(f)
    }
    total = sum(inodes.values())
    assert lines[5] == f"4 checkpoints, {_scan.human_bytes(total)} on disk"
    assert lines[6] == "2 unfinished save(s) ignored: ckpt-60.jaxckpt-tmp-0123abcd, ckpt-70"


def test_ls_errors_name_the_fix(tmp_path, capsys):
    code, out, err = run(capsys, "ls", str(tmp_path / "nope"))
    assert code == 2 and out == ""
    assert (
        err
        == f"jaxckpt ls: error: No directory {tmp_path / 'nope'}. Fix: give the directory a CheckpointManager writes to.\n"
    )
    ckpt = jc.save(tmp_path / "ckpt-1", seed_tree())
    code, _, err = run(capsys, "ls", ckpt)
    assert code == 2
    assert (
        f"{ckpt} is one checkpoint, not a manager's directory. Fix: `jaxckpt inspect {ckpt}`" in err
    )
    (tmp_path / "checkpoint").write_text("{not json")  # a damaged index is ignored
    code, out, _ = run(capsys, "ls", str(tmp_path))
    assert code == 0 and out.splitlines()[1].split()[:2] == [
        "1",
        "ckpt-1",
    ]  # the step from the name
    os.makedirs(tmp_path / "empty")
    code, out, _ = run(capsys, "ls", str(tmp_path / "empty"))
    assert code == 0 and out == f"No committed checkpoints in {tmp_path / 'empty'}.\n"


# ---------------------------------------------------------------------------- inspect


def test_inspect_prints_the_list_variables_table(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt-10", seed_tree(), step=10, metrics={"loss": 2.5})
    code, out, _ = run(capsys, "inspect", ckpt)
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(re.escape(ckpt) + r"  step 10  saved \S+ \S+  loss=2\.5", lines[0])
    table = [line.split() for line in lines[1:-1]]
    assert table == [
        ["PATH", "SHAPE", "DTYPE", "SIZE"],
        ["iterator/pos", "()", "int", "-"],
        ["opt_state/0/count", "()", "int32", "4", "B"],
        ["opt_state/0/mu/l1/bias", "(5,)", "float32", "20", "B"],
        ["opt_state/0/mu/l1/kernel", "(1,", "5)", "float32", "20", "B"],
        ["opt_state/0/nu/l1/bias", "(5,)", "float32", "20", "B"],
        ["opt_state/0/nu/l1/kernel", "(1,", "5)", "float32", "20", "B"],
        ["params/l1/bias", "(5,)", "float32", "20", "B"],
        ["params/l1/kernel", "(1,", "5)", "float32", "20", "B"],
        ["step", "()", "int", "-"],
    ]
    assert [r[0] for r in table[1:]] == [p for p, _, _ in jc.list_variables(ckpt)]
    assert lines[-1] == "9 leaves, 124 B of array data"
    code, out, _ = run(capsys, "inspect", ckpt, "params")
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == [
        "params/l1/bias",
        "params/l1/kernel",
    ]
    assert out.splitlines()[-1] == "2 leaves, 40 B of array data"


def test_inspect_errors_name_the_fix(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for step in (1, 2):
        jc.save(run_dir / f"ckpt-{step}", seed_tree(step))
    code, _, err = run(capsys, "inspect", str(run_dir))
    assert code == 2
    assert err == (
        f"jaxckpt inspect: error: {run_dir} is a directory of 2 checkpoints, not one checkpoint. "
        f"Fix: name one of them, e.g. {run_dir}/ckpt-2 (the newest); `jaxckpt ls {run_dir}` lists them.\n"
    )
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 2 and f"No checkpoint at {tmp_path / 'missing'}. Fix: check the path" in err
    code, _, err = run(capsys, "inspect", str(run_dir / "ckpt-1"), "params/l9")
    assert code == 2
    assert f"No leaf of {run_dir / 'ckpt-1'} is under 'params/l9'. Fix: run `jaxckpt inspect" in err


# ---------------------------------------------------------------------------- diff


def test_diff_identical_checkpoints_exit_0(tmp_path, capsys):
    a = jc.save(tmp_path / "a", seed_tree())
    b = jc.save(tmp_path / "b", seed_tree())
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(f"--- A: {re.escape(a)}  saved \\S+ \\S+", lines[0])
    assert re.fullmatch(f"\\+\\+\\+ B: {re.escape(b)}  saved \\S+ \\S+", lines[1])
    assert lines[2:] == ["A and B hold the same 9 leaves with equal values."]


def test_diff_reports_every_kind_of_difference(tmp_path, capsys):
    ta, tb = seed_tree(10), seed_tree(20, scale=1.5)  # kernel: 4 of 5 values differ, max 2.0
    ta["params"]["old"] = np.ones(2, np.float32)
    tb["params"]["new"] = np.ones((2, 3), np.int8)
    ta["params"]["l1"]["bias"] = np.array([0.5, np.nan, 1, 2, 3], np.float32)  # NaN == NaN
    tb["params"]["l1"]["bias"] = np.array([0.5, np.nan, 1, 2, 3], np.float32)
    tb["opt_state"][0]["mu"]["l1"]["bias"] = np.zeros(5, np.float16)  # dtype change
    tb["opt_state"][0]["nu"]["l1"]["kernel"] = np.zeros((5, 1), np.float32)  # shape change
    a = jc.save(tmp_path / "a", ta)
    b = jc.save(tmp_path / "b", tb)
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert out.splitlines()[2:] == [
        "- params/old  (2,) float32  only in A",
        "+ params/new  (2, 3) int8  only in B",
        "~ opt_state/0/mu/l1/bias  (5,) float32 -> (5,) float16",
        "~ opt_state/0/nu/l1/kernel  (1, 5) float32 -> (5, 1) float32",
        "! iterator/pos  int 3 -> int 6",
        "! opt_state/0/count  () int32  1 of 1 values differ, max abs diff 10",
        "! params/l1/kernel  (1, 5) float32  4 of 5 values differ, max abs diff 2",
        "! step  int 10 -> int 20",
        "A and B differ: 1 only in A, 1 only in B, 2 changed shape/dtype, 4 differ in value; 3 leaves equal.",
    ]
    code, out, _ = run(capsys, "diff", a, b, "--atol", "2")
    assert "params/l1/kernel" not in out and "! opt_state/0/count" in out


def test_diff_reads_large_arrays_in_blocks(tmp_path, capsys, monkeypatch):
    x = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    y = x.copy()
    y[3, 1] += 0.25
    y[998, 2] -= 7.0
    y[500] = np.nan
    rows = NamedSharding(Mesh(jax.devices()[:8], ("x",)), PartitionSpec("x"))  # chunks of 125 rows
    a = jc.save(tmp_path / "a", {"w": jax.device_put(x, rows), "b": np.ones(3, bool)})
    b = jc.save(tmp_path / "b", {"w": jax.device_put(y, rows), "b": np.array([True, False, True])})
    monkeypatch.setattr(_scan, "BLOCK_BYTES", 4000)  # 250 rows (two chunks) per block
    monkeypatch.setattr(_scan, "BATCH_BYTES", 8000)
    assert [r[1] for r in _scan._blocks("w", jc.open(a).records["w"])] == [
        (slice(i, i + 250),) for i in range(0, 1000, 250)
    ]
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert out.splitlines()[2:4] == [
        "! b  (3,) bool  1 of 3 values differ, max abs diff 1",
        "! w  (1000, 4) float32  6 of 4000 values differ, max abs diff nan",
    ]
    y[500] = x[500]
    jc.save(tmp_path / "c", {"w": jax.device_put(y, rows), "b": np.ones(3, bool)})
    code, out, _ = run(capsys, "diff", a, str(tmp_path / "c"))
    assert out.splitlines()[2] == "! w  (1000, 4) float32  2 of 4000 values differ, max abs diff 7"


@pytest.mark.parametrize(
    "dtype, a, b, expected",
    [
        ("bfloat16", [1.0, np.nan, 3.0], [1.0, np.nan, 2.5], (1, 0.5)),
        ("float8_e4m3fn", [1.0, 2.0, 4.0], [1.0, 2.0, -4.0], (1, 8.0)),
        ("float16", [np.nan, 1.0, np.inf], [1.0, 1.0, np.inf], (1, np.nan)),
        ("int4", [-8, 0, 7], [7, 0, 7], (1, 15.0)),
        ("int64", [2**62, 5, 0], [2**62 - 1, 5, 0], (1, 1.0)),
        ("uint8", [0, 255, 3], [255, 0, 3], (2, 255.0)),
        ("complex64", [1 + 1j, 2j], [1 + 1j, -2j], (1, 4.0)),
        ("bool", [True, False], [True, True], (1, 1.0)),
    ],
)
def test_compare_counts_differences_in_every_dtype(dtype, a, b, expected):
    x, y = np.array(a).astype(dtype), np.array(b).astype(dtype)
    n, m = _scan._compare(x, y)
    assert n == expected[0]
    np.testing.assert_equal(m, expected[1])
    assert _scan._compare(x, x.copy()) == (0, 0.0)


# ---------------------------------------------------------------------------- verify


def _chunks(ckpt, leaf):
    return sorted(
        f
        for f in glob.glob(os.path.join(ckpt, leaf, "c", "**"), recursive=True)
        if os.path.isfile(f)
    )


def test_verify_ok_shows_progress_on_stderr(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt", seed_tree())
    code, out, err = run(capsys, "verify", ckpt)
    assert code == 0
    assert out == f"OK: {ckpt}: 7 arrays, 124 B, every chunk's checksum verified.\n"
    assert err == f"verify: [{'#' * 30}] 100.0%  124 B of 124 B\n"
    code, out, err = run(capsys, "verify", "-q", ckpt)
    assert code == 0 and err == ""


def _flip_a_bit(path):
    data = bytearray(open(path, "rb").read())
    data[2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _own_paths(monkeypatch):
    """Every array leaf at its own zarr path (small leaves are otherwise packed together)."""
    monkeypatch.setattr(jc.checkpoint.plan, "PACK_BELOW", 0, raising=False)


def test_verify_reports_each_damaged_array(tmp_path, capsys, monkeypatch):
    _own_paths(monkeypatch)
    tree = seed_tree()
    rows = NamedSharding(Mesh(jax.devices()[:8], ("x",)), PartitionSpec("x"))
    tree["big"] = jax.device_put(np.arange(64 * 1024, dtype=np.float32).reshape(256, 256), rows)
    ckpt = jc.save(tmp_path / "ckpt", tree)
    assert len(_chunks(ckpt, "big")) == 8  # 32 rows (32 KiB) each
    _flip_a_bit(_chunks(ckpt, "params/l1/kernel")[0])
    _flip_a_bit(os.path.join(ckpt, "big", "c", "5", "0"))
    os.remove(os.path.join(ckpt, "opt_state/0/count/c"))  # the zero Adam slots have no chunks
    monkeypatch.setattr(_scan, "BLOCK_BYTES", 32 << 10)  # "big" is read in 8 blocks
    monkeypatch.setattr(_scan, "BATCH_BYTES", 64 << 10)  # two at a time
    code, out, err = run(capsys, "verify", ckpt)
    assert code == 1
    lines = out.splitlines()
    # Each line names the array and the damaged chunk file, whatever the storage layer's words.
    assert lines[0].startswith("DAMAGED big: ") and f"{ckpt}/big/c/5/0" in lines[0]
    assert re.search("Digest mismatch|crc32c", lines[0])
    assert lines[1].startswith("DAMAGED opt_state/0/count: ")
    assert f"{ckpt}/opt_state/0/count/c" in lines[1] and "is missing" in lines[1]
    assert (
        lines[2].startswith("DAMAGED params/l1/kernel: ")
        and f"{ckpt}/params/l1/kernel/c/0/0" in lines[2]
    )
    assert re.search("Digest mismatch|crc32c", lines[2])
    assert lines[3:] == [
        f"3 of 8 arrays in {ckpt} are damaged. Fix: restore an earlier checkpoint (`jaxckpt ls` "
        "lists them), or restore this one with the damaged leaves left at the target's own "
        "values:",
        "  damaged = {'big', 'opt_state/0/count', 'params/l1/kernel'}",
        f'  jc.restore({ckpt!r}, target, partial=True, missing="keep", rename=lambda p: '
        "None if p in damaged else p)",
    ]
    assert err.endswith("100.0%  256.1 KiB of 256.1 KiB\n")


def test_verify_checks_each_arrays_zarr_json(tmp_path, capsys, monkeypatch):
    _own_paths(monkeypatch)
    ckpt = jc.save(tmp_path / "ckpt", seed_tree())
    os.remove(os.path.join(ckpt, "params/l1/bias/zarr.json"))
    meta_path = os.path.join(ckpt, "params/l1/kernel/zarr.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "shape": [5, 1]}, open(meta_path, "w"))
    with open(os.path.join(ckpt, "opt_state/0/count/zarr.json"), "w") as f:
        f.write("{")
    code, out, _ = run(capsys, "verify", ckpt)
    assert code == 1
    fix = "Fix: restore an earlier checkpoint, or copy this checkpoint again in full."
    crc = "is damaged: it fails the crc32c checksum that COMMIT records for it."
    count, bias = f"{ckpt}/opt_state/0/count/zarr.json", f"{ckpt}/params/l1/bias/zarr.json"
    missing = f"is missing: the checkpoint's metadata is damaged. {fix}"
    assert out.splitlines() == [  # the files, then the arrays they describe
        f"DAMAGED {count} {crc} {fix}",
        f"DAMAGED {bias} {missing}",
        f"DAMAGED {meta_path} {crc} {fix}",
        f"DAMAGED opt_state/0/count: {count} {crc} {fix}",
        f"DAMAGED params/l1/bias: {bias} {missing}",
        f"DAMAGED params/l1/kernel: {meta_path} {crc} {fix}",
        f"3 files and 3 of 7 arrays in {ckpt} are damaged. Fix: restore an earlier checkpoint "
        "(`jaxckpt ls` lists them).",
    ]


def test_verify_finds_damage_wherever_the_leaves_are_stored(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt", seed_tree())  # small leaves may be packed: any layout
    arrays = sorted(
        p for p, shape, dtype in jc.list_variables(ckpt) if dtype not in ("int", "state")
    )
    nonzero = [p for p in arrays if jc.open(ckpt)[p].any()]  # all-zero chunks have no file
    assert len(nonzero) == 3
    files = glob.glob(f"{ckpt}/**", recursive=True)
    chunks = [
        f for f in files if os.path.isfile(f) and os.path.basename(f) not in ("zarr.json", "COMMIT")
    ]
    assert chunks
    for chunk in chunks:
        _flip_a_bit(chunk)
    code, out, _ = run(capsys, "verify", "-q", ckpt)
    assert code == 1
    assert [line.split(":")[0] for line in out.splitlines()[:-3]] == [
        f"DAMAGED {p}" for p in nonzero
    ]
    assert out.splitlines()[-3].startswith(f"3 of 7 arrays in {ckpt} are damaged.")


def test_verify_damaged_metadata_and_missing_path(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt", seed_tree())
    with open(os.path.join(ckpt, "zarr.json"), "w") as f:
        f.write("{not json")
    code, out, _ = run(capsys, "verify", ckpt)
    assert code == 1
    assert out.startswith(
        f"DAMAGED {ckpt}: {ckpt}/zarr.json is damaged: it fails the crc32c checksum that COMMIT "
        "records for it."
    )
    code, _, err = run(capsys, "verify", str(tmp_path / "nope"))
    assert code == 2 and err.startswith(
        f"jaxckpt verify: error: No checkpoint at {tmp_path / 'nope'}."
    )


def test_progress_redraws_on_a_terminal_and_prints_lines_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = _scan.Progress(tty, every=0)
    p.total = 4 << 20
    p.update(1 << 20)
    p.close(4 << 20)
    assert tty.getvalue() == (
        f"\rverify: [{'#' * 7:<30}]  25.0%  1.0 MiB of 4.0 MiB\rverify: [{'#' * 30}] 100.0%  4.0 MiB of 4.0 MiB\n"
    )
    log = io.StringIO()
    p = _scan.Progress(log, every=0)
    p.total = 2048
    p.update(1024)
    p.close(2048)
    assert log.getvalue().splitlines() == [
        f"verify: [{'#' * 15:<30}]  50.0%  1.0 KiB of 2.0 KiB",
        f"verify: [{'#' * 30}] 100.0%  2.0 KiB of 2.0 KiB",
    ]


# ---------------------------------------------------------------------------- the console script


def _python_m(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "jaxckpt", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_python_m_jaxckpt_runs_the_command_line(tmp_path):
    jc.save(tmp_path / "ckpt-10", seed_tree())
    p = _python_m("inspect", "ckpt-10", "params", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[2].split() == ["params/l1/bias", "(5,)", "float32", "20", "B"]


def test_usage_errors_exit_2(capsys):
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and out == ""
    assert (
        "invalid choice: 'frobnicate' (choose from 'ls', 'inspect', 'diff', 'verify', 'graph', 'convert')"
        in err
    )
    code, _, err = run(capsys, "diff", "only-one")
    assert code == 2 and "the following arguments are required: B" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0
    commands = [line.split()[0] for line in out.splitlines() if re.match(r"    \w", line)]
    assert commands == ["ls", "inspect", "diff", "verify", "graph", "convert"]
    assert "Exit status: 0 when all is well, 1 when diff finds differences" in out


def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )  # the kernel's

    nb = nbformat.read(os.path.join(ROOT, "colab", "inspect_and_convert.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "opt_state/0/mu/l1/kernel" in text
    assert "Converted the Flax msgpack file" in text
    assert "OK:" in text


# ---------------------------------------------------------------------------- docs/cli.md


def _normal(text, tmp_path):
    text = text.replace(str(tmp_path), "/work")
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<time>", text)
    return re.sub(r"\d+\.\d [KMG]iB", "<size>", text).strip()


def test_docs_cli_examples_print_what_the_page_shows(tmp_path, capsys, monkeypatch):
    """Every ``$ jaxckpt ...`` block of docs/cli.md that shows output prints that output."""
    import optax

    monkeypatch.chdir(tmp_path)
    params = {
        "l1": {
            "kernel": np.arange(5, dtype=np.float32).reshape(1, 5),
            "bias": np.zeros(5, np.float32),
        }
    }
    opt_state = optax.adam(0.1).init(params)
    for step, loss in ((30, 7.35), (40, 2.48), (50, 1.38)):
        state = {"params": params, "opt_state": opt_state, "step": step}
        jc.save(f"tf_ckpts/ckpt-{step}", state, step=step, metrics={"loss": loss})
        params = {"l1": {k: v + np.float32(0.5) for k, v in params["l1"].items()}}
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```\n(\$ jaxckpt .*?)```", f.read(), re.S)
    checked = 0
    for block in blocks:
        command, _, shown = block.partition("\n")
        if not shown.strip() or shown.startswith("$"):  # commands without their output
            continue
        main(command.split("#")[0].split()[2:])
        out, err = capsys.readouterr()
        assert _normal(out or err, tmp_path) == _normal(shown, tmp_path), (
            command
        )  # stdout, else the error
        checked += 1
    assert checked == 7


def test_ls_ignores_a_damaged_index(tmp_path, capsys):
    """A damaged index could name the wrong metrics for a checkpoint whose metadata has none."""
    run_dir = tmp_path / "run"
    with jc.CheckpointManager(run_dir) as mngr:
        mngr.save(10, seed_tree(10), metrics={"loss": 0.5})
    jc.save(run_dir / "ckpt-20", seed_tree(20), step=20)  # no metrics of its own
    index = json.loads((run_dir / "checkpoint").read_text())
    del index["crc32c"]
    index["checkpoints"].append(
        {"step": 20, "path": "ckpt-20", "time": 0.0, "metrics": {"loss": 0.25}}
    )
    sealed = _checksum.seal(json.dumps(index).encode())
    (run_dir / "checkpoint").write_bytes(sealed.replace(b"0.25", b"0.75"))
    code, out, _ = run(capsys, "ls", str(run_dir))
    assert code == 0
    assert [line.split()[-1] for line in out.splitlines()[1:3]] == ["loss=0.5", "-"]


def test_ls_and_the_manager_agree_on_which_names_are_steps(tmp_path, capsys):
    """ckpt-007 is no step's name for either (a manager names step 7 ckpt-7)."""
    run_dir = tmp_path / "run"
    with jc.CheckpointManager(run_dir) as mngr:
        mngr.save(7, seed_tree(7))
    jc.save(run_dir / "ckpt-007", seed_tree(8))  # a plain save with no step, not the manager's
    assert jc.CheckpointManager(run_dir).steps == [7]
    assert jc.latest_checkpoint(run_dir) == str(run_dir / "ckpt-7")
    code, out, _ = run(capsys, "ls", str(run_dir), "--json")
    rows = {c["name"]: c["step"] for c in json.loads(out)["checkpoints"]}
    assert code == 0 and rows == {"ckpt-7": 7, "ckpt-007": None}  # listed, as no step
