"""Tests: every piece against an independent computation. Run: python -m pytest -q test_sand.py"""
import copy
import csv
import functools
import io
import json
import math
import os
import pty
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import sand
import train
from sand import (CLUB, MODALITIES, SANDConfig, bpr_loss, fit_club, item_graph, knn_graph, lightgcn, lightgcn_adjacency,
                  neg_l2, solo_sim_loss)
from sand import _fit_club_fast, _lightgcn_fast, _solo_sim_loss_fast  # the fast paths, private: tested equal to the plain

# sand.py silences torch's beta notice for sparse CSR at import; pytest resets warning filters per test
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = data.SyntheticSpec(n_users=500, n_items=250, d_image=48, d_text=24, k_generic=4, k_unique=4)
HEADER = "userID\titemID\trating\ttimestamp\tx_label\n"
TIMING = ("train_s_per_epoch", "eval_s_per_epoch", "peak_memory_gib")
quiet = lambda *_: None


def tiny(seed=0):
    return data.make_synthetic("tiny", seed, TINY)


def run_cfg(**kw):
    return train.make_config(**kw)


def tiny_run(tmp_path, **kw):
    """Settings of a quick run on the tiny dataset, written as an MMRec folder tmp_path/data/tiny/ (2 estimator
    steps per batch where the variant has an estimator)."""
    data.write_mmrec(tiny(), str(tmp_path / "data"))
    settings = {"dataset": "tiny", "data_dir": str(tmp_path / "data"), "batch_size": 512, **kw}
    if "club_steps" not in sand.unread(run_cfg(**settings).sand):
        settings.setdefault("club_steps", 2)
    return settings


def write_folder(tmp_path, name="toy", inter=None, image=None, text=None):
    """A small dataset in MMRec's format, tmp_path/<name>/: 4 users with 2 train, 1 valid and 1 test item each."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    if inter is None:
        rows = [(u, i, lab) for u in range(4) for i, lab in ((u, 0), (u + 1, 0), (u + 2, 1), (u + 3, 2))]
        inter = HEADER + "".join(f"{u}\t{i}\t5.0\t1\t{x}\n" for u, i, x in rows)
    (folder / f"{name}.inter").write_text(inter)
    np.save(folder / "image_feat.npy", np.ones((7, 6)) if image is None else image)
    np.save(folder / "text_feat.npy", np.ones((7, 4)) if text is None else text)
    return str(tmp_path)


def cli(args, tmp_path, monkeypatch, capsys):
    """train.py's command line, in this process (faster than a subprocess), from tmp_path -> (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.INTERRUPTS, "install", lambda: None)  # leave pytest's own signal handlers alone
    capsys.readouterr()
    try:
        train.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(args, tmp_path, monkeypatch, capsys, expect):
    code, err = cli(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: "), err
    assert expect in err, err


def files_of(folder):
    """{path under folder: content} of every file below it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows_of(path, timing=False):
    """metrics.csv's rows (without the seconds columns, which differ from run to run, unless `timing`)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if timing or not k.endswith("_s")} for r in csv.DictReader(f)]


def same_results(a, b):
    return {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


# ---------------------------------------------------------------------------------------------
# Data

def test_load_mmrec_reads_splits_and_casts_float64(tmp_path):
    ds = data.load_mmrec(write_folder(tmp_path), "toy")
    assert (ds.n_users, ds.n_items) == (4, 7)  # max id + 1 over the whole file, valid/test included
    assert ds.train.tolist() == [[u, i] for u in range(4) for i in (u, u + 1)]
    assert ds.valid.tolist() == [[u, u + 2] for u in range(4)] and ds.test.tolist() == [[u, u + 3] for u in range(4)]
    assert ds.image.dtype == np.float32 and ds.image.shape == (7, 6)


def test_inter_file_from_a_windows_editor_reads_the_same(tmp_path):
    # a UTF-8 byte-order mark before the header and CRLF line ends
    plain = "userID\titemID\trating\ttimestamp\tx_label\n0\t1\t5\t1\t0\n2\t0\t5\t1\t1\n1\t3\t5\t1\t2\n"
    (tmp_path / "a.inter").write_text(plain)
    (tmp_path / "b.inter").write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode())
    for a, b in zip(data.read_inter(str(tmp_path / "a.inter")), data.read_inter(str(tmp_path / "b.inter"))):
        np.testing.assert_array_equal(a, b)
    assert data.read_inter(str(tmp_path / "a.inter"))[0].tolist() == [0, 2, 1]
    (tmp_path / "c.inter").write_bytes(plain.encode() + b"\xff\xfe\n")  # not text
    with pytest.raises(data.DataError, match="c.inter: not a text file in UTF-8"):
        data.read_inter(str(tmp_path / "c.inter"))


def test_users_without_train_interactions_are_left_out_and_zero_feature_rows_are_reported(tmp_path):
    # MMRec's filter_out_cod_start_users: users 4 (valid and test) and 5 (test) have no train row
    rows = [(u, i, lab) for u in range(4) for i, lab in ((u, 0), (u + 1, 0), (u + 2, 1), (u + 3, 2))]
    rows += [(4, 5, 1), (4, 6, 2), (5, 1, 2), (5, 2, 2)]
    inter = "userID\titemID\trating\ttimestamp\tx_label\n" + "".join(f"{u}\t{i}\t5.0\t1\t{x}\n" for u, i, x in rows)
    image = np.arange(42.0).reshape(7, 6) % 5
    image[[2, 6]] = 0
    data_dir = write_folder(tmp_path, inter=inter, image=image)
    ds = data.load_mmrec(data_dir, "toy")
    assert ds.n_users == 6 and ds.valid.tolist() == [[u, u + 2] for u in range(4)]
    assert ds.test.tolist() == [[u, u + 3] for u in range(4)]
    assert ds.notes == ["valid: left out 1 user(s) with no train interaction (1 interactions), as MMRec does",
                        "test: left out 2 user(s) with no train interaction (3 interactions), as MMRec does",
                        "image features: 2 all-zero rows (items 2, 6): similarity 0 to every item in the kNN graph"]
    lines = []
    results = train.run(run_cfg(dataset="toy", data_dir=data_dir, epochs=1, knn_k=3, out=str(tmp_path / "run")),
                        log=lines.append)
    assert all(note in lines for note in ds.notes)
    evaluator = train.make_evaluator(ds, torch.device("cpu"))
    assert evaluator.users.tolist() == [0, 1, 2, 3] and math.isfinite(results["test"]["recall@20"])


def test_write_then_load_round_trips(tmp_path):
    ds = tiny()
    data.write_mmrec(ds, str(tmp_path))
    back = data.load_mmrec(str(tmp_path), "tiny")
    for s in ("train", "valid", "test", "image", "text"):
        np.testing.assert_array_equal(getattr(back, s), getattr(ds, s))
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("case, expect", [
    (dict(inter="user\titemID\tx_label\n0\t1\t0\n"), "header lacks userID"),
    (dict(inter=HEADER + "0\t1.5\t1\t1\t0\n"), "itemID '1.5' is not an integer"),
    (dict(inter=HEADER + "0\tx\t1\t1\t0\n"), "is not an integer"),
    (dict(inter=HEADER + "-1\t1\t1\t1\t0\n"), "is negative"),
    (dict(inter=HEADER + "0\t1\t1\t1\t3\n"), "x_label 3 is not 0"),
    (dict(inter=HEADER + "0\t1\t1\t0\n"), "4 tab-separated fields, the header has 5"),
    (dict(inter=HEADER + "0\t1\t1\t1\t1\n1\t0\t1\t1\t2\n", image=np.ones((2, 3)), text=np.ones((2, 3))), "train split (x_label 0) is empty"),
    (dict(inter=HEADER + "0\t1\t1\t1\t0\n1\t0\t1\t1\t2\n", image=np.ones((2, 3)), text=np.ones((2, 3))), "valid split (x_label 1) has no users"),
    (dict(inter=HEADER + "0\t1\t1\t1\t0\n0\t0\t1\t1\t1\n", image=np.ones((2, 3)), text=np.ones((2, 3))), "test split (x_label 2) has no users"),
    (dict(inter=HEADER + "0\t1\t1\t1\t0\n1\t0\t1\t1\t1\n0\t0\t1\t1\t2\n", image=np.ones((2, 3)), text=np.ones((2, 3))),
     "no user of the valid split has a train interaction, so none can be evaluated"),
    (dict(image=np.ones((6, 6))), "image_feat.npy: shape (6, 6), expected [7, d]"),
    (dict(text=np.where(np.eye(7, 4) > 0, np.nan, 1.0)), "text_feat.npy: 4 rows hold NaN or inf"),
    (dict(image=np.full((7, 6), np.inf)), "7 rows hold NaN or inf"),
    (dict(text=np.ones((7, 1))), "text_feat.npy: 1 feature column(s); SAND splits"),
    (dict(inter=HEADER + "0\t0\t1\t1\t0\n0\t1\t1\t1\t1\n50\t0\t1\t1\t2\n", image=np.ones((2, 3)), text=np.ones((2, 3))),
     "userID goes up to 50 but only 2 distinct ones occur; ids must be 0-based and dense"),
    (dict(inter=HEADER + "0\t0\t1\t1\t0\n1\t1\t1\t1\t1\n1\t9000000000\t1\t1\t2\n"),
     "itemID goes up to 9000000000 but only 3 distinct ones occur; ids must be 0-based and dense"),
    (dict(inter=HEADER + "0\t1\t1\t1\t-1\n"), "toy.inter:2: x_label -1 is not 0 (train), 1 (valid) or 2 (test)"),
    (dict(inter=HEADER + "0\t" + "x" * 10 ** 6 + "\t1\t1\t0\n"),  # a huge field is not echoed whole
     "toy.inter:2: itemID 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (1,000,000 characters) is not an integer"),
    (dict(inter=HEADER + "0\t1\t1\tnote\u2028more\t0\n0\t1\t1\t1\t7\n"),  # U+2028 is no line end here
     "toy.inter:3: x_label 7 is not 0"),
])
def test_bad_input_gives_clear_error(tmp_path, case, expect):
    with pytest.raises(data.DataError, match=expect.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        data.load_mmrec(write_folder(tmp_path, **case), "toy")


def test_ids_written_with_leading_zeros_read_as_the_numbers_they_are(tmp_path):
    inter = HEADER + "".join(f"{u:020d}\t{i:03d}\t1\t1\t{x}\n" for u in range(4)
                             for i, x in ((u, 0), (u + 1, 0), (u + 2, 1), (u + 3, 2)))
    ds = data.load_mmrec(write_folder(tmp_path, inter=inter), "toy")
    assert ds.train.tolist() == [[u, i] for u in range(4) for i in (u, u + 1)]


def test_pairs_repeated_or_shared_between_splits_are_said_in_notes(tmp_path):
    rows = [(u, i, lab) for u in range(4) for i, lab in ((u, 0), (u + 1, 0), (u + 2, 1), (u + 3, 2))]
    rows += [(0, 0, 0), (1, 1, 2), (2, 4, 2)]  # a repeated train pair; a test pair that is a train pair, one a valid pair
    inter = HEADER + "".join(f"{u}\t{i}\t5\t1\t{x}\n" for u, i, x in rows)
    ds = data.load_mmrec(write_folder(tmp_path, inter=inter), "toy")
    assert ds.notes == ["train: 1 pairs repeat a (user, item) pair of the train split: each counts as another edge of "
                        "the graph (MMRec's files have none)",
                        "test: 1 pairs are also train pairs: masked when ranking, so never a hit",
                        "test: 1 pairs are also valid pairs"]
    assert not tiny().notes  # the built-in data has none of these


def test_features_of_extreme_size_are_said_in_a_note_before_training(tmp_path):
    image = np.ones((7, 6))
    image[2] = 3e19  # finite, but training on it overflows
    ds = data.load_mmrec(write_folder(tmp_path, image=image), "toy")
    assert ("image features reach 3.0e+19 in absolute value: training may overflow (a loss or weight that is not "
            "finite); scale them first, e.g. each row to unit length") in ds.notes


def test_missing_dataset_names_files_and_sources(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_mmrec(str(tmp_path), "baby")
    msg = str(e.value)
    for needed in ("baby.inter", "image_feat.npy", "text_feat.npy", "MMRec", "--dataset synthetic"):
        assert needed in msg
    assert "\n" not in msg


def test_five_core_and_mmrec_split_rule():
    rng = np.random.default_rng(1)
    user, item = rng.integers(0, 600, 3000), rng.integers(0, 300, 3000)
    keep = data.five_core(user, item)
    # the 5-core is unique: removing one under-5 user or item at a time must end at the same set
    alive = np.ones(len(user), dtype=bool)
    while True:
        cu, ci = np.bincount(user[alive], minlength=600), np.bincount(item[alive], minlength=300)
        weak_users = [x for x in np.unique(user[alive]) if cu[x] < 5]
        weak_items = [x for x in np.unique(item[alive]) if ci[x] < 5]
        if weak_users:
            alive &= user != weak_users[0]
        elif weak_items:
            alive &= item != weak_items[0]
        else:
            break
    assert np.array_equal(keep, alive) and 0 < keep.sum() < len(keep)  # it dropped some, kept some
    u = user[keep]
    label = data.mmrec_split(u, rng)
    for uid in np.unique(u):
        n = (u == uid).sum()
        counts = [(label[u == uid] == k).sum() for k in range(3)]
        vt = 2 if n < 10 else n // 5
        assert counts == [n - vt, vt // 2, vt - vt // 2], (n, counts)


def test_synthetic_is_seeded_and_planted():
    a, b, c = tiny(0), tiny(0), tiny(1)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (a.n_items, 48) and a.factors["generic"].shape == (a.n_items, 4)
    assert min(len(a.valid), len(a.test)) > 0
    # image features are a linear map of (generic, image-unique) factors + noise: least squares on
    # those factors explains most of the variance, on text-unique factors almost none
    def r2(x, y):
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        return 1 - ((y - x @ coef) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    f = a.factors
    assert r2(np.hstack([f["generic"], f["image"]]), a.image) > 0.7
    assert r2(f["text"], a.image) < 0.1


def test_builtin_load_and_write_cli(tmp_path):
    write = lambda *args: subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--write", *args],
                                         capture_output=True, text=True, timeout=120)
    r = write(str(tmp_path))
    assert r.returncode == 0, r.stderr
    ds = data.load_dataset("synthetic-mmrec", str(tmp_path))  # the files, not the built-in data of that name
    np.testing.assert_array_equal(ds.train, data.load_dataset("synthetic").train)
    assert r.stdout.strip().endswith(f"train on it: python train.py --dataset synthetic-mmrec --data-dir {tmp_path}")
    r = write(str(tmp_path), "--name", "mine", "--seed", "3")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(data.load_dataset("mine", str(tmp_path)).test, data.make_synthetic(seed=3).test)
    before = sorted(os.listdir(tmp_path / "mine"))
    (tmp_path / "afile").write_text("x")
    for args, why in ((["--name", "synthetic"], "built-in"), (["--name", "mine"], "is not empty"),
                      (["--name", ""], "is not a name"), (["--name", "a/b"], "is not a name"),
                      (["--name", "/abs"], "is not a name"), (["--name", ".."], "is not a name"),
                      (["--seed", "-1"], "--seed must be"), (["--write", ""], "is empty")):
        r = write(str(tmp_path), *args)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    r = write(str(tmp_path / "afile"))  # a file where the folder should be: the OS's reason, in one line
    assert r.returncode == 2 and r.stderr.startswith("data.py: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "mine")) == before and sorted(os.listdir(tmp_path)) == ["afile", "mine",
                                                                                                 "synthetic-mmrec"]


# ---------------------------------------------------------------------------------------------
# Bad input and settings: one line, exit code 2, before anything is written

@pytest.mark.parametrize("args, expect", [
    (["--dataset", "baby", "--data-dir", "{tmp}"], "dataset 'baby' not found"),
    (["--dataset", "toy", "--data-seed", "5"], "--data-seed is read only with a built-in --dataset"),
    (["--data-dir", "elsewhere"], "--data-dir is not read by the built-in --dataset synthetic"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--device", "cpu:1"], "--device cpu:1: the CPU has no device number"),
    (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
    (["--device", "mps"], "--device mps: only cpu and cuda are supported"),
    (["--eval-only", "{tmp}/nowhere"], "checkpoint {tmp}/nowhere not found"),
    (["--resume", "{tmp}/last.pt"], "checkpoint {tmp}/last.pt not found"),
    (["--resume", ""], "--resume '' is empty"),
    (["--out", "{tmp}/dangling"], "{tmp}/dangling is a file or a broken symbolic link: give a folder path"),
    (["--out", __file__], f"{__file__} is a file or a broken symbolic link: give a folder path"),
    (["--lr", "0x10"], "argument --lr: invalid float value: '0x10' (see --help)"),
    (["--lr", "-1e-3"], "--lr must be above 0 (got -0.001)"),  # a value, not a flag
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--knn-k", "0"], "--knn-k must be at least 1 (got 0)"),
    (["--knn-k", "5000"], "--knn-k 5000 is more than the 1144 items of synthetic"),
    (["--batch-size", 10 ** 20], "--batch-size must be at most 2147483647"),
    (["--seed", 10 ** 20], "--seed must be at most"),
    (["--data-seed", "-1"], "--data-seed must be at least 0"),
    (["--mlp-dim", 2 ** 21], "--mlp-dim must be at most 1048576"),
    (["--embed-dim", 10 ** 20], "--embed-dim must be at most"),
    (["--head-dim", 2 ** 20], "this run needs at least"),  # within range, beyond memory: the estimate refuses it
    (["--club-hidden", 2 ** 20], "this run needs at least"),  # the estimator's activations are counted too
    (["--backbone", "vbpr", "--embed-dim", "1"], "give an even number, 2 or more (got 1)"),
    (["--backbone", "freedom", "--embed-dim", "7"], "--backbone freedom splits --embed-dim into a generic and a unique half"),
    (["--backbone", "vbpr", "--dropout", "1"], "--dropout must be below 1 (got 1.0)"),
    (["--grid", "knn_k=5,5000"], "--grid point knn_k=5000: --knn-k 5000 is more than the 1144 items"),
])
def test_bad_settings_give_one_line(tmp_path, monkeypatch, capsys, args, expect):
    write_folder(tmp_path / "data")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    one_line_error([str(a).format(tmp=tmp_path) for a in args], tmp_path, monkeypatch, capsys, expect.format(tmp=tmp_path))
    assert not (tmp_path / "runs").exists()  # checked before anything is written


def test_cli_unwritable_output_is_one_line_exit_2(tmp_path):
    (tmp_path / "afile").write_text("")
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--out", str(tmp_path / "afile" / "run")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Not a directory" in r.stderr, r.stderr


def npy_header_claiming(shape):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


@pytest.mark.parametrize("name, content, expect", [
    ("inter", HEADER + "--3\t1\t1\t1\t0\n", "userID '--3' is not an integer"),
    ("inter", HEADER + "\u00b2\t1\t1\t1\t0\n", "userID '\u00b2' is not an integer"),
    ("inter", HEADER + "0\t99999999999999999999\t1\t1\t0\n", "itemID '99999999999999999999' is too large for an id"),
    ("inter", HEADER + "0\x00\t1\t1\t1\t0\n", "toy.inter:2: userID '0\\x00' is not an integer"),
    ("inter", "userID\titemID\tuserID\tx_label\n0\t1\t0\t0\n", "the header names userID twice"),
    ("inter", HEADER + "0\t1\t1\t1\t0\n\n\n0\t2\t1\t1\t5\n", "toy.inter:5: x_label 5 is not 0"),  # blanks counted
    ("image", b"", "image_feat.npy: not a readable .npy array"),
    ("image", "npz", "image_feat.npy: not a readable .npy array"),
    ("image", npy_header_claiming((7, 2 ** 40)), "its header promises (7, 1099511627776) float32"),
    ("image", np.ones((7, 6), dtype=np.complex64), "dtype complex64 is not a real number type"),
    ("image", np.where(np.eye(7, 6) > 0, 1e300, 1.0), "6 rows hold NaN or inf, or values beyond float32's range"),
])
def test_bad_files_give_one_line(tmp_path, monkeypatch, capsys, recwarn, name, content, expect):
    folder = tmp_path / "data" / "toy"
    write_folder(tmp_path / "data", inter=content if name == "inter" else None)
    if name == "image":
        path = folder / "image_feat.npy"
        if isinstance(content, np.ndarray):
            np.save(path, content)
        elif content == "npz":
            np.savez(tmp_path / "x.npz", a=np.ones((7, 6)))
            os.replace(tmp_path / "x.npz", path)
        else:
            path.write_bytes(content)
    one_line_error(["--dataset", "toy", "--knn-k", "2"], tmp_path, monkeypatch, capsys, expect)
    assert not recwarn.list  # no warning beside the line (numpy's overflow in the cast to float32, say)


@pytest.mark.parametrize("kw, expect", [
    ({"tau": 0.0}, "--tau must be above 0 (got 0.0)"),
    ({"image_weight": 1.5}, "--image-weight must be at most 1 (got 1.5)"),
    ({"lr": float("nan")}, "--lr must be a finite number (got nan)"),
    ({"batch_size": 0}, "--batch-size must be at least 1 (got 0)"),
    ({"club_steps": -1}, "--club-steps must be at least 0 (got -1)"),
    ({"seeds": 5}, "--seeds is read only with --ablation or --grid"),
    ({"ablation": True, "profile": True}, "--profile is not read by --ablation or --grid"),
    ({"ablation": True, "resume": "x"}, "--resume and --ablation do not go together"),
    ({"dist": "l2", "ureg": 0.1}, "--ureg is read only with --dist mi"),
    ({"dist": "l2", "club_fit": "intra"}, "--club-fit is read only with --dist mi"),
    ({"dist": "l2", "club_steps": 3}, "--club-steps is read only with --dist mi"),
    ({"dist": "mi", "club_steps": 50, "dist_dim": 32, "w_l2": 0.01}, "--w-l2 is read only with --dist l2"),
    ({"backbone": "vbpr", "knn_k": 5}, "--knn-k is not read by --backbone vbpr"),
    ({"backbone": "vbpr", "n_layers": 1}, "--n-layers is not read by --backbone vbpr"),
    ({"backbone": "vbpr", "mlp_dim": 8}, "--mlp-dim is read only with --backbone dragon"),
    ({"backbone": "freedom", "dist_dim": 8}, "--dist-dim is read only with --backbone dragon"),
    ({"backbone": "freedom", "dropout": 0.1}, "--dropout is read only with --backbone vbpr"),
    ({"reg_weight": 0.1}, "--reg-weight is read only with --backbone vbpr or freedom"),
    ({"backbone": "vbpr", "edge_dropout": 0.5}, "--edge-dropout is read only with --backbone freedom"),
    ({"align": "none", "tau": 0.3}, "--tau is read only with --align solo or complete"),
    ({"align": "none", "alpha": 0.1}, "--alpha is read only with --align solo or complete"),
    ({"dist": "none", "dist_dim": 16}, "--dist-dim is read only with --dist mi or l2"),
    ({"dropout": 0.1}, "--dropout is read only with --backbone vbpr"),
    ({"backbone": "vbpr", "dist": "none", "align": "none", "eval_dropout": True}, "--eval-dropout is read only with --dropout above 0"),
    ({"backbone": "vbpr", "dist": "none", "align": "none", "head_dim": 8}, "--head-dim is not read by plain VBPR"),
    ({"backbone": "freedom", "align": "none", "align_dim": 8}, "--align-dim is read only with --align solo or complete"),
])
def test_check_refuses_a_setting_out_of_range_or_one_that_would_be_ignored(kw, expect):
    with pytest.raises(train.UsageError, match=re.escape(expect)):
        train.check(run_cfg(**kw))
    train.check(run_cfg(**{k: v for k, v in kw.items() if k in ("backbone", "dist", "align")}))  # the variant alone


def test_flags_with_what_they_need_pass_the_check():
    for kw in ({"seeds": 5, "ablation": True}, {"seeds": 5, "grid": ("alpha=0.1",)}, {"profile": True},
               {"backbone": "vbpr", "dropout": 0.2, "eval_dropout": True}, {"backbone": "freedom", "reg_weight": 1e-3},
               {"backbone": "vbpr", "align": "none", "head_dim": 8}):  # VBPR scores its heads, aligned or not
        train.check(run_cfg(**kw))


# ---------------------------------------------------------------------------------------------
# Sampler

def test_sampler_covers_each_pair_once_and_never_yields_a_train_positive():
    ds = tiny()
    train_t = torch.from_numpy(ds.train)
    gen = torch.Generator().manual_seed(0)
    sampler = train.BPRSampler(train_t, ds.n_items, gen)
    positives = {(u, i) for u, i in ds.train.tolist()}
    train_items = set(ds.train[:, 1].tolist())
    for _ in range(3):
        batches = sampler.epoch(128)
        assert all(len(b[0]) == 128 for b in batches[:-1])
        user = torch.cat([b[0] for b in batches]).tolist()
        pos = torch.cat([b[1] for b in batches]).tolist()
        neg = torch.cat([b[2] for b in batches]).tolist()
        assert sorted(zip(user, pos)) == sorted(map(tuple, ds.train.tolist()))
        assert not any((u, j) in positives for u, j in zip(user, neg))
        assert set(neg) <= train_items
    assert len(set(neg)) > len(train_items) // 2  # spread over the train items, not a few


def test_sampler_draws_each_batchs_permutations_after_the_epochs_negatives():
    ds = tiny()
    plain, with_perms = (train.BPRSampler(torch.from_numpy(ds.train), ds.n_items, torch.Generator().manual_seed(3))
                         for _ in range(2))
    batches, more = plain.epoch(128), with_perms.epoch(128, 2)
    assert all(b[3] is None for b in batches) and all(m[3] is not None for m in more)
    for b, m in zip(batches, more):
        assert all(torch.equal(x, y) for x, y in zip(b[:3], m[:3]))  # the same batches
    perms = torch.stack([m[3] for m in more])  # [n_batches, 2, I]
    assert perms.shape == (len(batches), 2, ds.n_items)
    assert torch.equal(perms.sort(-1).values, torch.arange(ds.n_items).expand_as(perms))  # permutations
    assert len({tuple(p) for p in perms.flatten(0, 1).tolist()}) == 2 * len(batches)  # all different
    # drawn batch by batch after the epoch's negatives: the order in which the model drew them itself
    after = torch.stack([torch.randperm(ds.n_items, generator=plain.gen) for _ in range(2 * len(batches))])
    assert torch.equal(perms.flatten(0, 1), after)


def test_sampler_refuses_a_user_with_no_possible_negative():
    train_p = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [2, 2]])  # user 0 has every train item
    with pytest.raises(data.DataError, match="user 0 has a train interaction with every item"):
        train.BPRSampler(train_p, 5, torch.Generator())


# ---------------------------------------------------------------------------------------------
# Metrics

def slow_metrics(scores, train_pairs, split_pairs, ks=(10, 20)):
    """Per-user loop, straight from the definitions."""
    train_of, split_of = {}, {}
    for u, i in train_pairs:
        train_of.setdefault(u, set()).add(i)
    for u, i in split_pairs:
        split_of.setdefault(u, set()).add(i)
    out = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
    for u, truth in split_of.items():
        s = scores[u].clone()
        for i in train_of.get(u, ()):
            s[i] = -math.inf
        ranked = torch.argsort(s, descending=True).tolist()
        for k in ks:
            hits = [1.0 if i in truth else 0.0 for i in ranked[:k]]
            out[f"recall@{k}"].append(sum(hits) / len(truth))
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(truth), k)))
            out[f"ndcg@{k}"].append(dcg / idcg)
    return {k: sum(v) / len(v) for k, v in out.items()}


def random_split(n_users, n_items, seed):
    rng = np.random.default_rng(seed)
    pairs = np.array([(u, i) for u in range(n_users) for i in rng.choice(n_items, rng.integers(2, 25), replace=False)])
    label = rng.choice(3, len(pairs), p=[0.6, 0.2, 0.2])
    return pairs[label == 0], pairs[label == 2]


@pytest.mark.parametrize("chunk", [1000, 2])  # one chunk, and many small chunks
def test_metrics_match_per_user_loop(chunk):
    n_users, n_items = 60, 90
    train_p, test_p = random_split(n_users, n_items, 3)
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randn(n_users, 8, generator=gen), torch.randn(n_items, 8, generator=gen)
    valid_p = test_p[::3]  # another split over a subset of the users
    ev = train.Evaluator(torch.from_numpy(train_p), {"valid": torch.from_numpy(valid_p), "test": torch.from_numpy(test_p)},
                         n_items, torch.device("cpu"), chunk)
    got = ev(lambda u: users[u] @ items.T)
    for split, pairs in (("valid", valid_p), ("test", test_p)):
        want = slow_metrics(users @ items.T, train_p.tolist(), pairs.tolist())
        for k in want:
            assert got[split][k] == pytest.approx(want[k], abs=1e-12), (split, k)


def hand_evaluator(scores, train_items, test_items):
    """One user whose item scores are given directly (1-d embeddings)."""
    n = len(scores)
    ev = train.Evaluator(torch.tensor([[0, i] for i in train_items], dtype=torch.long).reshape(-1, 2),
                         {"test": torch.tensor([[0, i] for i in test_items])}, n, torch.device("cpu"))
    return ev(lambda u: torch.tensor([scores], dtype=torch.float64))["test"]


def test_metrics_hand_worked():
    scores = [float(30 - r) for r in range(30)]  # item r is ranked r + 1
    # one test item at rank 1: everything perfect
    m = hand_evaluator(scores, [], [0])
    assert m == {"recall@10": 1.0, "ndcg@10": 1.0, "recall@20": 1.0, "ndcg@20": 1.0}
    # one test item at rank 10: in the top 10, DCG = 1/log2(11), IDCG = 1
    m = hand_evaluator(scores, [], [9])
    assert m["recall@10"] == 1.0 and m["ndcg@10"] == pytest.approx(1 / math.log2(11))
    # rank 11: outside the top 10, inside the top 20
    m = hand_evaluator(scores, [], [10])
    assert m["recall@10"] == 0.0 and m["ndcg@10"] == 0.0
    assert m["recall@20"] == 1.0 and m["ndcg@20"] == pytest.approx(1 / math.log2(12))
    # three test items (fewer than K) at ranks 1, 3, 25: recall divides by n_u = 3, IDCG sums 3 terms
    m = hand_evaluator(scores, [], [0, 2, 24])
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["recall@10"] == pytest.approx(2 / 3) and m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / idcg)
    # masking: train items 0 and 1 are removed, so item 2 moves up to rank 1
    m = hand_evaluator(scores, [0, 1], [2])
    assert m["ndcg@10"] == 1.0
    # 25 test items: recall@20 is hits / 25, not hits / min(20, 25)
    m = hand_evaluator(scores, [], list(range(25)))
    assert m["recall@20"] == pytest.approx(20 / 25) and m["ndcg@20"] == pytest.approx(1.0)
    # fewer items than K: every item is ranked, the test item at rank 2
    m = hand_evaluator(scores[:5], [], [1])
    assert m["recall@10"] == 1.0 and m["ndcg@20"] == pytest.approx(1 / math.log2(3))


def test_masked_train_items_never_reach_the_top_k():
    n_users, n_items = 40, 60
    train_p, test_p = random_split(n_users, n_items, 5)
    users = torch.randn(n_users, 4)
    items = torch.randn(n_items, 4)
    items[train_p[:, 1]] += 100 * users.mean(0)  # train items score highest, unless masked
    ev = train.Evaluator(torch.from_numpy(train_p), {"test": torch.from_numpy(test_p)}, n_items, torch.device("cpu"))
    top = ev.topk(lambda u: users[u] @ items.T)
    train_set = set(map(tuple, train_p.tolist()))
    assert not any((u, i) in train_set for u, row in zip(ev.users.tolist(), top.tolist()) for i in row)


def test_a_catalog_with_fewer_unseen_items_than_k_never_ranks_a_masked_item():
    # 12 items, 8 of them each user's train items (and item 2 also a test item): 4 left to rank, K = 20
    train_p = torch.tensor([[u, i] for u in range(3) for i in range(8)])
    test_p = torch.tensor([[u, 2] for u in range(3)] + [[u, 9] for u in range(3)])
    ev = train.Evaluator(train_p, {"test": test_p}, 12, torch.device("cpu"))
    scores = lambda users: torch.arange(12.0).flip(0).repeat(len(users), 1)  # item 0 best: all masked ones first
    top = ev.topk(scores)
    assert top.tolist() == [[8, 9, 10, 11] + [-1] * 8] * 3  # the unseen items, then nothing
    m = ev(scores)["test"]
    assert m["recall@20"] == 0.5 and m["recall@10"] == 0.5  # item 9 found, item 2 (a train item) never a hit
    assert m["ndcg@20"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


# ---------------------------------------------------------------------------------------------
# Graphs

def test_adjacency_and_propagation_match_dense_formula():
    n_users, n_items = 7, 6
    train_p = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 3], [3, 3], [3, 0], [4, 1], [2, 2]])  # user 5, 6 and items 4, 5: no edges
    r = torch.zeros(n_users, n_items)
    r[train_p[:, 0], train_p[:, 1]] = 1
    a = torch.zeros(n_users + n_items, n_users + n_items)
    a[:n_users, n_users:], a[n_users:, :n_users] = r, r.T
    deg = a.sum(1)
    d = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    dense = d[:, None] * a * d[None, :]
    adj = lightgcn_adjacency(train_p, n_users, n_items)
    torch.testing.assert_close(adj.to_dense(), dense)
    h0 = torch.randn(n_users + n_items, 5, dtype=torch.float64, requires_grad=True)
    want = h0 + dense.double() @ h0 + dense.double() @ dense.double() @ h0
    g = torch.randn_like(want)
    (grad_want,) = torch.autograd.grad(want, h0, g, retain_graph=True)
    (penalty_want,) = torch.autograd.grad((want ** 2).sum(), h0, create_graph=True)
    (second_want,) = torch.autograd.grad((penalty_want ** 2).sum(), h0)
    for propagate in (lightgcn, _lightgcn_fast):  # the plain piece and its fast path
        out = propagate(adj.to(torch.float64), h0, 2)
        torch.testing.assert_close(out, want)
        (grad,) = torch.autograd.grad(out, h0, g, retain_graph=True)
        torch.testing.assert_close(grad, grad_want)
        (penalty,) = torch.autograd.grad((out ** 2).sum(), h0, create_graph=True)  # a gradient penalty's
        (second,) = torch.autograd.grad((penalty ** 2).sum(), h0)  # second derivative too
        torch.testing.assert_close(second, second_want)
        assert torch.equal(out[n_users + 4], h0[n_users + 4])  # an isolated item keeps its own row only


def brute_knn(feat, k):
    x = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (x @ x.T).tolist()
    out = torch.zeros(len(sim), len(sim))
    for i, row in enumerate(sim):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))  # ties: lower index first
        out[i, order[:k]] = 1 / k
    return out


def test_knn_graph_matches_brute_force():
    feat = torch.randn(23, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for chunk in (4, 100):  # many chunks, one chunk
        got = knn_graph(feat, 4, chunk=chunk).to_dense()
        torch.testing.assert_close(got, brute_knn(feat, 4).double())
    assert (got > 0).sum(1).eq(4).all() and got.diagonal().gt(0).all()  # an item is its own neighbour
    s = item_graph(feat, feat[:, :3], 4, 0.1).to_dense()
    torch.testing.assert_close(s, 0.1 * brute_knn(feat, 4).double() + 0.9 * brute_knn(feat[:, :3], 4).double())


def test_knn_graph_ties_go_to_the_lower_index():
    # exactly representable similarities (0 or 1): duplicates, a scaled copy, all-zero rows
    e = torch.eye(4)
    feat = torch.stack([e[0], e[1], e[0], 2 * e[0], e[2], 0 * e[0], e[1], e[3], 0 * e[0]])
    got = knn_graph(feat, 3, chunk=2).to_dense()
    torch.testing.assert_close(got, brute_knn(feat, 3))
    assert got[3].nonzero().flatten().tolist() == [0, 2, 3]  # items 0, 2, 3 share a direction
    assert got[4].nonzero().flatten().tolist() == [0, 1, 4]  # item 4 is alone: itself, then ties 0, 1
    assert got[5].nonzero().flatten().tolist() == [0, 1, 2]  # a zero row is tied with everyone


# ---------------------------------------------------------------------------------------------
# Losses

def test_bpr_is_log2():
    pos, neg = torch.randn(50), torch.randn(50)
    want = -torch.log2(torch.sigmoid(pos - neg)).mean()
    torch.testing.assert_close(bpr_loss(pos, neg), want)


def test_solo_sim_loss_matches_loop_and_behaves():
    gen = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=1)
    v = F.normalize(torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=1)
    for tau in (0.2, 1.0):
        loop = 0.0
        for i in range(40):
            num = math.exp(float(t[i] @ v[i]) / tau)
            den = sum(math.exp(float(t[i] @ v[j]) / tau) for j in range(40))
            loop -= math.log(num / den) / 40
        assert float(solo_sim_loss(t, v, tau)) == pytest.approx(loop, rel=1e-10)
    # scaling both the logits' inputs and tau leaves it unchanged; only text anchors (asymmetric)
    torch.testing.assert_close(solo_sim_loss(2 * t, v, 0.4), solo_sim_loss(t, v, 0.2))
    assert float(solo_sim_loss(t, v, 0.2)) != pytest.approx(float(solo_sim_loss(v, t, 0.2)))
    # identical views at a low temperature: near its minimum 0; unrelated: near log N
    n = 500
    a = F.normalize(torch.randn(n, 32, generator=gen), dim=1)
    b = F.normalize(torch.randn(n, 32, generator=gen), dim=1)
    assert float(solo_sim_loss(a, a, 0.05)) < 0.01
    assert float(solo_sim_loss(a, b, 1.0)) == pytest.approx(math.log(n), abs=0.05)


@pytest.mark.parametrize("chunk_elements", [2 ** 24, 7 * 50])  # one block; blocks of 7 rows (last one partial)
def test_solo_sim_loss_fast_matches_the_plain_formula_and_its_gradient(monkeypatch, chunk_elements):
    monkeypatch.setitem(sand.CHUNK_ELEMENTS, "cpu", chunk_elements)
    gen = torch.Generator().manual_seed(2)
    t = F.normalize(torch.randn(50, 6, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    v = F.normalize(torch.randn(50, 6, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    logits = t @ v.T / 0.2
    want = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    got = _solo_sim_loss_fast(t, v, 0.2)
    torch.testing.assert_close(got, want)
    g_want = torch.autograd.grad(3 * want, (t, v))
    g_got = torch.autograd.grad(3 * got, (t, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_solo_sim_loss_fast_one_input_or_no_gradient():
    gen = torch.Generator().manual_seed(3)
    t = F.normalize(torch.randn(30, 5, generator=gen, dtype=torch.float64), dim=1)
    v = F.normalize(torch.randn(30, 5, generator=gen, dtype=torch.float64), dim=1)
    logits = t @ v.T / 0.5
    want = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    with torch.no_grad():  # the loss alone, no gradient work
        torch.testing.assert_close(_solo_sim_loss_fast(t.clone().requires_grad_(), v, 0.5), want)
    torch.testing.assert_close(_solo_sim_loss_fast(t, v, 0.5), want)
    v_leaf = v.clone().requires_grad_()  # only the second input is learned
    got = torch.autograd.grad(_solo_sim_loss_fast(t, v_leaf, 0.5), v_leaf)[0]
    v_ref = v.clone().requires_grad_()
    ref_logits = t @ v_ref.T / 0.5
    want_grad = torch.autograd.grad((torch.logsumexp(ref_logits, 1) - ref_logits.diagonal()).mean(), v_ref)[0]
    torch.testing.assert_close(got, want_grad)


def released_estimator_loop(club, x, y, steps, lr):
    """The released trainer's loop, written out for sets of pairs x, y [S, N, D]: per step, Adam on the
    sum over the sets of -mean log q(y|x) (`mi_loss + mi_loss1` for two sets)."""
    opt = torch.optim.Adam(club.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0
        for xs, ys in zip(x, y):
            mu, logvar = club.mu(xs), club.logvar(xs)
            loss = loss - (-(mu - ys) ** 2 / logvar.exp() / 2. - logvar / 2.).sum(dim=1).mean()
        loss.backward()
        opt.step()
    return loss.detach()


@pytest.mark.parametrize("fit", [fit_club, _fit_club_fast])
def test_fit_club_is_the_released_estimator_loop(fit):
    torch.manual_seed(0)
    x = torch.randn(2, 300, 6, dtype=torch.float64)
    y = x.flip(0) + torch.randn(2, 300, 6, dtype=torch.float64)  # dependent, so the fit moves
    club = CLUB(6, 6, 4).double()
    ref = copy.deepcopy(club)
    want = released_estimator_loop(ref, x, y, 20, 1e-2)
    start = float(club.nll(x, y).detach())
    loss = fit(club, torch.optim.Adam(club.parameters(), lr=1e-2), x, y, 20)
    torch.testing.assert_close(loss, want)
    for (name, a), b in zip(club.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=name)
        assert a.grad is None  # nothing left for another optimizer to step
    assert float(loss) < start  # and it did fit
    # one set of pairs [N, D]: its mean nll
    one = copy.deepcopy(club)
    want = released_estimator_loop(copy.deepcopy(club), x[:1], y[:1], 3, 1e-2)
    torch.testing.assert_close(fit(one, torch.optim.Adam(one.parameters(), lr=1e-2), x[0], y[0], 3), want)
    # no steps: nothing moves, the nll as it stands
    before = [p.detach().clone() for p in club.parameters()]
    torch.testing.assert_close(fit(club, torch.optim.Adam(club.parameters()), x, y, 0), club.nll(x, y).detach())
    assert all(torch.equal(a, b) for a, b in zip(before, club.parameters()))


def test_neg_l2_sign_and_gradient():
    a = torch.randn(10, 4, requires_grad=True)
    b = torch.randn(10, 4)
    loss = neg_l2(a, b)
    assert loss.item() == pytest.approx(-((a - b) ** 2).mean().item())
    loss.backward()
    torch.testing.assert_close(a.grad, -2 * (a - b).detach() / a.numel())
    with torch.no_grad():  # a gradient step on the loss moves a away from b
        assert float(neg_l2(a - 0.1 * a.grad, b)) < float(loss)


def plain_club_bound(club, x, y, perm):
    """CLUB's bound for one set of pairs by the plain formula, through autograd."""
    mu, logvar = club.mu(x), club.logvar(x)
    log_q, log_q_perm = [(-0.5 * (yy - mu) ** 2 / logvar.exp() - 0.5 * logvar).sum(1) for yy in (y, y[perm])]
    return torch.clamp((log_q - log_q_perm).mean() / 2, min=0)


def test_club_bound_matches_formula():
    torch.manual_seed(0)
    club = CLUB(6, 6, 4).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    with torch.no_grad():
        mu, logvar = club.mu(x), club.logvar(x)
        raw = []
        for seed in (0, 1):  # permutations that give a positive and a negative (clamped) bound
            perm = torch.randperm(30, generator=torch.Generator().manual_seed(seed))
            lq, lq_perm = [(-(yy - mu) ** 2 / (2 * logvar.exp()) - logvar / 2).sum(1) for yy in (y, y[perm])]
            raw.append(float((lq - lq_perm).mean()) / 2)
            assert float(club(x, y, perm)) == pytest.approx(max(0.0, raw[-1]), rel=1e-12)
        assert raw[0] > 0 > raw[1]
        assert float(club.nll(x, y)) == pytest.approx(-float(lq.mean()))


def test_club_bound_gradient_matches_autograd():
    """Sets of pairs in one call (as SAND runs its two modalities): each set's bound and the
    gradients for x and y equal the plain formula's, set by set, clamped sets included."""
    torch.manual_seed(1)
    club = CLUB(5, 5, 3).double()
    with torch.no_grad():  # off its trivial start, so that bounds are not all near 0
        for p in club.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(4, 40, 5, dtype=torch.float64, requires_grad=True)
    perms = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(s)) for s in range(4)])
    with torch.no_grad():  # y near mu(x): positive bounds; but set 2 has y_pi(k) = mu(x_k): negative, clamped at 0
        y = club.mu(x) + 0.1 * torch.randn(4, 40, 5, dtype=torch.float64)
        y[2, perms[2]] = club.mu(x[2])
    y.requires_grad_()
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)  # a different weight per set
    got = club(x, y, perms)  # [4]
    (got * upstream).sum().backward()
    g_got = x.grad, y.grad
    assert all(p.grad is None for p in club.parameters())  # q is fitted by fit_club, never by the bound
    want = torch.stack([plain_club_bound(club, x[s], y[s], perms[s]) for s in range(4)])
    g_want = torch.autograd.grad((want * upstream).sum(), (x, y))
    assert float(got[2].detach()) == 0 and bool((got[[0, 1, 3]] > 0).all())
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    assert float(g_got[0][2].abs().max()) == 0 == float(g_got[1][2].abs().max())  # no gradient from set 2


def test_club_detects_dependence():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=gen)
    x_new = torch.randn(2000, 8, generator=gen)  # held-out samples to estimate on
    estimates = {}
    for name, noise in (("dependent", 0.1), ("independent", None)):
        pair = lambda x: x + noise * torch.randn(x.shape, generator=gen) if noise else torch.randn(x.shape, generator=gen)
        club = CLUB(8, 8, 16)
        fit_club(club, torch.optim.Adam(club.parameters(), lr=1e-2), x, pair(x), 400)
        with torch.no_grad():
            estimates[name] = float(club(x_new, pair(x_new), torch.randperm(2000, generator=gen)))
    assert estimates["dependent"] > 2.0
    assert estimates["independent"] < 0.05


def test_copied_pieces_compute_their_formula_for_other_architectures_a_learnable_temperature_and_a_penalty():
    """Lifted into another model, as a user would: another estimator architecture, a learnable temperature, a
    second derivative. The pieces compute their formulas there."""
    torch.manual_seed(0)
    # a CLUB whose mu network has one more layer: the bound is the formula's, and fit_club trains every layer
    deep = CLUB(6, 6, 4).double()
    deep.mu = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 6)).double()
    x = torch.randn(2, 50, 6, dtype=torch.float64)
    with torch.no_grad():
        y = deep.mu(x) + 0.1 * torch.randn(2, 50, 6, dtype=torch.float64)
    perm = torch.stack([torch.randperm(50) for _ in range(2)])
    bound = deep(x, y, perm)
    torch.testing.assert_close(bound, torch.stack([plain_club_bound(deep, x[s], y[s], perm[s]) for s in range(2)]))
    assert bool((bound > 0).all())
    est = copy.deepcopy(deep)
    want = released_estimator_loop(copy.deepcopy(deep), x, y, 5, 1e-2)
    torch.testing.assert_close(fit_club(est, torch.optim.Adam(est.parameters(), lr=1e-2), x, y, 5), want)
    assert not torch.equal(est.mu[2].weight, deep.mu[2].weight)  # the extra layer is trained too
    # a learnable temperature gets the formula's gradient
    t = F.normalize(torch.randn(30, 5, dtype=torch.float64), dim=1)
    v = F.normalize(torch.randn(30, 5, dtype=torch.float64), dim=1)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    logits = t @ v.T / tau
    want = torch.autograd.grad((torch.logsumexp(logits, 1) - logits.diagonal()).mean(), tau)[0]
    torch.testing.assert_close(torch.autograd.grad(solo_sim_loss(t, v, tau), tau)[0], want)
    assert float(want) != 0
    # a gradient penalty (double backward)
    tl = t.clone().requires_grad_()
    (g,) = torch.autograd.grad(solo_sim_loss(tl, v, 0.3), tl, create_graph=True)
    assert float(torch.autograd.grad((g ** 2).sum(), tl)[0].abs().sum()) > 0


def test_fit_club_refuses_an_optimizer_that_holds_more_than_the_estimator(fit=fit_club):
    club, other = CLUB(4, 4, 3), nn.Linear(4, 4)
    x = torch.randn(20, 4)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="the optimizer holds parameters that are not the estimator's") as e:
        fit(club, torch.optim.Adam(list(club.parameters()) + list(other.parameters())), x, x, 3)
    assert "\n" not in str(e.value) and all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_a_club_inside_the_model_is_stepped_by_fit_club_alone(fit=fit_club):
    """A CLUB as a submodule of the model, under the model's one optimizer (and its own for fit_club):
    the bound gives it no gradient, and fit_club leaves none, so the model's step never moves it."""
    torch.manual_seed(0)
    model = nn.Module()
    model.enc, model.club = nn.Linear(6, 4), CLUB(4, 4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    club_opt = torch.optim.Adam(model.club.parameters(), lr=1e-2)
    feats = torch.randn(2, 40, 6)
    for _ in range(3):
        opt.zero_grad()
        a = model.enc(feats)  # [2, 40, 4]
        b = model.enc(feats.flip(-1))
        model.club(a, b, torch.stack([torch.randperm(40) for _ in range(2)])).mean().backward()
        assert all(p.grad is None for p in model.club.parameters())  # the bound's gradient reaches x, y only
        fit(model.club, club_opt, a, b, 2)
        fitted = [p.detach().clone() for p in model.club.parameters()]
        opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.club.parameters(), fitted))


# ---------------------------------------------------------------------------------------------
# The model

def small_model(dist="mi", align="solo", seed=0, **kw):
    ds = tiny()
    cfg = run_cfg(dist=dist, align=align, **kw)
    model, club, opt, club_opt = train.build(cfg, ds, torch.device("cpu"), seed)
    return ds, cfg, model, club, opt, club_opt


def dense_loss(model, club, user, pos, neg, perms):
    """The model written out once more: X_m formed, dense graphs, the formulas of the losses."""
    cfg, U = model.cfg, model.n_users
    h0, aux = [], {}
    for m in MODALITIES:
        x = model.transform[m](getattr(model, f"feat_{m}"))  # [I, d]
        h = x.shape[1] // 2
        g, u = x[:, :h], x[:, h:]
        item = model.mlp_out[m](F.leaky_relu(model.mlp_in[m](x)))
        h0.append(F.normalize(torch.cat([model.pref[m], item]), dim=1))
        aux[m] = (F.normalize(model.head[m](x if cfg.align == "complete" else g), dim=1) if cfg.align != "none" else None,
                  model.to_a[m](g) if cfg.dist != "none" else None,
                  model.to_b[m](u) if cfg.dist != "none" else None)
    a = model.adj.to_dense()
    hs = [torch.cat(h0, 1)]
    for _ in range(cfg.n_layers):
        hs.append(a @ hs[-1])
    r = sum(hs)
    users = torch.cat([model.user_weight[:, :1] * r[:U, :64], model.user_weight[:, 1:] * r[:U, 64:]], 1)
    items = r[U:] + model.item_item.to_dense() @ r[U:]
    ps, ns = (users[user] * items[pos]).sum(1), (users[user] * items[neg]).sum(1)
    loss = -torch.log2(torch.sigmoid(ps - ns)).mean()
    if cfg.align != "none":
        logits = aux["text"][0] @ aux["image"][0].T / cfg.tau
        loss = loss + cfg.alpha * -F.log_softmax(logits, 1).diagonal().mean()
    if cfg.dist == "mi":
        loss = loss + cfg.ureg * sum(plain_club_bound(club, aux[m][1], aux[m][2], perm)
                                     for m, perm in zip(("text", "image"), perms)) / 2
    if cfg.dist == "l2":
        loss = loss + cfg.w_l2 * -sum(((aux[m][1] - aux[m][2]) ** 2).mean() for m in MODALITIES) / 2
    return loss


@pytest.mark.parametrize("dist, align, club_fit", [("mi", "solo", "cross"), ("mi", "solo", "intra"),
                                                   ("l2", "solo", "cross"), ("none", "none", "cross"),
                                                   ("mi", "none", "cross"), ("none", "complete", "cross"),
                                                   ("l2", "complete", "cross")])
def test_both_tiers_equal_the_dense_formula_and_each_other(dist, align, club_fit):
    """The model on its plain tier and on its fast one, the same weights: the same loss and every gradient, each
    against the dense formula; then the comparison that train.py makes before a fast run (sand.tier_mismatch)."""
    ds, cfg, model, club, *_ = small_model(dist, align, club_fit=club_fit)
    with torch.no_grad():  # move CLUB off its trivial start so the bound is not clamped at 0
        for p in club.parameters():
            p.add_(0.3 * torch.randn_like(p))
    user, pos, neg = (torch.from_numpy(ds.train[:300, 0]), torch.from_numpy(ds.train[:300, 1]),
                      torch.randint(ds.n_items, (300,)))
    perms = torch.stack([torch.randperm(ds.n_items) for _ in range(2)])  # text's, then image's
    dense = dense_loss(model, club, user, pos, neg, perms)
    g_dense = torch.autograd.grad(dense, list(model.parameters()), allow_unused=True)
    for model.fast in (False, True):
        loss, terms, pairs = model.loss(user, pos, neg, club, perms)
        torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for (name, _), a, b in zip(model.named_parameters(), grads, g_dense):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)
        if dist == "mi":
            assert float(terms["club"]) > 0  # not clamped: the bound's gradients are compared too
    want_terms = {"bpr"} | ({"solo"} if align != "none" else set()) | {"mi": {"club"}, "l2": {"neg_l2"}, "none": set()}[dist]
    assert set(terms) == want_terms  # --dist none and --align none really remove their terms
    if dist == "none" and align == "none":  # only BPR is left
        torch.testing.assert_close(loss, terms["bpr"])
    assert sand.tier_mismatch(cfg.sand, {"image": 48, "text": 24}) is None


def test_score_is_the_dot_product_for_pairs_and_for_every_item():
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen)
    user, item = torch.tensor([4, 0, 4]), torch.tensor([6, 1, 2])
    torch.testing.assert_close(sand.score(users, items, user, item), torch.stack([users[u] @ items[i] for u, i in zip(user, item)]))
    every = sand.score(users, items, user)  # [3, 7]: what evaluation ranks
    torch.testing.assert_close(every, users[user] @ items.T)
    torch.testing.assert_close(every[torch.arange(3), item], sand.score(users, items, user, item))


def test_optimizers_are_separate():
    ds, cfg, model, club, opt, club_opt = small_model("mi")
    model_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    club_ids = {id(p) for g in club_opt.param_groups for p in g["params"]}
    assert not model_ids & club_ids and club_ids == {id(p) for p in club.parameters()}
    user, pos, neg = (torch.from_numpy(ds.train[:200, i]) for i in (0, 1, 1))
    loss, _, pairs = model.loss(user, pos, neg, club)
    loss.backward()
    assert all(p.grad is None for p in club.parameters())  # the model's backward does no work for the estimator
    before_model = [p.detach().clone() for p in model.parameters()]
    before_club = [p.detach().clone() for p in club.parameters()]
    fit_club(club, club_opt, *pairs, 5)  # the estimator's steps leave the model untouched
    assert all(torch.equal(a, b) for a, b in zip(before_model, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_club, club.parameters()))
    fitted = [p.detach().clone() for p in club.parameters()]
    opt.step()  # the model's step leaves the estimator untouched
    assert all(torch.equal(a, b) for a, b in zip(fitted, club.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_model, model.parameters()))


def test_club_fit_pairs_cross_and_intra():
    for fit, want in (("cross", (("text", "a"), ("text", "b"), ("image", "a"), ("image", "b"))),
                      ("intra", (("text", "a"), ("image", "a"), ("text", "b"), ("image", "b")))):
        ds, cfg, model, club, *_ = small_model("mi", club_fit=fit)
        user = torch.from_numpy(ds.train[:10, 0])
        _, _, pairs = model.loss(user, user, user, club)
        _, _, aux = model()
        x = torch.stack([aux[want[0][0]][want[0][1]], aux[want[1][0]][want[1][1]]])  # [2, I, 32]: two sets
        y = torch.stack([aux[want[2][0]][want[2][1]], aux[want[3][0]][want[3][1]]])
        torch.testing.assert_close(pairs[0], x)
        torch.testing.assert_close(pairs[1], y)


def readme_example():
    """The code block of the README's section on copying SAND into another model, exactly as written."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    return text[text.index("## Copy SAND into your model"):].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("dist", ["mi", "l2"])
def test_the_readme_example_runs_and_each_optimizer_moves_only_its_own_parameters(dist, monkeypatch):
    code = readme_example()
    assert code.count('32, "mi"') == 1
    code = code.replace('32, "mi"', f'32, "{dist}"')
    ns, steps = {}, {"model": 0, "club": 0}
    snap = lambda module: [p.detach().clone() for p in module.parameters()]
    unchanged = lambda before, module: all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    real_step, real_fit = torch.optim.Adam.step, sand.fit_club

    def step(self, *args, **kw):  # every optimizer step: the other part stays where it was
        held = {id(p) for group in self.param_groups for p in group["params"]}
        who = "club" if held == {id(p) for p in ns["club"].parameters()} else "model"
        if who == "model":  # this step's losses
            assert all(math.isfinite(float(ns[k].detach())) for k in ("loss", "align", "dist")), "a loss is not finite"
        other = ns["club"] if who == "model" else ns["model"]
        before = snap(other)
        out = real_step(self, *args, **kw)
        assert unchanged(before, other), f"the {who}'s optimizer moved the other part"
        steps[who] += 1
        return out

    def fit(club, *args, **kw):  # fit_club as a whole leaves the model alone and moves the estimator
        model, before_club = snap(ns["model"]), snap(club)
        out = real_fit(club, *args, **kw)
        assert unchanged(model, ns["model"]) and not unchanged(before_club, club)
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(sand, "fit_club", fit)
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), ns)
    assert steps == {"model": 5, "club": 250 if dist == "mi" else 0}


NORMALISED = 'F.normalize(model.item.weight + x["image"] + x["text"], dim=1)'


def readme_example_bpr(steps, normalised=True):
    """The README's example with --dist l2 run for `steps` steps -> the BPR of its last batch, the distancing term."""
    code = readme_example().replace('32, "mi"', '32, "l2"').replace("range(5)", f"range({steps})")
    assert code.count(NORMALISED) == 1
    if not normalised:
        code = code.replace(NORMALISED, 'model.item.weight + x["image"] + x["text"]')
    ns = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), ns)
    return float(ns["bpr_loss"](ns["score"](ns["pos"]), ns["score"](ns["neg"])).detach()), float(ns["dist"].detach())


def test_the_readme_example_normalises_what_it_scores_because_neg_l2_has_no_floor():
    bpr, dist = readme_example_bpr(1500)
    unnormalised, dist_too = readme_example_bpr(1500, normalised=False)
    assert dist < -1e5 and dist_too < -1e5  # neg_l2 keeps falling in both
    assert bpr < 1.2 < 2 < unnormalised  # only the normalised one still learns (1.0 log2 units: better than chance)
    print(f"README example, 1500 steps, --dist l2: BPR {bpr:.2f} normalised, {unnormalised:.2f} not")


# ---------------------------------------------------------------------------------------------
# The VBPR backbone (the authors' VBPR+SAND, and VBPR itself)

def vbpr(dist="l2", align="solo", **kw):
    ds = tiny()
    cfg = run_cfg(backbone="vbpr", dist=dist, align=align, **kw)
    return (ds, cfg, *train.build(cfg, ds, torch.device("cpu"), 0))


def test_vbpr_defaults_come_from_the_authors_configuration_and_flags_override_them():
    cfg = run_cfg(backbone="vbpr")
    assert (cfg.sand.dist, cfg.sand.alpha, cfg.sand.tau, cfg.sand.w_l2, cfg.sand.reg_weight, cfg.sand.dropout,
            cfg.train.lr) == ("l2", 0.1, 0.1, 0.01, 2.0, 0.01, 1e-3)
    assert run_cfg(backbone="vbpr", alpha=0.5).sand.alpha == 0.5 and run_cfg().sand.alpha == 0.012
    args = train.parser().parse_args(["--backbone", "vbpr", "--tau", "0.3"])
    cfg = train.config_from_args(args)
    assert (cfg.sand.tau, cfg.sand.alpha, cfg.train.lr) == (0.3, 0.1, 1e-3)
    assert train.default_folder(cfg) == os.path.join("runs", "synthetic-l2-seed999-backbone=vbpr-tau=0.3")


@pytest.mark.parametrize("dist, align", [("l2", "solo"), ("mi", "solo"), ("none", "none"), ("none", "complete")])
def test_vbpr_scores_match_the_dense_formula(dist, align):
    ds, cfg, model, club, *_ = vbpr(dist, align)
    model.eval()  # no dropout, BatchNorm on its running statistics
    with torch.no_grad():
        users, items, aux = model()
        f = {m: getattr(model, f"feat_{m}") for m in MODALITIES}
        if align == "none" and dist == "none":  # MMRec's VBPR: [E_i | W [f_text | f_image] + c]
            feats = torch.cat([f["text"], f["image"]], 1) @ model.features.weight.T + model.features.bias
            assert not hasattr(model, "head")
        else:
            z = {}
            for m in MODALITIES:
                x = f[m] @ model.transform[m].weight.T + model.transform[m].bias  # [I, 64]
                h = x if align == "complete" else x[:, :32]  # the generic half (or all), through Linear BN ReLU Linear BN ReLU Linear
                for lin, bn in ((model.head[m][0], model.head[m][1]), (model.head[m][3], model.head[m][4])):
                    h = h @ lin.weight.T + lin.bias
                    h = ((h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias).clamp_min(0)
                h = h @ model.head[m][6].weight.T + model.head[m][6].bias
                z[m] = h / h.norm(dim=1, keepdim=True)
                torch.testing.assert_close(aux[m]["a"], x[:, :32])
                torch.testing.assert_close(aux[m]["b"], x[:, 32:])
            feats = torch.cat([z["text"], z["image"]], 1)
        want = model.user @ torch.cat([model.item, feats], 1).T  # [U, I]
        user = torch.arange(ds.n_users)
        torch.testing.assert_close(model.score(users, items, user), want, rtol=1e-5, atol=1e-5)
    model.train()  # VBPR+SAND: dropout 0.01 in training only (the released code also drops at evaluation)
    assert torch.equal(model()[0], model.user) == (dist == align == "none")  # MMRec's plain VBPR: no dropout


def test_vbpr_loss_is_bpr_plus_the_regulariser_when_both_auxiliary_terms_are_off():
    ds, cfg, model, club, *_ = vbpr("none", "none", dropout=0.0)
    user, pos, neg = (torch.from_numpy(ds.train[:300, 0]), torch.from_numpy(ds.train[:300, 1]),
                      torch.randint(ds.n_items, (300,)))
    loss, terms, pairs = model.loss(user, pos, neg, club)
    users, items, _ = model()
    u, i, j = users[user], items[pos], items[neg]
    bpr = -torch.log(torch.sigmoid((u * i).sum(1) - (u * j).sum(1))).mean()  # natural log, as MMRec's BPRLoss
    reg = (u.norm() + i.norm() + j.norm()) / 300  # MMRec's EmbLoss: norms, not squared, over the batch size
    torch.testing.assert_close(loss, bpr + 2.0 * reg)
    assert set(terms) == {"bpr", "reg"} and pairs is None
    loss, terms, pairs = vbpr("mi", "solo")[2].loss(user, pos, neg, club)  # VBPR+SAND: every term, CLUB pairs [2, I, 32]
    assert set(terms) == {"bpr", "reg", "solo", "club"} and pairs[0].shape == (2, ds.n_items, 32)


@pytest.mark.parametrize("dist, align", [("l2", "solo"), ("mi", "solo"), ("none", "none")])
def test_vbpr_learns_beats_most_popular_and_the_diagnostic_reads_its_parts(tmp_path, dist, align):
    ds = tiny()
    most_popular = train.most_popular(ds, torch.device("cpu"))["test"]["recall@20"]
    cfg = run_cfg(backbone="vbpr", dist=dist, align=align, epochs=60, batch_size=512, club_steps=5)
    results, _, _ = train.fit(cfg, ds, torch.device("cpu"), str(tmp_path), log=lambda *_: None)
    with open(tmp_path / "metrics.csv") as f:
        first = float(next(csv.DictReader(f))["valid_recall@20"])
    assert results["valid"]["recall@20"] > 1.1 * first
    shares = results["diagnostic"]["best"]["shares"]
    if align == "none":  # plain VBPR: one feature map of both modalities. On this data it stays below popularity
        assert set(shares) == {"features"} and min(shares["features"].values()) > 0.02  # some of every group
        assert "CKA" not in train.format_diagnostic(**results["diagnostic"])  # nothing to compare: no empty line
    else:  # VBPR+SAND beats popularity; each half carries its own modality's factors, not the other's
        assert results["test"]["recall@20"] > 1.15 * most_popular
        assert set(shares) == {f"{m} {p}" for m in MODALITIES for p in ("g", "u", "z")}
        assert shares["image u"]["image"] > 0.2 and abs(shares["image u"]["text"]) < 0.05
        assert "linear CKA: text g ~ image g" in train.format_diagnostic(**results["diagnostic"])
        assert set(results["diagnostic"]["best"]["cka"]) == {"text g ~ image g", "text z ~ image z", "text g ~ text u",
                                                             "image g ~ image u"}


# ---------------------------------------------------------------------------------------------
# The FREEDOM backbone (FREEDOM+SAND, and MMRec's FREEDOM itself)

def freedom(**kw):
    ds = tiny()
    cfg = run_cfg(backbone="freedom", **kw)
    return (ds, cfg, *train.build(cfg, ds, torch.device("cpu"), 0))


def test_freedom_defaults_are_the_authors_log_and_mmrecs_configuration():
    cfg = run_cfg(backbone="freedom")
    assert (cfg.train.lr, cfg.sand.edge_dropout, cfg.sand.reg_weight, cfg.sand.knn_k, cfg.sand.image_weight,
            cfg.sand.n_layers, cfg.sand.embed_dim, cfg.sand.head_dim, cfg.sand.align_dim, cfg.train.seed) == \
        (1e-3, 0.8, 0.0, 10, 0.1, 2, 64, 33, 63, 999)
    model = freedom()[2]
    heads = sum(p.numel() for p in model.head.parameters())
    assert heads == 2 * (32 * 33 + 33 + 2 * 33 + 33 * 33 + 33 + 2 * 33 + 33 * 63 + 63)  # the log's two ProjectHeads


@pytest.mark.parametrize("kw", [dict(dist="none", align="none", reg_weight=1e-3), dict(reg_weight=1e-3),
                                dict(dist="l2", align="complete"), dict(dist="mi", club_fit="intra", reg_weight=0.1)])
def test_freedom_loss_gradients_and_scores_match_the_dense_formula_on_both_tiers(kw):
    """MMRec's FREEDOM written out densely: LightGCN over the (pruned) user-item graph with the layers averaged, the
    items' one hop on the kNN graph, BPR with natural logs, reg_weight times the features' BPR, then SAND's terms."""
    ds, cfg, model, club, *_ = freedom(**kw)
    model.new_epoch(torch.Generator().manual_seed(0))  # a pruned graph
    s = cfg.sand
    with torch.no_grad():
        for p in club.parameters():
            p.add_(0.3 * torch.randn_like(p))
    user, pos = torch.from_numpy(ds.train[:300, 0]), torch.from_numpy(ds.train[:300, 1])
    neg, perms = torch.randint(ds.n_items, (300,)), torch.stack([torch.randperm(ds.n_items) for _ in range(2)])

    def dense(adj):
        hs = [torch.cat([model.user, model.item])]
        for _ in range(s.n_layers):
            hs.append(adj.to_dense() @ hs[-1])
        h = torch.stack(hs).mean(0)  # as MMRec: stack, then mean
        return h[:ds.n_users], h[ds.n_users:] + model.item_item.to_dense() @ model.item
    users, items = dense(model.train_adj)
    bpr = lambda rows: -F.logsigmoid((users[user] * rows[pos]).sum(1) - (users[user] * rows[neg]).sum(1)).mean()
    x = {m: model.feat[m] @ model.trs[m].weight.T + model.trs[m].bias for m in MODALITIES}
    want = bpr(items) + s.reg_weight * (bpr(x["text"]) + bpr(x["image"]))
    z = {m: F.normalize(model.head[m](x[m] if s.align == "complete" else x[m][:, :32]), dim=1)
         for m in MODALITIES} if s.align != "none" else None
    if z:
        logits = z["text"] @ z["image"].T / s.tau
        want = want + s.alpha * (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    if s.dist == "mi":
        want = want + s.ureg * sum(plain_club_bound(club, x[m][:, :32], x[m][:, 32:], p) for m, p in zip(("text", "image"), perms)) / 2
    if s.dist == "l2":
        want = want - s.w_l2 * sum(((x[m][:, :32] - x[m][:, 32:]) ** 2).mean() for m in MODALITIES) / 2
    params = [p for p in model.parameters()]
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    for model.fast in (False, True):
        model.train()
        loss = model.loss(user, pos, neg, club, perms)[0]
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        for (name, _), a, b in zip(model.named_parameters(), torch.autograd.grad(loss, params, allow_unused=True), g_want):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()) + 1e-9, msg=name)
        model.eval()  # evaluation: the whole graph, not this epoch's pruned one
        with torch.no_grad():
            users_e, items_e, _ = model(parts=False)
            want_u, want_i = dense(model.adj)
            torch.testing.assert_close(model.score(users_e, items_e, torch.arange(ds.n_users)), want_u @ want_i.T,
                                       rtol=1e-5, atol=1e-6)
    assert sand.tier_mismatch(s, {"image": 48, "text": 24}) is None


def test_freedom_prunes_its_graph_by_degree_anew_each_epoch_and_evaluates_on_the_whole_one():
    ds, cfg, model, *_ = freedom(edge_dropout=0.7)
    E, U, I = len(ds.train), ds.n_users, ds.n_items
    assert torch.equal(model.train_adj.to_dense(), model.adj.to_dense())  # before any epoch: the whole graph
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for _ in range(2):
        model.new_epoch(gen)
        a = model.train_adj.to_dense()
        graphs.append(a)
        kept = a[:U, U:] > 0  # [U, I] the kept train edges
        assert int(kept.sum()) == int(E * 0.3) and not (kept & ~torch.from_numpy(
            np.isin(np.arange(U * I), ds.train[:, 0] * I + ds.train[:, 1]).reshape(U, I))).any()  # train edges only
        deg_u, deg_i = kept.sum(1).double(), kept.sum(0).double()  # renormalised on the kept graph
        want = kept / torch.sqrt(deg_u[:, None] * deg_i[None, :]).clamp_min(1e-12)
        torch.testing.assert_close(a[:U, U:].double(), want * kept, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a[U:, :U], a[:U, U:].T)  # symmetric
    assert not torch.equal(graphs[0], graphs[1])  # a fresh draw each epoch
    # degree-sensitive: an edge between two rarely seen nodes is kept more often than one between two busy nodes
    w = sand.edge_values(torch.from_numpy(ds.train), U, I)
    lo, hi = int(w.argmax()), int(w.argmin())
    kept_count = {lo: 0, hi: 0}
    for _ in range(200):
        keep = torch.multinomial(w, int(E * 0.3), generator=gen)
        for e in kept_count:
            kept_count[e] += int((keep == e).any())
    assert kept_count[lo] > kept_count[hi]
    model.eval()  # evaluation uses the whole graph
    with torch.no_grad():
        hs = [torch.cat([model.user, model.item])]
        for _ in range(2):
            hs.append(model.adj.to_dense() @ hs[-1])
        torch.testing.assert_close(model(parts=False)[0], torch.stack(hs).mean(0)[:U])
    state = gen.get_state()  # --edge-dropout 0: the whole graph, and nothing drawn
    model0 = freedom(edge_dropout=0.0)[2]
    model0.new_epoch(gen)
    assert torch.equal(gen.get_state(), state) and torch.equal(model0.train_adj.to_dense(), model0.adj.to_dense())


def test_freedom_and_freedom_sand_at_reg_weight_0_give_the_same_scores(tmp_path):
    # at reg_weight 0 the modality features reach no prediction: SAND's terms train them, and nothing else
    base = tiny_run(tmp_path, backbone="freedom", epochs=3)
    runs = {}
    for name, kw in (("freedom", dict(dist="none", align="none")), ("sand mi", {}), ("sand l2", dict(dist="l2")),
                     ("sand reg", dict(reg_weight=0.1))):
        settings = {k: v for k, v in {**base, **kw}.items() if not (k == "club_steps" and kw.get("dist", "mi") != "mi")}
        train.run(run_cfg(**settings, out=str(tmp_path / name)), log=quiet)
        runs[name] = ([{k: v for k, v in r.items() if "recall" in k or "ndcg" in k} for r in rows_of(tmp_path / name / "metrics.csv")],
                      (tmp_path / name / "topk.tsv").read_text(), torch.load(tmp_path / name / "best.pt", weights_only=True)["model"])
    for name in ("sand mi", "sand l2"):
        assert runs[name][:2] == runs["freedom"][:2], name  # every epoch's metrics, the top 20 of every test user
        assert all(torch.equal(runs[name][2][k], runs["freedom"][2][k]) for k in ("user", "item"))
    assert runs["sand reg"][0] != runs["freedom"][0]  # the control: at reg_weight 0.1 SAND's terms do reach the scores


def test_freedom_learns_and_its_ablation_and_diagnostic_read_its_parts(tmp_path):
    ds = tiny()
    popular = train.most_popular(ds, torch.device("cpu"))["test"]["recall@20"]
    results = train.fit(run_cfg(backbone="freedom", epochs=25, batch_size=512, club_steps=5, reg_weight=0.01), ds,
                        torch.device("cpu"), str(tmp_path / "run"), log=quiet)[0]
    assert results["valid"]["recall@20"] > 1.2 * float(rows_of(tmp_path / "run" / "metrics.csv")[0]["valid_recall@20"])
    assert results["test"]["recall@20"] > 1.05 * popular
    shares = results["diagnostic"]["best"]["shares"]
    assert set(shares) == {f"{m} {p}" for m in MODALITIES for p in ("g", "u", "z")}
    _, runs, _ = train.grid_runs(run_cfg(backbone="freedom", ablation=True, seeds=1, reg_weight=0.01), train.ABLATIONS)
    assert [(r.cfg.sand.dist, r.cfg.sand.align) for r in runs] == [(c["dist"], c["align"]) for _, _, c in train.ABLATIONS]
    assert all(r.cfg.sand.reg_weight == 0.01 and r.cfg.train.lr == 1e-3 for r in runs)


# ---------------------------------------------------------------------------------------------
# Runs end to end

def quick_fit(tmp_path, epochs=3, **kw):
    cfg = run_cfg(epochs=epochs, batch_size=512, club_steps=5, **kw)
    out = tmp_path / "run"
    return train.fit(cfg, tiny(), torch.device("cpu"), str(out), log=quiet)[0], out


def test_seeded_run_is_repeatable(tmp_path):
    a, _ = quick_fit(tmp_path / "a")
    b, _ = quick_fit(tmp_path / "b")
    c, _ = quick_fit(tmp_path / "c", seed=1)
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    assert a["test"] != c["test"]


def test_a_plain_run_logs_the_same_loss_terms(tmp_path):
    rows = {}
    for plain in (False, True):
        _, out = quick_fit(tmp_path / str(plain), epochs=1, plain=plain, club_fit="intra")  # intra: the bound is > 0
        rows[plain] = rows_of(out / "metrics.csv")[0]
    for term in ("bpr", "solo", "club", "club_nll"):
        fast, plain = float(rows[False][term]), float(rows[True][term])
        assert fast != 0 and plain == pytest.approx(fast, rel=1e-5), term  # 4 significant digits, and more
    assert rows[False]["valid_recall@20"] == rows[True]["valid_recall@20"]


def test_training_step_is_bitwise_deterministic_on_cpu():
    # a gather's backward (users[idx]) accumulates with parallel atomic adds on CPU, so its gradients
    # change from run to run in the last bits; F.embedding's backward does not
    ds = data.load_dataset("synthetic")
    grads = []
    for _ in range(4):
        model, club, _, _ = train.build(run_cfg(), ds, torch.device("cpu"), 0)
        gen = torch.Generator().manual_seed(0)
        user, pos, neg, perms = train.BPRSampler(torch.from_numpy(ds.train), ds.n_items, gen).epoch(2048, 2)[0]
        loss, _, _ = model.loss(user, pos, neg, club, perms)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_early_stopping_follows_mmrec():
    # valid R@20 is rounded to 4 decimals and must strictly beat the best; the run stops once more
    # than `patience` epochs in a row have not (MMRec's utils.early_stopping): patience 2 stops at the 3rd
    best, bad, seen = -1.0, 0, []
    for epoch, score in enumerate([0.1, 0.12, 0.12, 0.11, 0.12004, 0.1204, 0.1, 0.3], 1):
        best, bad, improved = train.early_stopping(score, best, bad)
        seen.append(improved)
        if bad > 2:
            break
    assert epoch == 5 and best == 0.12 and seen == [True, True, False, False, False]


def test_cuda_device_number_is_checked_and_profiling_syncs_that_device(monkeypatch):
    # no GPU here: stand in torch's answers for a machine with one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert train.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(train.UsageError, match=re.escape("--device cuda:1: this machine has 1 CUDA GPU(s)")):
        train.resolve_device("cuda:1")
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    timer = train.Timer(torch.device("cuda:1"), sync=True)
    timer.lap("forward")
    assert synced == [torch.device("cuda:1")] and set(timer.total) == {"forward"}


def test_a_diverging_run_stops_cleanly(tmp_path):
    # lr 1e30 sends the weights to inf in the first steps: the run stops and writes its files, and neither the
    # planted-factor diagnostic nor the top-k file touches the diverged weights
    lines = []
    results = train.run(run_cfg(**tiny_run(tmp_path, epochs=3, lr=1e30, out=str(tmp_path / "run"))), log=lines.append)
    assert results["best_epoch"] is None and results["test"] is None and results["epochs_run"] == 0
    assert any(line.startswith("epoch 1: a loss or a weight is not finite") and line.endswith("no epoch finished")
               for line in lines)
    assert lines[-1] == f"no epoch finished: {tmp_path / 'run'}/results.json holds no metrics"
    assert not (tmp_path / "run" / "topk.tsv").exists() and (tmp_path / "run" / "results.json").is_file()
    results = train.fit(run_cfg(epochs=2, batch_size=512, club_steps=2, lr=1e30), tiny(), torch.device("cpu"),
                        str(tmp_path / "builtin"), log=quiet)[0]  # a built-in dataset, with the diagnostic
    assert results["best_epoch"] is None and "diagnostic" not in results


def test_a_model_whose_weights_are_no_longer_finite_is_never_the_best_epoch(tmp_path):
    # lr 1e38: the last steps of epoch 1 make the weights inf or NaN after its loss was already finite
    out, lines = tmp_path / "run", []
    results = train.run(run_cfg(**tiny_run(tmp_path, dist="none", lr=1e38, epochs=3, out=str(out))), log=lines.append)
    assert results["best_epoch"] is None and results["diverged"] and results["test"] is None
    assert not (out / "best.pt").exists() and any("a loss or a weight is not finite" in line for line in lines)


def test_a_run_with_no_finished_epoch_exits_1(tmp_path, monkeypatch, capsys):
    base = tiny_run(tmp_path, lr=1e30, epochs=2)
    code, err = cli(["--dataset", "tiny", "--data-dir", base["data_dir"], "--lr", "1e30", "--epochs", "2",
                     "--club-steps", "2", "--out", tmp_path / "run"], tmp_path, monkeypatch, capsys)
    assert code == 1 and err == "" and json.loads((tmp_path / "run" / "results.json").read_text())["diverged"]


def test_cli_runs_an_mmrec_folder_as_users_write_it(tmp_path):
    ds = tiny()
    ds.name = "baby"  # data/baby/ in MMRec's format, under the working directory
    data.write_mmrec(ds, str(tmp_path / "data"))
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--dataset", "baby", "--dist", "l2",
                        "--epochs", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "runs" / "baby-l2-seed999-epochs=1" / "results.json").read_text())
    assert results["dataset"]["n_items"] == ds.n_items and results["best_epoch"] == 1
    assert "diagnostic" not in results  # no planted factors in a folder dataset


def test_progress_shows_on_a_terminal_and_piped_output_is_one_line_per_epoch(tmp_path):
    base = tiny_run(tmp_path)
    cmd = lambda out: [sys.executable, os.path.join(HERE, "train.py"), "--dataset", "tiny", "--data-dir", base["data_dir"],
                       "--epochs", "2", "--batch-size", "256", "--dist", "l2", "--device", "cpu", "--out", str(tmp_path / out)]
    master, slave = pty.openpty()  # a terminal, as a user's shell gives
    p = subprocess.Popen(cmd("tty"), stdout=slave, stderr=subprocess.PIPE, cwd=tmp_path)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closes with the program
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    for step in ("loading tiny ...", "checking the fast paths against the plain code ...",
                 "building the item-item kNN graph of", "training: batch 1/", "s left in this epoch"):
        assert step in shown, step
    piped = subprocess.run(cmd("piped"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert piped.returncode == 0 and "\r" not in piped.stdout and "batch" not in piped.stdout
    # on the terminal, what stays on screen (the text after the last carriage return of each line) is the piped output
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in shown.rstrip("\n").split("\n")]  # not splitlines(): it splits at \r too
    strip = lambda lines: [re.sub(r"\d+\.\d+ ?s|tty|piped", "", line) for line in lines]
    assert strip(kept) == strip(piped.stdout.splitlines())
    assert sum(line.startswith("epoch ") for line in piped.stdout.splitlines()) == 2


def test_default_run_folder_names_every_setting_off_its_default():
    assert train.default_folder(run_cfg()) == os.path.join("runs", "synthetic-mi-seed999")
    # settings that change the results are named; where and how it runs is not
    cfg = run_cfg(dist="l2", seed=3, alpha=0.1, lr=1e-3, club_fit="intra", device="cpu", profile=True, data_dir="x")
    assert train.default_folder(cfg) == os.path.join("runs", "synthetic-l2-seed3-club_fit=intra-alpha=0.1-lr=0.001")
    assert train.default_folder(run_cfg(alpha=0.2)) != train.default_folder(run_cfg(alpha=0.1))
    # a grid names the settings it lists, and its runs' folders name their points and seeds
    assert train.default_folder(cfg, train.ABLATIONS) == os.path.join("runs", "ablation-synthetic-alpha=0.1-lr=0.001")
    cfg.train.grid = ("alpha=0.1,0.2", "tau=0.3")
    assert train.default_folder(cfg, train.grid_points(cfg.train.grid)) == os.path.join(
        "runs", "grid-synthetic-alpha-tau-dist=l2-club_fit=intra-lr=0.001")


def test_cli_end_to_end_writes_all_files_and_evaluates_its_best_epoch_again(tmp_path):
    out = tmp_path / "new" / "run"  # a folder that does not exist yet
    run = lambda *args: subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *map(str, args)],
                                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    r = run("--dataset", "synthetic", "--epochs", "2", "--club-steps", "2", "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {".lock", *train.RUN_FILES}
    config = json.loads((out / "config.json").read_text())
    assert config["sand"]["dist"] == "mi" and config["train"]["seed"] == 999 and "torch" in config["environment"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    assert len(rows_of(out / "metrics.csv")) == 2
    header, *rows = [line.split("\t") for line in (out / "topk.tsv").read_text().splitlines()]  # at the best epoch
    ds = data.load_dataset("synthetic")
    assert header == ["userID"] + [f"item{r}" for r in range(1, 21)]
    assert sorted(int(row[0]) for row in rows) == sorted(np.unique(ds.test[:, 0])) and all(len(row) == 21 for row in rows)
    train_of = {(u, i) for u, i in ds.train.tolist()}
    assert not any((int(row[0]), int(i)) in train_of for row in rows for i in row[1:])
    for target in (out, out / "best.pt"):  # the best epoch's weights give the best epoch's metrics again
        r = run("--eval-only", target)
        assert r.returncode == 0, r.stderr
        evaluated = json.loads(r.stdout)
        assert evaluated["epoch"] == results["best_epoch"]
        assert evaluated["test"] == pytest.approx(results["test"], abs=1e-12)
        assert evaluated["valid"] == pytest.approx(results["valid"], abs=1e-12)
    r = run("--resume", out / "best.pt")
    assert r.returncode == 2 and "holds only the best epoch's weights; resume the run folder" in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("dist", ["mi", "l2", "none"])
def test_training_learns_and_beats_most_popular(tmp_path, dist):
    ds = tiny()
    most_popular = train.most_popular(ds, torch.device("cpu"))["test"]["recall@20"]
    assert most_popular > 0.15  # a real bar: popularity alone finds many test items on this data
    cfg = run_cfg(dist=dist, epochs=20, lr=1e-3, batch_size=512)
    results, _, _ = train.fit(cfg, ds, torch.device("cpu"), str(tmp_path), log=quiet)
    first = float(rows_of(tmp_path / "metrics.csv")[0]["valid_recall@20"])
    assert results["valid"]["recall@20"] > 1.2 * first
    assert results["test"]["recall@20"] > 1.3 * most_popular


# ---------------------------------------------------------------------------------------------
# Ablation grid and the unique-information diagnostic

def test_explained_share_is_least_squares_written_out_and_the_shares_add_up():
    rng = np.random.default_rng(0)
    n = 4000
    groups = {g: rng.standard_normal((n, 4)) for g in ("generic", "image", "text")}
    # a part made of the generic factors (weight 2) and the image ones (weight 1) and noise (weight 1)
    part = 2 * groups["generic"] @ rng.standard_normal((4, 6)) + groups["image"] @ rng.standard_normal((4, 6)) \
        + rng.standard_normal((n, 6)) + 3.0
    perm = rng.permutation(n)
    fit_rows, new_rows = perm[:n // 2], perm[n // 2:]
    got = train.explained_share(torch.from_numpy(part).float(), groups, torch.from_numpy(fit_rows), torch.from_numpy(new_rows))
    for g, f in groups.items():  # the formula, by numpy: affine least squares on the fitting rows, R^2 on the others
        design = np.hstack([f, np.ones((n, 1))])
        coef = np.linalg.lstsq(design[fit_rows], part[fit_rows].astype(np.float32).astype(np.float64), rcond=None)[0]
        p_new = part[new_rows].astype(np.float32).astype(np.float64)
        want = 1 - ((p_new - design[new_rows] @ coef) ** 2).sum() / ((p_new - p_new.mean(0)) ** 2).sum()
        assert got[g] == pytest.approx(want, abs=1e-9), g
    assert 0.55 < got["generic"] < 0.85 and 0.1 < got["image"] < 0.35 and abs(got["text"]) < 0.01
    together = train.explained_share(torch.from_numpy(part), {"all": np.hstack(list(groups.values()))},
                                     torch.from_numpy(fit_rows), torch.from_numpy(new_rows))["all"]
    # independent groups: the shares add up (held out, each falls short by about its fit's estimation error)
    assert sum(got.values()) == pytest.approx(together, abs=0.02)


def test_linear_cka_is_the_hsic_formula_and_sees_rotations_not_unrelated_parts():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 5, generator=gen, dtype=torch.float64), torch.randn(300, 7, generator=gen, dtype=torch.float64)
    h = torch.eye(300, dtype=torch.float64) - 1 / 300  # centring
    k, l = h @ x @ x.T @ h, h @ (x @ torch.randn(5, 7, generator=gen, dtype=torch.float64) + y) @ (
        x @ torch.randn(5, 7, generator=gen, dtype=torch.float64) + y).T @ h
    hsic = lambda a, b: float(torch.trace(a @ b))
    mixed = x @ torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert train.linear_cka(x, x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    assert train.linear_cka(x, 3 * x @ q + 2) == pytest.approx(1.0)  # rotation, scale, shift
    assert train.linear_cka(x, y) < 0.05  # unrelated, few columns for the rows
    k, l = h @ x @ x.T @ h, h @ mixed @ mixed.T @ h
    assert train.linear_cka(x, mixed) == pytest.approx(hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l)))


def hand_built(model, ds, generic_first):
    """The model with each modality's transform set so that the generic half X_m[:, :h] is a random linear map
    of the decoded generic factors only and the unique half one of the modality's own unique factors only (or
    the other way round): a model whose split separates exactly as SAND claims (or its mirror image)."""
    with torch.no_grad():
        for m in MODALITIES:
            f = torch.from_numpy(getattr(ds, m)).double()
            targets = [torch.from_numpy(ds.factors[g]).double() for g in ("generic", m)]
            lin = model.transform[m]
            d, h = lin.weight.shape[0], lin.weight.shape[0] // 2
            fc = f - f.mean(0)
            maps = [torch.linalg.lstsq(fc, t - t.mean(0)).solution for t in targets]  # [d, k]: features -> factors
            if not generic_first:
                maps.reverse()
            gen = torch.Generator().manual_seed(1)
            w = torch.cat([maps[0] @ torch.randn(maps[0].shape[1], h, generator=gen, dtype=torch.float64),
                           maps[1] @ torch.randn(maps[1].shape[1], d - h, generator=gen, dtype=torch.float64)], 1)
            lin.weight.copy_(w.T)
            lin.bias.copy_(-(f.mean(0) @ w))
    return model


def test_the_diagnostic_tells_a_separated_split_from_a_random_one_and_a_swapped_one():
    """The controls: a hand-built model whose halves carry exactly one factor group each scores about (1, 0) and
    (0, 1); a randomly initialised one scores each group's share of the features; one with its halves swapped
    scores the mirror image. On the built-in data the three are far apart."""
    ds = data.load_dataset("synthetic")
    cfg = run_cfg(dist="l2")
    fresh = lambda: train.build(cfg, ds, torch.device("cpu"), 0)[0]
    got = {name: train.diagnostic(model, ds.factors) for name, model in (
        ("random", fresh()), ("separated", hand_built(fresh(), ds, True)), ("swapped", hand_built(fresh(), ds, False)))}
    n = ds.n_items
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for m, other in (("image", "text"), ("text", "image")):
        features = train.explained_share(torch.from_numpy(getattr(ds, m)), ds.factors, perm[:n // 2], perm[n // 2:])
        assert 0.3 < features["generic"] < 0.5 and 0.3 < features[m] < 0.5 and abs(features[other]) < 0.03
        sep, rand, swap = (got[k]["shares"] for k in ("separated", "random", "swapped"))
        for half, group, mirror in ((" g", "generic", m), (" u", m, "generic")):
            for part in (m + half, m + {" g": " a", " u": " b"}[half]):  # the half, and its distancing projection
                assert sep[part][group] > 0.9 and abs(sep[part][mirror]) < 0.03, (part, sep[part])
                assert swap[part][mirror] > 0.9 and abs(swap[part][group]) < 0.03, (part, swap[part])
                for g in ("generic", m):  # random: in proportion to each group's variance in the features
                    assert rand[part][g] == pytest.approx(features[g], abs=0.1), (part, g, rand[part])
                # the three cases apart by a wide margin in the group the part should carry
                assert sep[part][group] - rand[part][group] > 0.4 and rand[part][group] - swap[part][group] > 0.3
                assert all(abs(case[part][other]) < 0.03 for case in (sep, rand, swap))  # the control group: nothing
        assert abs(sep[m + " z"][m]) < 0.05 and sep[m + " z"]["generic"] > 0.3  # z reads the generic half only
    cka = {k: v["cka"] for k, v in got.items()}
    assert cka["separated"]["text g ~ image g"] > 0.8 > 0.5 > cka["random"]["text g ~ image g"]
    assert cka["separated"]["image a ~ image b"] < 0.05 < 0.3 < cka["random"]["image a ~ image b"]


def test_ablation_grid_writes_its_tables_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(data.BUILTIN, "tiny", TINY)  # built in: its planted factors give the diagnostic tables
    cfg = run_cfg(dataset="tiny", epochs=1, seeds=2, batch_size=1024, club_steps=2, out=str(tmp_path), ablation=True)
    rows = train.run(cfg, log=quiet)
    assert len(rows) == 2 * len(train.ABLATIONS) == 14
    with open(tmp_path / "ablation.csv") as f:
        assert len(list(csv.DictReader(f))) == 14
    table = (tmp_path / "ablation.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    assert [line.split(" | ")[0][2:].replace(" (chosen)", "") for line in body] == [p[1] for p in train.ABLATIONS]
    assert all(line.count(" ± ") == 8 for line in body) and "on `tiny`" in table
    assert "| most popular (train counts, no training) | 0." in table
    chosen = json.loads((tmp_path / "ablation.json").read_text())["chosen"]
    assert chosen["point"] in [p[0] for p in train.ABLATIONS] and len(chosen["runs"]) == 2
    results = json.loads((tmp_path / "neither-seed1000" / "results.json").read_text())
    assert results["diagnostic"]["best"]["shares"]["image u"].keys() == {"generic", "image", "text"}
    complete = json.loads((tmp_path / "complete-seed999" / "config.json").read_text())["sand"]
    assert (complete["align"], complete["dist"]) == ("complete", "none")
    # the diagnostic's table: each cell the mean over the point's seeds, at initialisation -> at the best epoch
    diag = [json.loads((tmp_path / f"l2-seed{s}" / "results.json").read_text())["diagnostic"] for s in (999, 1000)]
    row = next(line for line in table.splitlines() if line.startswith("| SAND, --dist l2 | b_m |"))
    want = [np.mean([d[when]["shares"][f"{m} b"][m] for d in diag for m in MODALITIES]) for when in ("init", "best")]
    assert row.split(" | ")[3] == f"{want[0]:.2f} -> {want[1]:.2f}"  # own unique: image b's image share, text b's text
    cka_row = [line for line in table.splitlines() if line.startswith("| complete alignment")][-1]  # the last table's
    cells = cka_row.rstrip(" |").split(" | ")
    assert cells[1:].count("-") == 1 and sum("->" in c for c in cells) == 3  # no distancing pairs: CKA of its halves
    config = json.loads((tmp_path / "neither-seed1000" / "config.json").read_text())
    assert (config["sand"]["dist"], config["sand"]["align"], config["train"]["seed"]) == ("none", "none", 1000)

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(train, "fit", no_training)
    assert train.run(cfg, log=quiet) == rows


def test_grid_runs_the_product_writes_three_files_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    base = tiny_run(tmp_path, epochs=2, seeds=2, out=str(tmp_path / "grid"), grid=("alpha=0.012,0.5", "lr=1e-4,1e-3"))
    real, real_epoch, calls, epochs = train.fit, train.train_epoch, [], []

    def fit(cfg, ds, device, out, resume=None, **kw):
        calls.append((cfg.sand.alpha, cfg.train.lr, cfg.train.seed, resume and resume["epoch"]))
        return real(cfg, ds, device, out, resume, **kw)

    def interrupted_in_the_third_runs_second_epoch(*args):
        epochs.append(1)
        if len(epochs) == 6:  # two epochs each for two runs, then one
            raise KeyboardInterrupt
        return real_epoch(*args)
    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(train, "train_epoch", interrupted_in_the_third_runs_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run(run_cfg(**base), log=lambda *_: None)
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    calls.clear()
    rows = train.run(run_cfg(**base), log=lambda *_: None)
    # the product in the order listed, each point for seeds 999 and 1000; the two finished runs read back,
    # the interrupted one resumed after its first epoch
    assert [(r["point"], r["seed"]) for r in rows] == [(f"alpha={a}-lr={lr}", s) for a in (0.012, 0.5)
                                                       for lr in (0.0001, 0.001) for s in (999, 1000)]
    assert calls == ([(0.012, 0.001, 999, 1), (0.012, 0.001, 1000, None)]
                     + [(0.5, lr, s, None) for lr in (1e-4, 1e-3) for s in (999, 1000)])
    out = tmp_path / "grid"
    with open(out / "grid.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {"valid_recall@20", "test_recall@20", "best_epoch", "seed"} <= set(table[0])
    md = (out / "grid.md").read_text()
    assert md.count(" ± ") == 1 + 4 * 8 and "| --alpha 0.5 --lr 0.001" in md  # the header says "mean ± sample std"
    chosen = json.loads((out / "grid.json").read_text())["chosen"]
    means = {}
    for r in table:
        means.setdefault(r["point"], []).append(float(r["valid_recall@20"]))
    best = max(means, key=lambda p: np.mean(means[p]))
    settings = {f"alpha={a}-lr={lr}": {"alpha": a, "lr": lr} for a in (0.012, 0.5) for lr in (0.0001, 0.001)}
    assert chosen["point"] == best and chosen["settings"] == settings[best]
    assert chosen["valid"]["recall@20"] == pytest.approx(np.mean(means[best]))
    assert chosen["runs"] == [str(out / f"{best}-seed{s}") for s in (999, 1000)]
    config = json.loads((out / "alpha=0.5-lr=0.001-seed1000" / "config.json").read_text())
    assert (config["sand"]["alpha"], config["train"]["lr"], config["train"]["seed"]) == (0.5, 0.001, 1000)


def fake_results(valid, test, diverged=False):
    metrics = lambda v: {m: v for m in train.METRICS}
    return {"best_epoch": 1, "valid": metrics(valid), "test": metrics(test), "diverged": diverged}


def test_grid_chooses_by_valid_never_by_test_and_skips_a_point_that_diverged(tmp_path, monkeypatch):
    # point tau=0.1: best valid, worst test; tau=0.3: best test; tau=0.5: the best valid of all, but one run diverged
    made = {0.1: (0.30, 0.10), 0.2: (0.20, 0.20), 0.3: (0.10, 0.40), 0.5: (0.50, 0.50)}
    monkeypatch.setattr(train, "fit", lambda cfg, *a, **k: (
        fake_results(*made[cfg.sand.tau], diverged=cfg.sand.tau == 0.5 and cfg.train.seed == 1000), None, None))
    base = tiny_run(tmp_path)
    lines = []
    train.run(run_cfg(**base, grid=("tau=0.1,0.2,0.3,0.5",), seeds=2, out=str(tmp_path)), log=lines.append)
    chosen = json.loads((tmp_path / "grid.json").read_text())["chosen"]
    assert chosen["settings"] == {"tau": 0.1} and chosen["test"]["recall@20"] == pytest.approx(0.10)
    md = (tmp_path / "grid.md").read_text()
    assert "| --tau 0.1 (chosen) |" in md and "| --tau 0.5 (diverged in 1 runs) |" in md
    assert "tau=0.5 seed 1000: best epoch 1, diverged, test" in "\n".join(lines)
    made = {0.1: (0.2, 0.1), 0.2: (0.2, 0.3)}  # a tie on valid: the point listed first
    train.run(run_cfg(**base, grid=("tau=0.2,0.1",), seeds=1, out=str(tmp_path / "tie")), log=quiet)
    assert json.loads((tmp_path / "tie" / "grid.json").read_text())["chosen"]["settings"] == {"tau": 0.2}


@pytest.mark.parametrize("words, expect", [
    (["lamda=0.1"], "--grid 'lamda=0.1' is not SETTING=V1,V2,... with one of the settings that change results: backbone, dist,"),
    (["alpha"], "--grid 'alpha' is not SETTING=V1,V2,..."),
    (["alpha=0.1,x"], "--grid alpha=x: 'x' is not a float"),
    (["club_steps=5,2.5"], "--grid club_steps=2.5: '2.5' is not an int"),
    (["dist=mi,cos"], "--grid dist=cos: choose from mi, l2, none"),
    (["alpha=0.1", "alpha=0.2"], "--grid lists alpha twice"),
    (["alpha=0.1", "--grid", "alpha=0.2"], "--grid lists alpha twice"),  # --grid given twice: the lists add up
    (["tau=0.2,0"], "grid point tau=0.0: --tau must be above 0 (got 0.0)"),
    (["seed=1,2"], "--grid 'seed=1,2' is not SETTING=V1,V2,..."),  # seeds come from --seeds
    (["alpha=0.1,0.10"], "--grid alpha=0.1,0.10: alpha 0.1 is listed twice; one point is one point"),
])
def test_a_bad_grid_is_refused_with_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, words, expect):
    one_line_error(["--grid", *words, "--out", tmp_path / "g"], tmp_path, monkeypatch, capsys, expect)
    assert not (tmp_path / "g").exists()


def test_a_grid_given_twice_runs_the_product_of_both_lists(tmp_path, monkeypatch):
    args = train.parser().parse_args(["--grid", "alpha=0.1,0.2", "--grid", "tau=0.3", "--seeds", "1"])
    cfg = train.config_from_args(args)
    assert cfg.train.grid == ("alpha=0.1,0.2", "tau=0.3")
    assert [key for key, _, _ in train.grid_points(cfg.train.grid)] == ["alpha=0.1-tau=0.3", "alpha=0.2-tau=0.3"]


def test_a_grid_of_too_many_runs_is_refused_at_once_and_a_grid_says_what_it_will_run(tmp_path, monkeypatch, capsys):
    one_line_error(["--grid", "alpha=" + ",".join(str(0.001 * k) for k in range(1, 11)), "--seeds", "10000"],
                   tmp_path, monkeypatch, capsys, "--grid of 10 points x 10000 seeds is 100,000 runs, more than 10,000")
    one_line_error(["--ablation", "--seeds", "1000000"], tmp_path, monkeypatch, capsys, "--seeds must be at most 10000")
    lines = []
    train.run(run_cfg(**tiny_run(tmp_path, epochs=1), grid=("alpha=0.1,0.2",), seeds=2, out=str(tmp_path / "g")),
              log=lines.append)
    assert f"--grid: 2 points x 2 seeds = 4 runs in {tmp_path / 'g'}/" in lines


# ---------------------------------------------------------------------------------------------
# Run folders: nothing lost, nothing mixed; a resumed run equals an uninterrupted one

def interrupt_at(monkeypatch, epoch):
    """Make train_epoch raise KeyboardInterrupt (as Ctrl-C would) when epoch `epoch` of the next run starts."""
    real, calls = train.train_epoch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(train, "train_epoch", real)


@pytest.mark.parametrize("backbone, extra", [("dragon", {}), ("vbpr", {}), ("vbpr", {"eval_dropout": True}),
                                             ("freedom", {}), ("freedom", {"dist": "l2", "reg_weight": 0.1}),
                                             ("dragon", {"resume_as": "last.pt"})])
def test_a_resumed_run_equals_an_uninterrupted_one_on_every_backbone(tmp_path, monkeypatch, backbone, extra):
    # VBPR+SAND draws its dropout (0.01) from torch's global generator, which the checkpoint saves with the rest
    resume_as = extra.pop("resume_as", "")
    base = tiny_run(tmp_path, backbone=backbone, epochs=4, **extra)
    whole = train.run(run_cfg(**base, out=str(tmp_path / "whole")), log=quiet)
    restore = interrupt_at(monkeypatch, 3)
    lines, out = [], tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train.run(run_cfg(**base, out=str(out)), log=lines.append)
    assert lines[-1] == f"interrupted: --resume {out} continues after epoch 2"
    assert not (out / "results.json").exists()  # only a finished run has one
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2  # the last finished epoch, written on interruption
    assert len(rows_of(out / "metrics.csv")) == 2  # epochs 1 and 2, complete
    restore()
    resumed = train.run(run_cfg(resume=str(out / resume_as)), log=quiet)  # the folder, or its last.pt
    assert same_results(resumed, whole) and rows_of(out / "metrics.csv") == rows_of(tmp_path / "whole" / "metrics.csv")
    assert (out / "topk.tsv").read_text() == (tmp_path / "whole" / "topk.tsv").read_text()


@pytest.mark.parametrize("common, part, more", [
    ({}, {"epochs": 2}, {"epochs": 4}),  # a run extended by --epochs
    # lr 1e-9 keeps valid Recall@20 the same, so that with --patience 0 the run stops after epoch 2
    ({"lr": 1e-9}, {"patience": 0}, {"patience": 2}),  # a run that stopped early, extended by --patience
])
def test_resume_with_more_epochs_or_patience_extends_a_run_exactly(tmp_path, common, part, more):
    base = tiny_run(tmp_path, club_steps=5, epochs=4, **common)
    whole = train.run(run_cfg(**{**base, **more, "out": str(tmp_path / "whole")}), log=quiet)
    first = train.run(run_cfg(**{**base, **part, "out": str(tmp_path / "part")}), log=quiet)
    assert first["epochs_run"] == 2 and whole["epochs_run"] == 4
    lines = []
    resumed = train.run(run_cfg(resume=str(tmp_path / "part"), **more), log=lines.append)
    assert f"resuming {tmp_path / 'part'}/ after epoch 2 (--epochs 4, --patience {more.get('patience', 20)})" in lines
    assert same_results(resumed, whole)
    saved = json.loads((tmp_path / "part" / "config.json").read_text())  # the resumed run's configuration
    assert {k: saved["train"][k] for k in more} == more and saved["train"]["batch_size"] == 512


def test_resume_refuses_a_smaller_patience_or_fewer_epochs_than_the_run_has_had(tmp_path):
    # a run trained 6 epochs at --patience 1000 is not a run at --patience 3: that one would have stopped sooner
    out = tmp_path / "run"
    train.run(run_cfg(**tiny_run(tmp_path, epochs=6, patience=1000, out=str(out))), log=quiet)
    before = files_of(out)
    for kw, expect in (({"patience": 3}, "--patience 3 is below the run's 1000, which might have stopped it sooner"),
                       ({"epochs": 5}, "--epochs 5: the run has trained 6 epochs already")):
        with pytest.raises(train.UsageError, match=re.escape(expect)):
            train.run(run_cfg(resume=str(out), **kw), log=quiet)
    assert files_of(out) == before
    lines = []
    assert train.run(run_cfg(resume=str(out), epochs=6, patience=1000), log=lines.append)["epochs_run"] == 6  # the same
    assert f"resuming {out}/ after epoch 6 (--epochs 6, --patience 1000): it has already stopped" in lines


def test_resume_and_eval_only_take_only_the_flags_that_may_change(tmp_path):
    out = tmp_path / "run"
    train.run(run_cfg(**tiny_run(tmp_path, dist="l2", epochs=1, out=str(out))), log=quiet)
    before = files_of(out)
    for mode, kw, name in (("resume", {"lr": 0.5}, "--lr"), ("resume", {"dist": "l2"}, "--dist"),  # even its own value
                           ("resume", {"out": str(out)}, "--out"), ("eval_only", {"dist": "mi"}, "--dist"),
                           ("eval_only", {"epochs": 3}, "--epochs")):
        with pytest.raises(train.UsageError, match=re.escape(f"{name} cannot be given with {train.flag(mode)}, which "
                                                             f"keeps the run's settings")):
            train.run(run_cfg(**{mode: str(out)}, **kw), log=quiet)
    assert files_of(out) == before
    metrics = train.run(run_cfg(eval_only=str(out), device="cpu"), log=quiet)  # a flag that may change
    assert set(metrics) == {"valid", "test"}
    began = json.loads((out / "config.json").read_text())
    assert train.run(run_cfg(resume=str(out), epochs=2, device="cpu", profile=True), log=quiet)["epochs_run"] == 2
    config = json.loads((out / "config.json").read_text())  # how the run began, and each resume
    assert config["environment"] == began["environment"] and len(config["resumed"]) == 1 and began["resumed"] == []
    assert config["train"]["epochs"] == 2 and config["train"]["out"] == str(out) and config["run"] == began["run"]
    last = torch.load(out / "last.pt", weights_only=True)  # made on another kind of device: a CUDA generator's state
    torch.save({**last, "generators": [torch.zeros(16, dtype=torch.uint8)] * 2}, out / "last.pt")
    with pytest.raises(train.UsageError, match="the run was made on another kind of device"):
        train.run(run_cfg(resume=str(out), epochs=3), log=quiet)
    torch.save(last, out / "last.pt")
    for ckpt in ("best.pt", "last.pt"):  # a resumed run's checkpoints are evaluated and resumed again
        assert set(train.run(run_cfg(eval_only=str(out / ckpt)), log=quiet)) == {"valid", "test"}
    assert train.run(run_cfg(resume=str(out), epochs=3), log=quiet)["epochs_run"] == 3


def change_in_place(tmp_path, shape_too=False):
    """Edit the tiny dataset on disk: one feature value (same shape), or drop a test row (other sizes)."""
    folder = tmp_path / "data" / "tiny"
    if shape_too:
        lines = (folder / "tiny.inter").read_text().splitlines()
        (folder / "tiny.inter").write_text("\n".join(lines[:-1]) + "\n")
    else:
        image = np.load(folder / "image_feat.npy")
        image[0, 0] += 1.0
        np.save(folder / "image_feat.npy", image)


@pytest.mark.parametrize("shape_too", [False, True])
def test_resume_and_eval_only_refuse_other_data_and_touch_nothing(tmp_path, shape_too):
    out = tmp_path / "run"
    train.run(run_cfg(**tiny_run(tmp_path, epochs=1, out=str(out))), log=quiet)
    before = files_of(out)
    change_in_place(tmp_path, shape_too)
    for cfg in (run_cfg(resume=str(out), epochs=2), run_cfg(eval_only=str(out))):
        with pytest.raises(data.DataError, match="the run was trained on other data"):
            train.run(cfg, log=quiet)
    assert files_of(out) == before


def test_resume_refuses_a_folder_that_holds_another_run_before_touching_it(tmp_path):
    # run A's last.pt copied into run B's folder: resuming it would mix two runs in one folder
    for name, kw in (("a", {}), ("b", {"dist": "l2"})):
        train.run(run_cfg(**tiny_run(tmp_path, epochs=1, **kw), out=str(tmp_path / name)), log=quiet)
    b = tmp_path / "b"
    shutil.copy(tmp_path / "a" / "last.pt", b / "last.pt")
    before = files_of(b)
    with pytest.raises(train.UsageError, match=re.escape(f"{b}/ holds another run than the one its last.pt was written by")):
        train.run(run_cfg(resume=str(b), epochs=2), log=quiet)
    assert files_of(b) == before


def test_rerunning_a_run_replaces_it_only_once_the_new_run_has_a_checkpoint(tmp_path, monkeypatch):
    base = tiny_run(tmp_path, epochs=2, out=str(tmp_path / "run"))
    train.run(run_cfg(**base), log=quiet)
    folder = tmp_path / "run"
    before = files_of(folder)
    assert set(before) == {".lock", *train.RUN_FILES}
    # another run's settings: refused before anything in the folder is touched
    with pytest.raises(train.UsageError, match=re.escape(f"{folder}/ holds another run (--lr 0.0001, not 0.001)")):
        train.run(run_cfg(**base, lr=1e-3), log=quiet)
    with pytest.raises(train.UsageError, match=re.escape("(--alpha 0.012, not 0.1; --lr 0.0001, not 0.001)")):
        train.run(run_cfg(**base, lr=1e-3, alpha=0.1), log=quiet)  # every setting that differs, at once
    assert files_of(folder) == before
    # the same settings again, stopped in its first epoch (Ctrl-C, a crash) or at its first checkpoint (a full disk,
    # whose failed write torch.save reports as a RuntimeError): the old run is intact
    real_epoch, real_save = train.train_epoch, torch.save
    fail = lambda error: lambda *a, **k: (_ for _ in ()).throw(error)
    for where, error, raised in ((train, KeyboardInterrupt(), KeyboardInterrupt), (train, MemoryError(), MemoryError),
                                 (torch, RuntimeError("PytorchStreamWriter failed writing file"), OSError)):
        monkeypatch.setattr(where, "train_epoch" if where is train else "save", fail(error))
        lines = []
        with pytest.raises(raised):
            train.run(run_cfg(**base), log=lines.append)
        assert files_of(folder) == before
        assert f"{folder}/ holds an earlier run of these settings: this run's first checkpoint replaces it" in lines
        monkeypatch.setattr(train, "train_epoch", real_epoch)
        monkeypatch.setattr(torch, "save", real_save)
    restore = interrupt_at(monkeypatch, 2)  # interrupted after its first epoch: the folder is the new run's alone
    with pytest.raises(KeyboardInterrupt):
        train.run(run_cfg(**base), log=quiet)
    restore()
    assert {p.name for p in folder.iterdir()} == {".lock", "config.json", "metrics.csv", "last.pt", "best.pt"}
    assert len(rows_of(folder / "metrics.csv")) == 1 and train.load_checkpoint(str(folder / "last.pt"))["run"] == \
        json.loads((folder / "config.json").read_text())["run"] != json.loads(before["config.json"])["run"]


def test_metrics_csv_never_lists_epochs_that_the_run_no_longer_has(tmp_path, monkeypatch):
    # killed (SIGKILL: no last word) 5 epochs into an extension, then resumed with --epochs 7
    base = tiny_run(tmp_path, epochs=3, out=str(tmp_path / "run"))
    train.run(run_cfg(**base), log=quiet)
    monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 1e9)  # no checkpoint until the end
    real = train.Run.finish
    monkeypatch.setattr(train.Run, "finish", lambda *a: (_ for _ in ()).throw(SystemExit))
    with pytest.raises(SystemExit):
        train.run(run_cfg(resume=str(tmp_path / "run"), epochs=8), log=quiet)
    assert len(rows_of(tmp_path / "run" / "metrics.csv")) == 3  # as last.pt: the killed epochs were never written
    monkeypatch.setattr(train.Run, "finish", real)
    results = train.run(run_cfg(resume=str(tmp_path / "run"), epochs=7), log=quiet)
    assert results["epochs_run"] == 7 and len(rows_of(tmp_path / "run" / "metrics.csv")) == 7


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_writes_the_last_finished_epoch_and_resume_goes_on_exactly(tmp_path, sig, code):
    base = tiny_run(tmp_path, epochs=25, patience=100)
    args = [sys.executable, os.path.join(HERE, "train.py"), "--dataset", "tiny", "--data-dir", base["data_dir"],
            "--epochs", "25", "--patience", "100", "--batch-size", "512", "--club-steps", "2", "--out", str(tmp_path / "run")]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines = []
    for line in p.stdout:  # interrupt once epoch 3 is logged (last.pt was saved after epoch 1)
        lines.append(line)
        if line.startswith("epoch    3"):
            p.send_signal(sig)
            time.sleep(0.001)
            p.send_signal(sig)  # pressed twice: the second waits for the last epoch's files too
            break
    rest, err = p.communicate(timeout=300)
    lines += rest.splitlines(keepends=True)
    assert p.returncode == code and err.count("\n") == 1 and "interrupted" in err, err
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 3 <= last["epoch"] == len(rows_of(tmp_path / "run" / "metrics.csv")) < 25  # metrics.csv as last.pt
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == last["progress"]["best_epoch"]
    assert f"interrupted: --resume {tmp_path / 'run'} continues after epoch {last['epoch']}\n" in lines
    log = []
    resumed = train.run(run_cfg(resume=str(tmp_path / "run")), log=log.append)
    assert f"resuming {tmp_path / 'run'}/ after epoch {last['epoch']} (--epochs 25, --patience 100)" in log
    assert same_results(resumed, train.run(run_cfg(**base, out=str(tmp_path / "whole")), log=quiet))


def test_an_interruption_while_an_epoch_is_kept_leaves_best_pt_and_last_pt_of_one_epoch(tmp_path, monkeypatch):
    base = tiny_run(tmp_path, epochs=4, lr=1e-3)
    whole = train.run(run_cfg(**base, out=str(tmp_path / "whole")), log=quiet)
    real = train.Run.keep

    def keep(self, p, *improved):
        if p.epoch == 3:
            raise KeyboardInterrupt  # the signal lands as this epoch's state is copied
        return real(self, p, *improved)
    monkeypatch.setattr(train.Run, "keep", keep)
    with pytest.raises(KeyboardInterrupt):
        train.run(run_cfg(**base, out=str(tmp_path / "part")), log=quiet)
    last = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "part" / "best.pt", weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == last["progress"]["best_epoch"]
    assert all(torch.equal(best["model"][k], v) for k, v in last["progress"]["best_model"].items())
    monkeypatch.setattr(train.Run, "keep", real)
    assert same_results(train.run(run_cfg(resume=str(tmp_path / "part")), log=quiet), whole)


def test_a_run_that_fails_its_checks_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "run"
    base = tiny_run(tmp_path, epochs=1, out=str(out))
    train.run(run_cfg(**base), log=quiet)
    before = files_of(out)
    with pytest.raises(train.UsageError):
        train.run(run_cfg(**{**base, "knn_k": 10 ** 6}), log=quiet)
    assert files_of(out) == before
    # a new folder that a failing run would have made is not left behind
    with pytest.raises(train.UsageError):
        train.run(run_cfg(**{**base, "out": str(tmp_path / "new"), "knn_k": 10 ** 6}), log=quiet)
    assert not (tmp_path / "new").exists()


def test_two_runs_never_share_a_folder(tmp_path):
    out = tmp_path / "run"
    with train.locked(str(out)):  # another train.py holds the folder
        with pytest.raises(train.UsageError, match=re.escape(f"{out}/ is in use by another train.py (pid {os.getpid()})")):
            train.run(run_cfg(**tiny_run(tmp_path, epochs=1, out=str(out))), log=quiet)
        assert set(os.listdir(out)) == {".lock"}
    assert not out.exists()  # a folder that the lock made, and nothing else wrote to, is removed again
    train.run(run_cfg(**tiny_run(tmp_path, epochs=1, out=str(out))), log=quiet)  # free again
    assert (out / "results.json").is_file()


def test_atomic_writes_use_a_temporary_file_of_their_own(tmp_path, monkeypatch):
    path, seen, real = tmp_path / "results.json", [], os.replace
    (tmp_path / "results.json.tmp").write_text("another writer's")  # the old fixed name: left alone
    monkeypatch.setattr(os, "replace", lambda a, b: seen.append(a) or real(a, b))
    for text in ("one", "two"):
        data.atomic_write(str(path), text)
    assert path.read_text() == "two" and len(set(seen)) == 2
    assert all(os.path.dirname(t) == str(tmp_path) and not os.path.exists(t) for t in seen)
    assert (tmp_path / "results.json.tmp").read_text() == "another writer's"

    def broken(f):
        f.write("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.atomic_write(str(path), broken)
    assert path.read_text() == "two" and sorted(os.listdir(tmp_path)) == ["results.json", "results.json.tmp"]


def test_a_run_on_other_data_of_the_same_name_does_not_replace_it(tmp_path, monkeypatch):
    # two datasets named `med` in different data folders: the default run folder is the same
    monkeypatch.chdir(tmp_path)
    for k, folder in enumerate(("a", "b")):
        data.write_mmrec(data.make_synthetic("med", k, TINY), str(tmp_path / folder))
    settings = dict(dataset="med", epochs=1, batch_size=512, club_steps=2)
    train.run(run_cfg(**settings, data_dir=str(tmp_path / "a")), log=quiet)
    folder = tmp_path / train.default_folder(run_cfg(**settings))
    before = files_of(folder)
    with pytest.raises(train.UsageError, match="holds another run .made on other data"):
        train.run(run_cfg(**settings, data_dir=str(tmp_path / "b")), log=quiet)
    assert files_of(folder) == before


def test_a_grid_run_again_on_changed_data_is_refused_before_anything_runs(tmp_path):
    base = tiny_run(tmp_path, epochs=1, seeds=1, out=str(tmp_path / "grid"), grid=("alpha=0.012,0.1",))
    train.run(run_cfg(**base), log=quiet)
    before = files_of(tmp_path / "grid")
    change_in_place(tmp_path)
    with pytest.raises(train.UsageError, match=r"alpha=0.012-seed999/ holds another run \(made on other data"):
        train.run(run_cfg(**base), log=quiet)
    assert files_of(tmp_path / "grid") == before


def test_a_grid_runs_a_point_again_whose_results_json_is_not_one(tmp_path):
    base = tiny_run(tmp_path, epochs=1, seeds=1, out=str(tmp_path / "grid"), grid=("alpha=0.012,0.1",))
    rows = train.run(run_cfg(**base), log=quiet)
    (tmp_path / "grid" / "alpha=0.1-seed999" / "results.json").write_text('{"foo": 1}')  # edited, or half a file
    assert train.run(run_cfg(**base), log=quiet) == rows  # resumed from its last.pt, which had already stopped
    assert json.loads((tmp_path / "grid" / "alpha=0.1-seed999" / "results.json").read_text())["best_epoch"] == 1


def test_a_second_grid_in_the_same_folder_does_not_replace_the_firsts_tables(tmp_path):
    base = tiny_run(tmp_path, epochs=1, seeds=1, out=str(tmp_path / "grid"))
    train.run(run_cfg(**base, grid=("alpha=0.1,0.2",)), log=quiet)
    before = files_of(tmp_path / "grid")
    with pytest.raises(train.UsageError, match=r"grid/ holds the tables of another grid \(alpha=0.1, alpha=0.2\)"):
        train.run(run_cfg(**base, grid=("alpha=0.3,0.4",)), log=quiet)
    assert files_of(tmp_path / "grid") == before


def test_folders_that_a_refused_or_interrupted_run_made_are_removed_again(tmp_path, monkeypatch):
    base = tiny_run(tmp_path, epochs=1, out=str(tmp_path / "new" / "a" / "b"))
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train.run(run_cfg(**base), log=quiet)
    assert not (tmp_path / "new").exists()


def test_folder_names_too_long_for_the_file_system_are_refused_before_anything_runs(tmp_path):
    # a grid of many settings makes long default folder names; here a long --out stands in for one
    long = tmp_path / ("g" * 300)
    for kw in ({"grid": ("alpha=0.1,0.2",), "seeds": 1}, {}):
        with pytest.raises(train.UsageError, match="is 300 bytes, more than a file system allows"):
            train.run(run_cfg(**tiny_run(tmp_path, epochs=1, out=str(long), **kw)), log=quiet)
    assert os.listdir(tmp_path) == ["data"]


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    text, other = tmp_path / "metrics.csv", tmp_path / "other.pt"
    text.write_text("epoch,bpr\n1,0.7\n")
    torch.save({"weights": torch.zeros(2)}, other)
    for path in (text, other):
        one_line_error(["--eval-only", path], tmp_path, monkeypatch, capsys,
                       f"{path} is not a checkpoint written by this train.py")
    out = tmp_path / "run"  # a checkpoint of ours, changed: other tensors, a setting this train.py does not know
    train.run(run_cfg(**tiny_run(tmp_path, epochs=1, out=str(out))), log=quiet)
    ckpt = torch.load(out / "best.pt", weights_only=True)
    torch.save({**ckpt, "model": {k: torch.zeros(3) for k in ckpt["model"]}}, tmp_path / "foreign.pt")
    one_line_error(["--eval-only", tmp_path / "foreign.pt"], tmp_path, monkeypatch, capsys, "does not fit its run's model")
    torch.save({**ckpt, "config": {**ckpt["config"], "sand": {**ckpt["config"]["sand"], "lamda": 0.1}}}, tmp_path / "u.pt")
    one_line_error(["--eval-only", tmp_path / "u.pt"], tmp_path, monkeypatch, capsys,
                   "a saved configuration that this train.py cannot read (make_config: no setting lamda)")
    last = torch.load(out / "last.pt", weights_only=True)
    for key, bad in (("given", 5), ("epoch", None), ("epoch", "3"), ("model", None)):  # edited by hand
        torch.save({**last, key: bad}, tmp_path / "edited.pt")
        for mode in ("--resume", "--eval-only"):
            one_line_error([mode, tmp_path / "edited.pt"], tmp_path, monkeypatch, capsys, "is not a checkpoint written by")
    torch.save({**ckpt, "model": {k: v * math.nan if v.is_floating_point() else v for k, v in ckpt["model"].items()}}, tmp_path / "n.pt")
    one_line_error(["--eval-only", tmp_path / "n.pt"], tmp_path, monkeypatch, capsys, "holds weights that are not finite")
    torch.save({**last, "opt": {"state": {}, "param_groups": []}}, out / "last.pt")
    one_line_error(["--resume", out], tmp_path, monkeypatch, capsys, "the checkpoint does not fit this run's model")


def test_a_full_disk_or_a_file_size_limit_gives_one_line(tmp_path):
    base = tiny_run(tmp_path)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # last.pt is larger (1.7 MB)
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--dataset", "tiny", "--data-dir", base["data_dir"],
                        "--epochs", "2", "--club-steps", "2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, preexec_fn=limit)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"train.py: error: cannot write a checkpoint in {tmp_path / 'run'}/ ([Errno 27] File too "
                               f"large): is the disk full?")


def test_ctrl_c_while_torch_loads_leaves_without_a_traceback(tmp_path):
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(0.3)  # train.py is importing torch, numpy and itself (seconds)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and err.count("\n") <= 1, err
    assert not (tmp_path / "runs").exists()


def test_the_memory_a_run_needs_is_estimated_before_it_is_built(tmp_path, monkeypatch):
    # 20,000 feature columns on 40 items: each transform is d x d, 6 GiB with Adam's state
    rng = np.random.default_rng(0)
    rows = [(u, (u + k) % 40, lab) for u in range(40) for k, lab in ((0, 0), (1, 0), (2, 0), (3, 1), (4, 2))]
    inter = HEADER + "".join(f"{u}\t{i}\t1\t1\t{x}\n" for u, i, x in rows)
    write_folder(tmp_path / "data", "wide", inter=inter, image=rng.random((40, 20000), dtype=np.float32),
                 text=rng.random((40, 8)))
    monkeypatch.setattr(data, "memory_available", lambda: 2 ** 30)
    read = []
    monkeypatch.setattr(data, "read_features", lambda *a: read.append(a))  # the features are never read
    for plain, expect in ((True, r"this run needs at least 6\.1 GiB \(406,\d{3},\d{3} parameters.*the largest, "
                                 r"transform\.image\.weight, is 20000 x 20000; the CLUB estimator's activations, 2 x 40 "
                                 r"pairs through --club-hidden 8\), more than the 1\.0 GiB"),
                          (False, r"this run needs at least 12\.1 GiB \(the check of the fast paths: 406,\d{3},\d{3} "
                                  r"parameters in float64, with gradients\)")):  # the fast tier's check comes first
        cfg = run_cfg(dataset="wide", data_dir=str(tmp_path / "data"), knn_k=3, out=str(tmp_path / "run"), plain=plain)
        with pytest.raises(train.UsageError, match=expect):
            train.run(cfg, log=quiet)
    assert not (tmp_path / "run").exists() and read == []
    # the estimate counts the real model's parameters, the estimator's among them
    ds = tiny()
    for c in (run_cfg(), run_cfg(backbone="vbpr"), run_cfg(backbone="vbpr", dist="none", align="none"),
              run_cfg(backbone="freedom")):
        model, club = train.build(c, ds, torch.device("cpu"), 0)[:2]
        n = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in club.parameters())
        estimator = 4 * 4 * 2 * ds.n_items * 2 * c.sand.club_hidden if c.sand.dist == "mi" else 0  # its activations
        check = sum(p.numel() for p in sand.build_model(c.sand, 30, {m: torch.ones(40, d) for m, d in
                                                                     (("image", 48), ("text", 24))})[0].parameters())
        assert train.memory_needed(c, ds.n_users, ds.n_items, {"image": 48, "text": 24})[0] == \
            max(16 * n + 4 * ds.n_items * (48 + 24) + estimator, 32 * check)  # the run, or the check before it


def test_a_feature_file_larger_than_memory_is_refused_from_its_header(tmp_path, monkeypatch):
    write_folder(tmp_path, image=np.ones((7, 6000)))  # 168 kB as float32
    monkeypatch.setattr(data, "memory_available", lambda: 100_000)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the file was read"))
    with pytest.raises(data.DataError, match=r"image_feat.npy: 7 x 6000 float64 values need 0\.0 GiB to read as float32, "
                                             r"more than the 0\.0 GiB of memory available"):
        data.load_mmrec(str(tmp_path), "toy")


# ---------------------------------------------------------------------------------------------
# Copied pieces: the plain formula, or a clear error

def views(n, d=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1) for _ in range(2)]


def test_solo_sim_loss_refuses_anchors_of_other_items_and_takes_a_tensor_temperature(loss=solo_sim_loss):
    t, v = views(40)
    with pytest.raises(ValueError, match=re.escape(f"{loss.__name__}: anchor and other must both be [N, D], "
                                                   "row i of each the same item (got [8, 6] and [40, 6])")):
        loss(t[:8], v, 0.2)  # a batch of anchors against all items: anchor k would be scored against item k
    for tau in (torch.tensor([0.2, 0.3]), np.array([0.2, 0.3]), None):
        with pytest.raises(ValueError, match="tau must be one number above 0, or a one-element floating-point tensor"):
            loss(t, v, tau)
    t32, v32 = (x.float() for x in (t, v))
    for tau in (torch.tensor([0.2], dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64), torch.tensor([[0.2]])):
        torch.testing.assert_close(loss(t32, v32, tau).double(), solo_sim_loss(t, v, 0.2), rtol=1e-5, atol=1e-6)
    for tau in (-0.2, 0.0, torch.tensor(-0.2), torch.tensor(0.0), torch.tensor(0.0, requires_grad=True)):
        with pytest.raises(ValueError, match=r"tau must be above 0 \(got -?0\.\d+\); a learnable one"):
            loss(t, v, tau)


def test_the_pieces_say_what_is_wrong_with_their_inputs():
    club = CLUB(6, 6, 4)
    x = torch.randn(2, 30, 6)
    perm = torch.stack([torch.randperm(30) for _ in range(2)])
    cases = [  # (call, the start of its one-line message)
        (lambda: club(x, x[:, :20], perm), "CLUB: x and y must both be [..., N, D] with N > 0, row k of each the same "
                                           "item (got [2, 30, 6] and [2, 20, 6])"),
        (lambda: club(x.double(), x, perm), "CLUB: the inputs must share one dtype and device (got torch.float64 on cpu, "
                                            "torch.float32 on cpu)"),
        (lambda: fit_club(club, torch.optim.Adam(club.parameters()), x, x[..., :5], 2), "fit_club: the pairs are 6 and 5 "
                                                                                       "wide, the estimator reads 6"),
        (lambda: fit_club(club, torch.optim.Adam([nn.Parameter(torch.zeros(1))]), x, x, 2), "fit_club: the optimizer "
                                                                                            "holds parameters that"),
        (lambda: fit_club(club, torch.optim.SGD(club.parameters(), lr=0.1), x, x, True), "fit_club: steps must be a whole"),
        (lambda: fit_club(club, torch.optim.LBFGS(club.parameters()), x, x, 2), "fit_club: the optimizer must hold "
                                                                               "trainable estimator parameters and step "
                                                                               "without a closure"),
        (lambda: bpr_loss(torch.tensor([]), torch.tensor([])), "bpr_loss: an input is empty"),
        (lambda: bpr_loss(torch.ones(3), torch.ones(3), base=1), "bpr_loss: base must be a number above 0 other than 1"),
        (lambda: bpr_loss(torch.ones(3, dtype=torch.long), torch.ones(3)), "bpr_loss: the inputs must be floating-point"),
        (lambda: sand.emb_loss(torch.ones(2, 3), torch.ones(5, 3)), "emb_loss: give the batch's rows, [B, D] each with "
                                                                    "one B (got shapes [2, 3], [5, 3])"),
        (lambda: sand.emb_loss(), "emb_loss: give the batch's rows"),
        (lambda: neg_l2(torch.ones(3, 0), torch.ones(3, 0)), "neg_l2: an input is empty"),
        (lambda: solo_sim_loss(x[0], x[0].double(), 0.2), "solo_sim_loss: the inputs must share one dtype"),
        (lambda: solo_sim_loss(x[0], x[0], "0.2"), "solo_sim_loss: tau must be one number above 0"),
        (lambda: solo_sim_loss(x[0], x[0], True), "solo_sim_loss: tau must be one number above 0"),
        (lambda: club(x, x[..., :5], perm), "CLUB: the pairs are 6 and 5 wide, the estimator reads 6 and gives 6"),
        (lambda: club(x, x, perm[:, :20]), "CLUB: perm must be int64 of shape [2, 30]"),
        (lambda: club(x, x, torch.stack([torch.arange(1114, 1144), torch.arange(30)])),  # item ids, not positions
         "CLUB: perm holds 0..1143, but it must hold positions 0..29 within the 30 pairs (not item ids)"),
        (lambda: club(x[:, :0], x[:, :0], perm[:, :0]), "CLUB: an input is empty"),
        (lambda: fit_club(club, torch.optim.Adam(club.parameters()), x, x[:1, :3], 2), "fit_club: x and y must both be"),
        (lambda: fit_club(club, torch.optim.Adam(club.parameters()), x[:, :0], x[:, :0], 2), "fit_club: an input is empty"),
        (lambda: fit_club(club, torch.optim.Adam(club.parameters()), x, x, -1), "fit_club: steps must be a whole number, "
                                                                                "0 or more (got -1)"),
        (lambda: neg_l2(x, x[..., :5]), "neg_l2: x and y must both be [..., N, D] with N > 0"),
        (lambda: solo_sim_loss(x[0, :0], x[0, :0], 0.2), "solo_sim_loss: an input is empty"),
        (lambda: bpr_loss(torch.randn(8, 1), torch.randn(8, 1)), "bpr_loss: pos and neg must both be [B], one score per "
                                                                 "triple (got [8, 1] and [8, 1])"),
        (lambda: bpr_loss(torch.randn(8), torch.randn(8, 1)), "bpr_loss: pos and neg must both be [B]"),
        (lambda: sand.sand_loss(SANDConfig(), {"bpr": torch.tensor(0.0)}, {m: {} for m in ("rgb", "txt")}, club, perm),
         "sand_loss: aux must hold the modalities 'text' and 'image' (got ['rgb', 'txt'])"),
    ]
    for call, expect in cases:
        with pytest.raises(ValueError, match=re.escape(expect)) as e:
            call()
        assert "\n" not in str(e.value)
    # a [B, 1] score broadcast against [B] would have given the mean over B x B pairs, with no error
    pos, neg = torch.randn(8), torch.randn(8)
    assert float(-F.logsigmoid(pos[:, None] - neg).mean()) != pytest.approx(float(bpr_loss(pos, neg, base=math.e)))
    # under torch.inference_mode, fit_club still fits (the same as outside it)
    x, y = torch.randn(2, 30, 6), torch.randn(2, 30, 6)
    want = copy.deepcopy(club)
    fit_club(want, torch.optim.Adam(want.parameters(), lr=1e-2), x, y, 3)
    est = copy.deepcopy(club)
    with torch.inference_mode():
        fit_club(est, torch.optim.Adam(est.parameters(), lr=1e-2), x.clone(), y.clone(), 3)
    for (name, a), b in zip(est.named_parameters(), want.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_club_takes_pairs_of_two_widths_as_cheng_et_al_s_clubsample():
    torch.manual_seed(0)
    club = CLUB(6, 3, 4).double()
    x = torch.randn(2, 40, 6, dtype=torch.float64)
    with torch.no_grad():
        y = club.mu(x) + 0.1 * torch.randn(2, 40, 3, dtype=torch.float64)
    perm = torch.stack([torch.randperm(40) for _ in range(2)])
    torch.testing.assert_close(club(x, y, perm), torch.stack([plain_club_bound(club, x[s], y[s], perm[s]) for s in range(2)]))
    want = released_estimator_loop(copy.deepcopy(club), x, y, 4, 1e-2)
    torch.testing.assert_close(fit_club(club, torch.optim.Adam(club.parameters(), lr=1e-2), x, y, 4), want)


def test_fit_club_inside_autocast_fits_in_the_estimators_own_dtype():
    """A whole step under bf16 autocast: autocast caches the bf16 copy of each weight for the life of its block, so
    without its own block every step of the fit would run on the first step's weights; pairs made under autocast
    come in bf16."""
    torch.manual_seed(0)
    club = CLUB(6, 6, 4)
    x = torch.randn(2, 200, 6)
    y = x.flip(0) + 0.3 * torch.randn(2, 200, 6)
    want = copy.deepcopy(club)
    nll = fit_club(want, torch.optim.Adam(want.parameters(), lr=1e-2), x, y, 30)
    for pairs in ((x, y), (x.bfloat16(), y.bfloat16())):
        est = copy.deepcopy(club)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fit_club(est, torch.optim.Adam(est.parameters(), lr=1e-2), *pairs, 30)
        assert got.dtype == torch.float32
        if pairs[0].dtype == torch.float32:  # the same fit as outside autocast
            torch.testing.assert_close(got, nll)
            for (name, a), b in zip(est.named_parameters(), want.parameters()):
                torch.testing.assert_close(a, b, msg=name)
        else:  # bf16 pairs: rounded inputs, the same fit up to that rounding
            assert float(got) == pytest.approx(float(nll), abs=0.05)


@pytest.mark.parametrize("optimizer", ["Adam", "Adam fused", "SGD fused"])
def test_fitting_q_between_the_bounds_forward_and_backward_leaves_the_bounds_gradient_as_it_was(optimizer):
    """The bound keeps its own copy of q's weights, so that a fit between its forward and its backward, even by a
    fused optimizer (whose kernels do not bump the version counters autograd would check), cannot change the
    gradient. neg_l2 is unbounded below."""
    torch.manual_seed(0)
    club = CLUB(4, 4, 3)
    with torch.no_grad():
        for p in club.parameters():
            p.add_(0.5 * torch.randn_like(p))
    a, b = torch.randn(2, 50, 4, requires_grad=True), torch.randn(2, 50, 4)
    perm = torch.stack([torch.randperm(50) for _ in range(2)])
    want = torch.autograd.grad(club(a, b, perm).mean(), a)[0]
    assert float(want.abs().max()) > 0
    bound = club(a, b, perm).mean()
    name, *fused = optimizer.split()
    opt = getattr(torch.optim, name)(club.parameters(), lr=0.1, **({"fused": True} if fused else {}))
    before = [p.detach().clone() for p in club.parameters()]
    fit_club(club, opt, a, b, 5)
    assert not all(torch.equal(p, q) for p, q in zip(before, club.parameters()))  # q moved
    torch.testing.assert_close(torch.autograd.grad(bound, a)[0], want, rtol=0, atol=0)
    x = torch.randn(20, 4, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    values = []
    for _ in range(300):  # minimising neg_l2 alone: it keeps falling, with no floor
        opt.zero_grad()
        loss = neg_l2(x, torch.zeros(20, 4))
        loss.backward()
        opt.step()
        values.append(float(loss.detach()))
    assert all(b < a for a, b in zip(values, values[1:])) and values[-1] < 100 * values[0] < 0


def first_rows(x, n):
    return x[..., :n, :]


PIECE_EDITS = {  # a plain piece that the fast tier replaces, edited as a reader might: (where, name, edit, flags)
    "SAND.modality": (sand.SAND, "modality", lambda real: lambda self, m, parts: (lambda item, out: (
        item, {k: v * 2 if k == "a" else v for k, v in out.items()}))(*real(self, m, parts)), []),
    "SAND.modality at evaluation only": (sand.SAND, "modality", lambda real: lambda self, m, parts: (lambda item, out: (
        item if self.training else item + 1, out))(*real(self, m, parts)), []),  # item * 2: normalised away
    "lightgcn": (sand, "lightgcn", lambda real: lambda adj, h0, n: real(adj, h0, n) / (n + 1), []),
    "lightgcn from its third hop on": (sand, "lightgcn", lambda real: lambda adj, h0, n: real(adj, h0, n) + (
        0.1 * h0 if n >= 3 else 0), ["--n-layers", "3"]),
    "solo_sim_loss": (sand, "solo_sim_loss", lambda real: lambda a, b, tau: real(a, b, 2 * tau), []),
    "fit_club": (sand, "fit_club", lambda real: lambda club, opt, x, y, steps: real(club, opt, x, y, steps + 1), []),
    "fit_club after its third step": (sand, "fit_club", lambda real: lambda club, opt, x, y, steps: real(
        club, opt, x, y, steps + (steps > 3)), []),
    "fit_club on at most 100 pairs": (sand, "fit_club", lambda real: lambda club, opt, x, y, steps: real(
        club, opt, first_rows(x, 100), first_rows(y, 100), steps), []),  # the run has 1,144 items
    "CLUB.nll": (sand.CLUB, "nll", lambda real: lambda self, x, y: 2 * real(self, x, y), []),
    "SAND.modality raises": (sand.SAND, "modality", lambda real: lambda self, m, parts: 1 / 0, []),
}


@pytest.mark.parametrize("edit", PIECE_EDITS)
def test_an_edit_to_a_plain_piece_that_the_fast_tier_lacks_stops_a_run_with_one_line(tmp_path, monkeypatch, capsys, edit):
    where, name, change, flags = PIECE_EDITS[edit]
    monkeypatch.setattr(where, name, change(getattr(where, name)))
    piece = "fit_club" if name in ("fit_club", "nll") else {"modality": "SAND.modality"}.get(name, name)
    expect = (f"sand.py's {piece} fails on a random instance of this configuration (ZeroDivisionError: "
              if edit.endswith("raises") else f"sand.py's {piece} and its fast path ")
    one_line_error(["--epochs", "1", "--club-fit", "intra", *flags], tmp_path, monkeypatch, capsys, expect)
    assert not (tmp_path / "runs").exists()
    plain = ["--epochs", "1", "--club-fit", "intra", "--club-steps", "5", "--plain", *flags]
    if edit.endswith("raises"):  # the plain tier runs the edit itself
        with pytest.raises(ZeroDivisionError):
            cli(plain, tmp_path, monkeypatch, capsys)
    else:
        assert cli(plain, tmp_path, monkeypatch, capsys)[0] == 0


def test_an_edit_stops_a_grid_before_any_of_its_runs_and_each_point_is_checked_once(tmp_path, monkeypatch, capsys):
    calls = []
    real = train.check_tiers
    monkeypatch.setattr(train, "check_tiers", lambda hp, ds, log: (calls.append(hp), real(hp, ds, log)))
    monkeypatch.setattr(sand, "solo_sim_loss", lambda a, b, tau, real=sand.solo_sim_loss: real(a, b, 2 * tau))
    one_line_error(["--ablation", "--seeds", "2", "--epochs", "1"], tmp_path, monkeypatch, capsys,
                   "sand.py's solo_sim_loss and its fast path ")
    assert not (tmp_path / "runs").exists() and len(calls) == 1  # the first point, not yet any of its runs
    monkeypatch.undo()
    monkeypatch.setattr(train, "check_tiers", lambda hp, ds, log: (calls.append(hp), real(hp, ds, log)))
    calls.clear()
    out = tmp_path / "g"
    assert cli(["--grid", "alpha=0.1,0.2", "--seeds", "2", "--epochs", "1", "--out", out], tmp_path, monkeypatch,
               capsys)[0] == 0
    assert [c.alpha for c in calls] == [0.1, 0.2]  # two points, four runs: two checks


def test_the_check_of_the_fast_paths_runs_for_any_k_and_counts_in_the_memory_a_run_needs(tmp_path, monkeypatch):
    assert train.run(run_cfg(**tiny_run(tmp_path, epochs=1, knn_k=60, out=str(tmp_path / "k"))), log=quiet)["best_epoch"]
    cfg = run_cfg(mlp_dim=2 ** 20)  # the check's float64 model and gradients outweigh the run's float32 one
    need, what = train.memory_needed(cfg, 2000, 1000, {"image": 512, "text": 128})
    assert what.startswith("the check of the fast paths: ") and need > 24 * 10 ** 9
    assert train.memory_needed(run_cfg(mlp_dim=2 ** 20, plain=True), 2000, 1000, {"image": 512, "text": 128})[0] < need


# ---------------------------------------------------------------------------------------------
# Flags that a variant does not read

def test_a_grid_runs_each_distinct_point_once_and_refuses_a_setting_no_point_reads():
    # the README's old example sweep: --dist l2 reads no --ureg, so half its runs were the others again
    with pytest.raises(train.UsageError, match=re.escape("--grid: --ureg is read only with --dist mi, and no point "
                                                         "has that: leave it out")):
        cfg = run_cfg(dist="l2", grid=("alpha=0.012,0.1", "ureg=0.006,0.06"))
        train.grid_runs(cfg, train.grid_points(cfg.train.grid))
    cfg = run_cfg(grid=("dist=mi,l2", "ureg=0.006,0.06"), seeds=2)
    out, runs, notes = train.grid_runs(cfg, train.grid_points(cfg.train.grid))
    assert [(r.key, r.seed) for r in runs] == [(k, s) for k in ("dist=mi-ureg=0.006", "dist=mi-ureg=0.06", "dist=l2")
                                               for s in (999, 1000)]
    assert notes == ["--grid: --dist l2 --ureg 0.06 is the same run as --dist l2 (--ureg is read only with --dist mi): run once"]
    assert runs[-1].cfg.sand.ureg == SANDConfig.ureg and runs[-1].changes == {"dist": "l2"}
    with pytest.raises(train.UsageError, match=re.escape("--alpha is set by the --grid points: leave it out")):
        cfg = run_cfg(alpha=0.1, grid=("alpha=0.012,0.1",))
        train.grid_runs(cfg, train.grid_points(cfg.train.grid))
    with pytest.raises(train.UsageError, match=re.escape("--dist is set by the --ablation points: leave it out")):
        train.grid_runs(run_cfg(dist="l2", ablation=True), train.ABLATIONS)
    # a base setting read by some ablation points applies to those, and is dropped from the others
    _, runs, _ = train.grid_runs(run_cfg(ureg=0.1, ablation=True, seeds=1), train.ABLATIONS)
    assert {r.key: r.cfg.sand.ureg for r in runs} == {"mi-cross": 0.1, "mi-intra": 0.1, "l2": 0.006, "align-only": 0.006,
                                                      "dist-only": 0.1, "neither": 0.006, "complete": 0.006}


def test_plain_vbpr_has_no_dropout_by_default_and_help_says_each_variants_default(capsys):
    assert run_cfg(backbone="vbpr", dist="none", align="none").sand.dropout == 0.0  # MMRec's VBPR
    assert run_cfg(backbone="vbpr").sand.dropout == 0.01 and run_cfg().sand.dropout == 0.0  # the authors' VBPR+SAND
    assert run_cfg(backbone="vbpr", dist="none", align="none", dropout=0.2).sand.dropout == 0.2
    with pytest.raises(SystemExit):
        train.parser().parse_args(["--help"])
    shown = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert ("(default: 0.0; --backbone vbpr: 0.01; plain VBPR (--backbone vbpr --dist none --align none): 0.0)" in shown
            and "(default: 0.012; --backbone vbpr: 0.1)" in shown)


def test_eval_dropout_draws_a_new_mask_at_each_evaluation_from_the_runs_seed(tmp_path):
    ds = tiny()
    cfg = run_cfg(backbone="vbpr", eval_dropout=True, dropout=0.3)
    model = train.build(cfg, ds, torch.device("cpu"), 0)[0]
    evaluator = train.make_evaluator(ds, torch.device("cpu"))
    first, second = train.evaluate(model, evaluator), train.evaluate(model, evaluator)
    assert first != second  # a new mask each time: a noisy score, as the authors' code gives
    again = train.build(cfg, ds, torch.device("cpu"), 0)[0]
    assert train.evaluate(again, evaluator) == first  # from the seed: repeatable
    off = train.build(run_cfg(backbone="vbpr", dropout=0.3), ds, torch.device("cpu"), 0)[0]
    assert train.evaluate(off, evaluator) == train.evaluate(off, evaluator)  # the default: no dropout at evaluation


def test_the_readme_stays_short_and_names_its_commands():
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 200
    for command in ("python train.py --ablation", "python -m pytest -q test_sand.py", "--backbone vbpr --ablation",
                    "--backbone freedom --dist none --align none --grid", "pip install -r requirements.txt"):
        assert command in text


# ---------------------------------------------------------------------------------------------
# GPU: the same numbers as on CPU (these run where torch sees a CUDA GPU, and are skipped elsewhere)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_loss_gradients_estimator_and_graphs_match_cpu():
    ds, cfg = tiny(), run_cfg(dist="l2")  # --dist l2 draws no permutation: the same loss on both devices
    got = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        model, club, _, club_opt = train.build(cfg, ds, device, 0)
        user, pos = (torch.from_numpy(ds.train[:500, i]).to(device) for i in (0, 1))
        neg = torch.from_numpy(np.random.default_rng(0).integers(ds.n_items, size=500)).to(device)
        loss, _, _ = model.loss(user, pos, neg, club)
        loss.backward()
        gen = torch.Generator().manual_seed(1)
        x, y = (torch.randn(300, cfg.sand.dist_dim, generator=gen).to(device) for _ in range(2))
        nll = _fit_club_fast(club, club_opt, x, y + x, 5)
        got[name] = {"loss": loss.detach(), "item_item": model.item_item.to_dense(), "nll": nll,
                     **{f"grad {n}": p.grad for n, p in model.named_parameters()},
                     **{f"club {n}": p.detach() for n, p in club.named_parameters()}}
    bad = []  # every mismatch, not only the first
    for key, want in got["cpu"].items():
        have = got["cuda"][key].cpu()
        if key.startswith("grad head") and key.endswith((".0.bias", ".3.bias")):
            # a bias right before a BatchNorm: its exact gradient is 0, both devices give rounding noise
            scale = float(got["cpu"][key.replace("bias", "weight")].abs().max())  # its layer's weight gradient
            if max(float(have.abs().max()), float(want.abs().max())) >= 1e-5 * scale:
                bad.append(f"{key}: {float(have.abs().max()):.3g} and {float(want.abs().max()):.3g} are not ~0")
            continue
        try:
            torch.testing.assert_close(have, want, rtol=1e-3, atol=1e-5 * float(want.abs().max()) + 1e-12)
        except AssertionError as e:
            bad.append(f"{key}: {e}")
    assert not bad, "\n".join(bad)


@needs_cuda
def test_cuda_club_bound_matches_cpu():
    """The CLUB bound and its gradients on the GPU (the model test above runs --dist l2, whose loss
    draws no permutation; here both devices get the same permutations)."""
    torch.manual_seed(0)
    club = CLUB(32, 32, 8).requires_grad_(False)
    x = torch.randn(2, 600, 32)
    with torch.no_grad():  # y near mu(x): both bounds positive, so gradients flow
        y = club.mu(x) + 0.1 * torch.randn(2, 600, 32)
    perms = torch.stack([torch.randperm(600) for _ in range(2)])
    got = {}
    for name in ("cpu", "cuda"):
        xd, yd = x.to(name, copy=True).requires_grad_(), y.to(name, copy=True).requires_grad_()  # leaves
        bound = club.to(name)(xd, yd, perms.to(name))  # [2]
        (bound * torch.tensor([1.0, 2.0], device=name)).sum().backward()
        got[name] = {"bound": bound.detach().cpu(), "x grad": xd.grad.cpu(), "y grad": yd.grad.cpu()}
    assert bool((got["cpu"]["bound"] > 0).all())
    for key, want in got["cpu"].items():
        torch.testing.assert_close(got["cuda"][key], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=key)


def run_steps(device, dist, graphs, epochs=3):
    """`epochs` epochs of train_step on the tiny data (6 batches of 512, then one of 246), as CUDA graphs or
    directly -> the step, and the loss terms, parameters, BatchNorm statistics and optimizer step counts after them."""
    ds, cfg = tiny(), run_cfg(dist=dist, club_fit="intra", batch_size=512, club_steps=5)  # intra: the bound is > 0
    model, club, opt, club_opt = train.build(cfg, ds, device, 0)
    gen = torch.Generator(device=device).manual_seed(0)
    sampler = train.BPRSampler(torch.from_numpy(ds.train).to(device), ds.n_items, gen)
    step = functools.partial(train.train_step, model, club, opt, club_opt, hp=cfg.sand)
    if graphs:
        step = train.CUDAGraphed(step, [opt, club_opt])
    terms = [train.train_epoch(model, step, sampler, cfg) for _ in range(epochs)]
    steps = {f"{name} steps": sorted({float(s["step"]) for s in o.state.values()})
             for name, o in (("model", opt), ("club", club_opt))}
    return step, terms, steps, {**model.state_dict(), **{f"club {n}": p for n, p in club.named_parameters()}}


@needs_cuda
@pytest.mark.parametrize("dist", ["mi", "l2"])
def test_cuda_graph_of_the_training_step_equals_running_it(dist):
    device = torch.device("cuda")
    _, want_terms, want_steps, want = run_steps(device, dist, graphs=False)
    step, terms, steps, have = run_steps(device, dist, graphs=True)
    # both batch sizes recorded (512 in epoch 1, 246 in epoch 2) and replayed; optimizers back to normal
    assert set(step.graphs) == {512, 246} and not any(g["capturable"] for o in step.optimizers for g in o.param_groups)
    assert steps == want_steps == {"model steps": [21.0], "club steps": [105.0] if dist == "mi" else []}
    assert terms[0].keys() == ({"bpr", "solo", "club", "club_nll"} if dist == "mi" else {"bpr", "solo", "neg_l2"})
    assert len({tuple(t.values()) for t in terms}) == 3  # every epoch's terms are new
    for a, b in zip(terms, want_terms):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    for key, w in want.items():
        if key.startswith("head") and key.endswith((".0.bias", ".3.bias", ".1.running_mean", ".4.running_mean")):
            # a bias right before a BatchNorm, whose exact gradient is 0, so Adam moves it by rounding noise (up
            # to the learning rate per step), and the running mean of that BatchNorm, which averages the bias in
            torch.testing.assert_close(have[key], w, rtol=0, atol=21 * 1e-4, msg=key)
        else:
            torch.testing.assert_close(have[key], w, rtol=1e-4, atol=1e-6, msg=key)


@needs_cuda
def test_cuda_evaluation_matches_cpu():
    ds = tiny()
    gen = torch.Generator().manual_seed(0)
    users, items = (torch.randn(n, 16, generator=gen, dtype=torch.float64) for n in (ds.n_users, ds.n_items))
    want = train.make_evaluator(ds, torch.device("cpu"))(lambda u: users[u] @ items.T)
    have = train.make_evaluator(ds, torch.device("cuda"))(lambda u: users.cuda()[u] @ items.cuda().T)
    for split in want:
        assert have[split] == pytest.approx(want[split], abs=1e-12)


@needs_cuda
def test_cuda_run_profiles_checkpoints_and_resumes(tmp_path):
    lines = []
    cfg = run_cfg(**tiny_run(tmp_path, device="cuda", epochs=2, club_steps=5, profile=True, out=str(tmp_path / "run")))
    first = train.run(cfg, log=lines.append)
    assert first["epochs_run"] == 2 and math.isfinite(first["test"]["recall@20"]) and first["peak_memory_gib"] > 0
    assert sum(line.startswith("  profile: sample") for line in lines) == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["environment"]["device"].startswith("cuda")
    more = train.run(run_cfg(resume=str(tmp_path / "run" / "last.pt"), epochs=3), log=lambda *_: None)
    assert more["epochs_run"] == 3
