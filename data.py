"""Datasets for SAND: MMRec's on-disk format, and a built-in synthetic generator.

MMRec format (what the field's Amazon Baby / Sports / Clothing releases ship):

    <data-dir>/<name>/<name>.inter    tab-separated, header with userID, itemID, x_label
    <data-dir>/<name>/image_feat.npy  [n_items, d_image]
    <data-dir>/<name>/text_feat.npy   [n_items, d_text]

x_label is 0 train, 1 valid, 2 test; ids are 0-based and n_users / n_items are max id + 1 over the
whole file. The built-in datasets (`synthetic`, `synthetic-baby`, `synthetic-clothing`) are made in
memory from a seed; `python data.py --write DIR` writes one in MMRec's format (DIR/<dataset>-mmrec/).
"""
import argparse
import functools
import hashlib
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

SPLITS = ("train", "valid", "test")  # x_label 0, 1, 2


class DataError(ValueError):
    """Bad input data. The message is one line that says what is wrong and how to fix it."""


@dataclass
class Dataset:
    name: str
    n_users: int
    n_items: int
    train: np.ndarray  # [n_train, 2] int64 (user, item), file order
    valid: np.ndarray  # [n_valid, 2]
    test: np.ndarray  # [n_test, 2]
    image: np.ndarray  # [n_items, d_image] float32
    text: np.ndarray  # [n_items, d_text] float32
    factors: dict | None = None  # built-in only: planted item factors {"generic", "image", "text"}
    notes: list = field(default_factory=list)  # one line each on what loading left out or found odd

    def summary(self, short=False):
        """Sizes, and (unless short) the fingerprint that tells this data from any other of the same sizes."""
        sizes = {"name": self.name, "n_users": self.n_users, "n_items": self.n_items,
                 "n_train": len(self.train), "n_valid": len(self.valid), "n_test": len(self.test),
                 "d_image": self.image.shape[1], "d_text": self.text.shape[1]}
        return sizes if short else {**sizes, "fingerprint": self.fingerprint}

    @functools.cached_property
    def fingerprint(self):
        """A hash of everything a run reads: the three splits and both feature matrices (BLAKE2b, 128 bits)."""
        h = hashlib.blake2b(digest_size=16)
        for a in (self.train, self.valid, self.test, self.image, self.text):
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).data)
        h.update(f"{self.n_users} {self.n_items}".encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# MMRec's format

def _missing_help(folder, name):
    return (f"dataset '{name}' not found: {folder}/ must hold {name}.inter, image_feat.npy and "
            f"text_feat.npy. Amazon baby/sports/clothing come from the MMRec project's data release "
            f"(github.com/enoche/MMRec, 'data' link): unpack them as <data-dir>/<name>/, or pass "
            f"--data-dir. `--dataset synthetic` runs without a download.")


def read_inter(path):
    """Read a .inter file -> (user, item, x_label) int64 arrays, validated."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not part of userID
            header = f.readline().rstrip("\r\n").split("\t")
            lines = f.read().split("\n")  # not splitlines(): a text field may hold U+2028 and other line breaks
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file in UTF-8 ({e.reason} at byte {e.start})") from None
    need = ("userID", "itemID", "x_label")
    absent = [c for c in need if c not in header]
    if absent:
        raise DataError(f"{path}: header lacks {', '.join(absent)} (found {header}); "
                        f"MMRec's .inter header is: userID itemID rating timestamp x_label, tab-separated")
    twice = next((c for c in need if header.count(c) > 1), None)
    if twice:
        raise DataError(f"{path}: the header names {twice} twice")
    cols = [header.index(c) for c in need]
    integer = re.compile(r"-?[0-9]+")  # ASCII digits only (str.isdigit also takes '²')
    out = [[], [], []]
    for n, line in enumerate(lines, start=2):  # n: the line's number in the file
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{n}: {len(fields)} tab-separated fields, the header has {len(header)}")
        for values, c, col in zip(out, need, cols):
            v = fields[col].strip(" ")
            if not integer.fullmatch(v):
                raise DataError(f"{path}:{n}: {c} {shown(v)} is not an integer")
            if abs(int(v)) >= 2 ** 62:
                raise DataError(f"{path}:{n}: {c} {shown(v)} is too large for an id; ids must be 0-based and dense")
            values.append((int(v), n))
    if not out[0]:
        raise DataError(f"{path}: no interactions below the header")
    arrays = []
    for values, c in zip(out, need):
        a = np.array([v for v, _ in values], dtype=np.int64)
        if c != "x_label" and (a < 0).any():
            bad = int(np.flatnonzero(a < 0)[0])
            raise DataError(f"{path}:{values[bad][1]}: {c} {a[bad]} is negative; ids must be 0-based")
        arrays.append(a)
    user, item, label = arrays
    bad = np.flatnonzero((label < 0) | (label > 2))
    if len(bad):
        raise DataError(f"{path}:{out[2][bad[0]][1]}: x_label {label[bad[0]]} is not 0 (train), 1 (valid) or 2 (test)")
    return user, item, label


def shown(text, limit=40):
    """A value from a data file as an error message shows it: quoted, and cut short if long."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def memory_available():
    """Bytes of memory free on this machine (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def feature_header(path, n_items):
    """A feature file's shape [n_items, d] and dtype from its .npy header, checked against the file's size before
    anything is allocated."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e or 'empty file'})") from None
    if len(shape) != 2 or shape[0] != n_items:
        raise DataError(f"{path}: shape {shape}, expected [{n_items}, d]: one row per item "
                        f"(n_items = max itemID + 1 in the .inter file)")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise DataError(f"{path}: dtype {dtype} is not a real number type (features must be float or int)")
    if shape[1] < 2:
        raise DataError(f"{path}: {shape[1]} feature column(s); SAND splits each modality's features into a "
                        f"generic and a unique half, so it needs at least 2")
    size, want = os.path.getsize(path), offset + shape[0] * shape[1] * dtype.itemsize
    if size != want:
        raise DataError(f"{path}: its header promises {shape} {dtype} ({want} bytes), but the file has {size} "
                        f"bytes: it is truncated or not what it says")
    have, need = memory_available(), shape[0] * shape[1] * (4 + (dtype.itemsize if dtype != np.float32 else 0))
    if have is not None and need > have:
        raise DataError(f"{path}: {shape[0]} x {shape[1]} {dtype} values need {need / 2 ** 30:.1f} GiB to read as float32, "
                        f"more than the {have / 2 ** 30:.1f} GiB of memory available")
    return shape


def read_features(path, n_items):
    """Read a feature matrix [n_items, d] from a .npy file -> float32, validated (feature_header first)."""
    feature_header(path, n_items)
    try:
        feat = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf, refused below
        feat = np.ascontiguousarray(feat, dtype=np.float32)
    bad = ~np.isfinite(feat).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: {bad.sum()} rows hold NaN or inf, or values beyond float32's range (first: item "
                        f"{np.flatnonzero(bad)[0]}); fill or drop them before training")
    return feat


def from_interactions(name, user, item, label, image, text, n_users=None, n_items=None, factors=None):
    """Assemble and check a Dataset from flat (user, item, x_label) arrays."""
    n_users = int(user.max()) + 1 if n_users is None else n_users
    n_items = int(item.max()) + 1 if n_items is None else n_items
    pairs = np.stack([user, item], axis=1).astype(np.int64)
    parts = {s: pairs[label == k] for k, s in enumerate(SPLITS)}
    if len(parts["train"]) == 0:
        raise DataError(f"dataset '{name}': the train split (x_label 0) is empty")
    notes = []
    for s in ("valid", "test"):
        if len(parts[s]) == 0:
            raise DataError(f"dataset '{name}': the {s} split (x_label {SPLITS.index(s)}) has no users")
        # as MMRec (filter_out_cod_start_users): a user with no train interaction is not evaluated
        cold = ~np.isin(parts[s][:, 0], parts["train"][:, 0])
        if cold.any():
            notes.append(f"{s}: left out {len(np.unique(parts[s][cold, 0]))} user(s) with no train interaction "
                         f"({cold.sum()} interactions), as MMRec does")
            parts[s] = parts[s][~cold]
        if len(parts[s]) == 0:
            raise DataError(f"dataset '{name}': no user of the {s} split has a train interaction, so none "
                            f"can be evaluated")
    keys = {s: parts[s][:, 0] * n_items + parts[s][:, 1] for s in SPLITS}
    for s, other, what in (("train", "train", "repeat a (user, item) pair of the train split: each counts as another "
                                            "edge of the graph (MMRec's files have none)"),
                           ("valid", "train", "are also train pairs: masked when ranking, so never a hit"),
                           ("test", "train", "are also train pairs: masked when ranking, so never a hit"),
                           ("test", "valid", "are also valid pairs")):
        n = len(keys[s]) - len(np.unique(keys[s])) if s == other else int(np.isin(keys[s], keys[other]).sum())
        if n:
            notes.append(f"{s}: {n} pairs {what}")
    for m, feat in (("image", image), ("text", text)):
        zero = np.flatnonzero(~feat.any(axis=1))
        if len(zero):
            notes.append(f"{m} features: {len(zero)} all-zero rows (items {', '.join(map(str, zero[:5]))}"
                         f"{', ...' if len(zero) > 5 else ''}): similarity 0 to every item in the kNN graph")
        top = float(np.abs(feat).max())
        if top > 1e4:
            notes.append(f"{m} features reach {top:.1e} in absolute value: training may overflow (a loss or weight "
                         f"that is not finite); scale them first, e.g. each row to unit length")
    return Dataset(name, n_users, n_items, parts["train"], parts["valid"], parts["test"],
                   image, text, factors, notes)


def load_mmrec(data_dir, name, fits=None):
    """<data_dir>/<name>/ in MMRec's format; fits(n_users, n_items, {"image": d, "text": d}), if given, is called
    once the sizes are known, before the feature files are read (train.py's memory estimate)."""
    folder = os.path.join(data_dir, name)
    paths = [os.path.join(folder, f) for f in (f"{name}.inter", "image_feat.npy", "text_feat.npy")]
    if not all(os.path.isfile(p) for p in paths):
        raise DataError(_missing_help(folder, name))
    user, item, label = read_inter(paths[0])
    for ids, what in ((user, "userID"), (item, "itemID")):
        seen = len(np.unique(ids))
        if ids.max() >= 10 * seen:  # every id below the largest gets a learned row: raw ids would not fit in memory
            raise DataError(f"{paths[0]}: {what} goes up to {ids.max()} but only {seen} distinct ones occur; ids must "
                            f"be 0-based and dense, as in MMRec's files: remap them to 0..{seen - 1}")
    n_items = int(item.max()) + 1
    widths = {m: feature_header(p, n_items)[1] for m, p in zip(("image", "text"), paths[1:])}
    if fits:
        fits(int(user.max()) + 1, n_items, widths)
    image, text = (read_features(p, n_items) for p in paths[1:])
    return from_interactions(name, user, item, label, image, text)


def write_mmrec(ds, data_dir, name=None):
    """Write a Dataset in MMRec's format as data_dir/<name>/ (default: its own name), the three files together: each
    complete, all or none in place (write_together)."""
    name = name or ds.name
    folder = os.path.join(data_dir, name)
    lines = ["userID\titemID\trating\ttimestamp\tx_label"]
    for k, s in enumerate(SPLITS):
        lines += [f"{u}\t{i}\t1\t0\t{k}" for u, i in getattr(ds, s).tolist()]
    write_together({os.path.join(folder, f"{name}.inter"): ("\n".join(lines) + "\n", "w"),
                    **{os.path.join(folder, fname): (lambda f, a=arr: np.save(f, a), "wb")
                       for fname, arr in (("image_feat.npy", ds.image), ("text_feat.npy", ds.text))}})
    return folder


UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path, content, mode="w"):
    """Write `content` (text, or a function of the open file) to `path` whole: write_together() of one file."""
    write_together({path: (content, mode)})


def write_together(files):
    """Write {path: (content, mode)}, each to a temporary file of a name of its own beside it, then rename them all
    into place: an interrupted or failed write (a full disk) leaves every file as it was, and two writers never
    share a temporary file. Folders are made if they do not exist."""
    staged = []
    try:
        for path, (content, mode) in files.items():
            folder, name = os.path.split(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            staged.append((tmp, path))
            os.chmod(tmp, 0o666 & ~UMASK)  # as open() would make it (mkstemp makes it private)
            with os.fdopen(fd, mode) as f:
                content(f) if callable(content) else f.write(content)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# The built-in dataset: planted generic and modality-unique item factors

@dataclass
class SyntheticSpec:
    n_users: int = 2400  # before the 5-core filter
    n_items: int = 1200
    d_image: int = 512
    d_text: int = 128
    k_generic: int = 8  # factors shared by both modalities
    k_unique: int = 8  # factors unique to the image, and (as many) unique to the text
    mean_extra: float = 4.0  # interactions per user = 5 + Geometric(mean_extra)
    strength: float = 2.0  # how sharply users prefer items by factor affinity
    pop_exponent: float = 0.5  # popularity ~ rank^-pop_exponent (power law)
    noise: float = 0.5  # feature noise, relative to the signal's scale


BUILTIN = {
    "synthetic": SyntheticSpec(),
    # Amazon Baby's shapes (19,445 users, 7,050 items, 160,792 interactions, 4096-d / 384-d);
    # after the 5-core filter: 19,517 users, 7,112 items, 161,866 interactions
    "synthetic-baby": SyntheticSpec(n_users=19650, n_items=7400, d_image=4096, d_text=384, mean_extra=3.3),
    # a little above Amazon Clothing's shapes (39,387 users, 23,033 items, 278,677 interactions):
    # 42,441 users, 26,071 items, 308,169 interactions
    "synthetic-clothing": SyntheticSpec(n_users=47000, n_items=33500, d_image=4096, d_text=384,
                                        mean_extra=2.4, pop_exponent=0.3),
}


def five_core(user, item):
    """Drop users and items with fewer than 5 interactions, repeated until none remain."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        u_cnt = np.bincount(user[keep], minlength=user.max() + 1)
        i_cnt = np.bincount(item[keep], minlength=item.max() + 1)
        drop = keep & ((u_cnt[user] < 5) | (i_cnt[item] < 5))
        if not drop.any():
            return keep
        keep &= ~drop


def mmrec_split(user, rng):
    """x_label per interaction by MMRec's rule: per user in random order, n < 10 gives n-2 train,
    1 valid, 1 test; otherwise vt = floor(0.2 n), valid = vt // 2, test = vt - valid."""
    order = rng.permutation(len(user))
    order = order[np.argsort(user[order], kind="stable")]  # grouped by user, random within
    counts = np.bincount(user)
    n = counts[user[order]]
    start = np.cumsum(counts) - counts
    pos = np.arange(len(user)) - start[user[order]]
    vt = np.where(n < 10, 2, n // 5)
    n_train = n - vt
    label = np.zeros(len(user), dtype=np.int64)
    label[order] = (pos >= n_train).astype(np.int64) + (pos >= n_train + vt // 2)
    return label


def make_synthetic(name="synthetic", seed=0, spec=None):
    """Items carry generic factors (seen by both modalities) and image- and text-unique factors;
    image = map(generic, image-unique) + noise, text = map(generic, text-unique) + noise; users
    choose items through all three kinds of factors and a power-law popularity. Then the 5-core
    filter and MMRec's split. Returns a Dataset whose `factors` hold the planted truth."""
    spec = spec or BUILTIN[name]
    rng = np.random.default_rng(seed)
    U, I, kg, ku = spec.n_users, spec.n_items, spec.k_generic, spec.k_unique
    fac = {m: rng.standard_normal((I, k)).astype(np.float32)
           for m, k in (("generic", kg), ("image", ku), ("text", ku))}
    taste = {m: rng.standard_normal((U, f.shape[1])).astype(np.float32) for m, f in fac.items()}
    pop = np.log(rng.permutation(np.arange(1, I + 1)) ** -spec.pop_exponent).astype(np.float32)

    def features(mod, d):
        z = np.concatenate([fac["generic"], fac[mod]], axis=1)  # [I, kg + ku]
        proj = rng.standard_normal((z.shape[1], d)).astype(np.float32) / np.sqrt(z.shape[1])
        x = np.empty((I, d), dtype=np.float32)
        for lo in range(0, I, 4096):  # by rows (the same numbers and draws as all at once), in less memory
            rows = z[lo:lo + 4096] @ proj  # [b, d] float64, unit variance per column
            x[lo:lo + 4096] = rows + spec.noise * rng.standard_normal(rows.shape)
        return x

    image, text = features("image", spec.d_image), features("text", spec.d_text)

    # each user picks n_u distinct items: Gumbel-top-k over affinity logits (sampling w/o replacement)
    n_u = 5 + rng.geometric(1 / (1 + spec.mean_extra), size=U) - 1
    n_u = np.minimum(n_u, I // 4)
    gen = torch.Generator().manual_seed(seed)
    item_f = torch.from_numpy(np.concatenate([fac[m] for m in fac], axis=1))  # [I, kg + 2 ku]
    user_f = torch.from_numpy(np.concatenate([taste[m] for m in fac], axis=1))  # [U, kg + 2 ku]
    scale = spec.strength / np.sqrt(item_f.shape[1])
    users, items = [], []
    for lo in range(0, U, 1024):
        logits = scale * user_f[lo:lo + 1024] @ item_f.T + torch.from_numpy(pop)  # [b, I]
        gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=gen).clamp_min(1e-12)))
        top = torch.topk(logits + gumbel, int(n_u[lo:lo + 1024].max()), dim=1).indices.numpy()
        take = np.arange(top.shape[1]) < n_u[lo:lo + 1024, None]  # [b, max n_u]: first n_u per row
        users.append(np.nonzero(take)[0] + lo)
        items.append(top[take])
    user, item = np.concatenate(users), np.concatenate(items)

    keep = five_core(user, item)
    user, item = user[keep], item[keep]
    u_ids, user = np.unique(user, return_inverse=True)  # re-index 0..n-1, as MMRec's files are
    i_ids, item = np.unique(item, return_inverse=True)
    label = mmrec_split(user, rng)
    factors = {m: f[i_ids] for m, f in fac.items()}
    return from_interactions(name, user, item, label, image[i_ids], text[i_ids],
                             len(u_ids), len(i_ids), factors)


def load_dataset(name, data_dir="data", seed=0, fits=None):
    """A built-in dataset by name (made from `seed`), else <data_dir>/<name>/ in MMRec's format (load_mmrec)."""
    if name not in BUILTIN:
        return load_mmrec(data_dir, name, fits)
    ds = make_synthetic(name, seed)
    if fits:
        fits(ds.n_users, ds.n_items, {"image": ds.image.shape[1], "text": ds.text.shape[1]})
    return ds


def main():
    p = argparse.ArgumentParser(description="Write a built-in dataset in MMRec's format, as DIR/<name>/.")
    p.add_argument("--write", metavar="DIR", required=True, help="the data folder to write <name>/ into")
    p.add_argument("--dataset", default="synthetic", choices=sorted(BUILTIN))
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--name", help="the written dataset's name (default: <dataset>-mmrec); letters, digits, . _ -")
    args = p.parse_args()
    name = f"{args.dataset}-mmrec" if args.name is None else args.name
    folder = os.path.join(args.write, name)
    try:
        for bad, why in ((args.write == "", "--write '' is empty: give a folder"),
                         (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name), f"--name {name!r} is not a name of "
                          f"letters, digits, '.', '_' and '-' (starting with a letter or digit)"),
                         (name in BUILTIN, f"--name {name} is a built-in dataset's: train.py would make that data "
                          f"instead of reading these files"),
                         (not 0 <= args.seed < 2 ** 63, f"--seed must be from 0 to 2**63 - 1 (got {args.seed})"),
                         (os.path.isdir(folder) and os.listdir(folder), f"{folder}/ is not empty: delete it, or give "
                          f"another --name")):
            if bad:
                raise DataError(why)
        ds = make_synthetic(args.dataset, args.seed)
        write_mmrec(ds, args.write, name)
    except (DataError, OSError) as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {folder}/ ({ds.n_users} users, {ds.n_items} items, the built-in {args.dataset} of seed {args.seed}); "
          f"train on it: python train.py --dataset {name} --data-dir {shlex.quote(args.write)}")


if __name__ == "__main__":
    main()
