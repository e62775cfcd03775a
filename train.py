"""Train and evaluate SAND: BPR sampling, the training loop, MMRec's Recall/NDCG, the command line.

    python train.py                              # the built-in synthetic dataset, no download
    python train.py --dataset baby --dist l2     # data/baby/ in MMRec's format

Each run writes to its folder (--out): config.json, metrics.csv, results.json, last.pt, best.pt.
"""
import argparse
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
from sand import (BACKBONE_DEFAULTS, CLUB, MODALITIES, SAND, VBPRSAND, FastSAND, FastVBPRSAND, SANDConfig,
                  chunk_rows, fit_club, fit_club_fast, item_graph, lightgcn_adjacency, option)

KS = (10, 20)  # Recall@K and NDCG@K
CHECKPOINT_SECONDS = 60  # last.pt and best.pt: after the first epoch, then at most this often, and at the end


@dataclass
class TrainConfig:
    """Everything about a run that is not the model. Defaults follow MMRec and the released code."""
    dataset: str = option("synthetic", "a built-in dataset (synthetic, synthetic-baby, synthetic-clothing) "
                          "or a folder name under --data-dir in MMRec's format (baby, sports, clothing)")
    data_dir: str = option("data", "folder holding <dataset>/ in MMRec's format")
    data_seed: int = option(0, "seed of a built-in dataset's generator")
    device: str = option("", "cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    seed: int = option(999, "seed of initialisation and sampling")
    epochs: int = option(1000, "most training epochs", min=1)
    patience: int = option(20, "stop once valid Recall@20 has not improved for more than this many epochs", min=0)
    batch_size: int = option(2048, "BPR triples per training batch", min=1)
    lr: float = option(1e-4, "Adam learning rate (model and CLUB estimator)", above=0)
    out: str = option("", "run folder (default: runs/<dataset>-<dist>-seed<seed>, then -setting=value for each "
                      "other setting not at its default)")
    topk_out: str = option("", "write the top-20 items of every test user at the best epoch to this TSV")
    eval_only: bool = option(False, "evaluate the checkpoint --ckpt on valid and test, no training")
    ckpt: str = option("", "checkpoint for --eval-only")
    resume: str = option("", "continue the run that wrote this checkpoint (last.pt), in its folder and with its "
                         "settings; --epochs and --patience may extend it")
    ablation: bool = option(False, "run the ablation grid (full SAND with mi and l2, cross and intra CLUB "
                            "fitting, alignment only, distancing only, neither) and write ablation.csv/.md/.json")
    grid: tuple = option((), "run every point of the product of the listed settings, e.g. --grid alpha=0.012,0.1 "
                         "ureg=0.006,0.06 (any model or training setting that changes results), and write "
                         "grid.csv/.md/.json; the chosen point is the best mean valid Recall@20", nargs="+",
                         metavar="SETTING=V1,V2,...")
    seeds: int = option(3, "seeds per point in --ablation or --grid: --seed, --seed + 1, ...", min=1)
    plain: bool = option(False, "run sand.py's plain tier (SAND and fit_club: autograd, X_m formed) instead of "
                         "its fast paths (FastSAND, fit_club_fast), and on a GPU without CUDA graphs: the same method, only "
                         "float rounding differs; slower")
    profile: bool = option(False, "print per-epoch seconds in sampling, forward, backward, estimator, "
                           "optimizer and evaluation (synchronises the device; on a GPU the steps then "
                           "run without CUDA graphs, so that each phase can be timed)")


# ---------------------------------------------------------------------------------------------
# BPR sampling

class BPRSampler:
    """Every train interaction once per epoch in a fresh random order, each with one negative drawn
    uniformly from the items that occur in the train split and redrawn while it is one of the
    user's train items (MMRec's protocol). Vectorised, on the training device, from `generator`."""

    def __init__(self, train, n_items, generator):
        self.pairs, self.n_items, self.gen = train, n_items, generator  # [N, 2] on the device
        self.train_keys = torch.unique(train[:, 0] * n_items + train[:, 1])  # sorted
        self.candidates = torch.unique(train[:, 1])  # items in the train split
        per_user = torch.bincount(self.train_keys // n_items)
        if int(per_user.max()) == len(self.candidates):
            user = int(per_user.argmax())
            raise data.DataError(f"user {user} has a train interaction with every item of the train split, "
                                 f"so no negative can be drawn for it; drop that user from the train split")

    def is_train(self, user, item):
        """[B] bool: is (user, item) a train interaction? (binary search in the sorted keys)"""
        keys = user * self.n_items + item
        at = torch.searchsorted(self.train_keys, keys).clamp_max(len(self.train_keys) - 1)
        return self.train_keys[at] == keys

    def negatives(self, user):
        draw = lambda n: self.candidates[torch.randint(len(self.candidates), (n,), generator=self.gen,
                                                       device=user.device)]
        neg = draw(len(user))  # [N]
        todo = torch.arange(len(user), device=user.device)
        while True:  # a handful of rounds: each redraws only the rejected ones
            todo = todo[self.is_train(user[todo], neg[todo])]
            if len(todo) == 0:
                return neg
            neg[todo] = draw(len(todo))

    def epoch(self, batch_size, n_perms=0):
        """-> list of (users, positives, negatives) batches, [B] each. With n_perms, each batch also
        carries n_perms random permutations of all items [n_perms, I] (the CLUB bound's, one per
        modality): everything random in an epoch is drawn here, from one generator."""
        order = torch.randperm(len(self.pairs), generator=self.gen, device=self.pairs.device)
        user, pos = self.pairs[order].unbind(1)
        neg = self.negatives(user)
        batches = list(zip(user.split(batch_size), pos.split(batch_size), neg.split(batch_size)))
        if n_perms:
            perm = lambda: torch.randperm(self.n_items, generator=self.gen, device=user.device)  # [I]
            batches = [b + (torch.stack([perm() for _ in range(n_perms)]),) for b in batches]
        return batches


# ---------------------------------------------------------------------------------------------
# Evaluation: full ranking, MMRec's Recall@K and NDCG@K

class Evaluator:
    """Full ranking over all items for every user with items in a split, the user's train items
    masked (for valid and test alike). Per user with n_u split items and hits h_r at ranks r = 1..K:
        Recall@K = sum_r h_r / n_u
        NDCG@K   = sum_r h_r / log2(r + 1)  /  sum_{r <= min(n_u, K)} 1 / log2(r + 1)
    both averaged over the split's users. Since both splits mask the same train items, one top-K per
    user serves valid and test. The masks are indexed once here, so evaluating is a few large tensor
    ops per chunk of users and one host sync. A pair repeated within a split counts once.
    Scores come from a function score(users [b]) -> [b, I], a new tensor (it is masked in place)."""

    def __init__(self, train, splits, n_items, device, chunk=None):
        key = lambda pairs: torch.unique(pairs[:, 0] * n_items + pairs[:, 1])  # sorted
        train, keys = key(train), {name: key(pairs) for name, pairs in splits.items()}
        self.n_items = n_items
        self.users = torch.unique(torch.cat([k // n_items for k in keys.values()]))  # [n_eval] sorted
        self.splits = {}
        for name, k in keys.items():
            users, n_u = torch.unique(k // n_items, return_counts=True)
            rows = torch.searchsorted(self.users, users)  # their rows among self.users
            self.splits[name] = (k.to(device), rows.to(device), n_u.to(device).double())
        train_user = train // n_items
        chunk = chunk or chunk_rows(n_items, device)  # users per [chunk, I] score matrix
        self.chunks = []
        for lo in range(0, len(self.users), chunk):
            users = self.users[lo:lo + chunk]
            train_keys = train[torch.isin(train_user, users)]  # train pairs of these users
            rows = torch.searchsorted(users, train_keys // n_items)  # row within the chunk
            self.chunks.append((users.to(device), rows.to(device), (train_keys % n_items).to(device)))
        self.users = self.users.to(device)
        discount = 1 / torch.log2(torch.arange(2, max(KS) + 2, device=device, dtype=torch.float64))
        self.discount, self.ideal = discount, discount.cumsum(0)  # [K]: 1/log2(r+1), IDCG by length

    @torch.no_grad()
    def topk(self, score, k=max(KS)):
        """-> [n_eval, k] item ids per user of self.users, best first, train items excluded."""
        out = []
        for users, rows, cols in self.chunks:
            scores = score(users)  # [b, I]
            scores[rows, cols] = -math.inf
            out.append(scores.topk(min(k, self.n_items), dim=1).indices)
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, score):
        """-> {split: {"recall@10": ..., "ndcg@10": ..., "recall@20": ..., "ndcg@20": ...}}"""
        top_keys = self.users[:, None] * self.n_items + self.topk(score)  # [n_eval, K]
        names, values = [], []
        for split, (keys, rows, n_u) in self.splits.items():
            hits = torch.isin(top_keys[rows], keys).double()  # [n_split_users, K]
            for k in KS:
                idcg = self.ideal[n_u.long().clamp_max(k) - 1]  # [n_split_users]
                top = hits[:, :k]  # [n_split_users, min(k, I)]
                names += [(split, f"recall@{k}"), (split, f"ndcg@{k}")]
                values += [(top.sum(1) / n_u).mean(), ((top * self.discount[:top.shape[1]]).sum(1) / idcg).mean()]
        result = {}
        for (split, metric), v in zip(names, torch.stack(values).tolist()):
            result.setdefault(split, {})[metric] = v
        return result


# ---------------------------------------------------------------------------------------------
# What the learned parts carry (built-in datasets, whose planted factors are known)

def ridge_r2(x_fit, x_new, targets, penalties=10.0 ** np.arange(-3, 5)):
    """Held-out R^2 of a ridge regression y ~ x for each target {name: (y_fit, y_new)}, in closed
    form: columns of x standardised on the fitting rows, each target's penalty picked from `penalties`
    by exact leave-one-out error on those rows. One SVD of x serves every target and penalty:
        coef = (X^T X + lam I)^-1 X^T y = V diag(s / (s^2 + lam)) U^T y   (X = U diag(s) V^T)"""
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-12)
    x_fit, x_new = (x_fit - mean).div_(std), (x_new - mean).div_(std)
    u, sv, vh = torch.linalg.svd(x_fit, full_matrices=False)  # [n, r], [r], [r, d]
    shrinks = [sv ** 2 / (sv ** 2 + lam) for lam in penalties]  # [r] each
    leverages = [(u ** 2 * shrink).sum(1) for shrink in shrinks]  # [n] each: diagonal of the hat matrix
    out = {}
    for name, (y_fit, y_new) in targets.items():
        y_mean = y_fit.mean(0)
        uty = u.T @ (y_fit - y_mean)  # [r, k]
        loo = []
        for shrink, leverage in zip(shrinks, leverages):
            fitted = u @ (shrink[:, None] * uty)  # [n, k]
            loo.append((((y_fit - y_mean - fitted) / (1 - leverage)[:, None]) ** 2).sum())
        lam = penalties[int(torch.stack(loo).argmin())]
        coef = vh.T @ ((sv / (sv ** 2 + lam))[:, None] * uty)  # [d, k]
        residual = y_new - (x_new @ coef + y_mean)
        out[name] = float(1 - (residual ** 2).sum() / ((y_new - y_new.mean(0)) ** 2).sum())
    return out


def unique_info(model, factors, seed=0):
    """R^2 of each planted factor group (generic, image-unique, text-unique) predicted from each
    learned part that the model's parts() gives (SAND: per modality g_m, u_m and their distancing
    projections a_m, b_m) by ridge regression fitted on a random half of the items, scored on the other half."""
    STATUS.show("planted-factor diagnostic: ridge R^2 of each learned part ...")
    n = len(factors["generic"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit_rows, new_rows = perm[:n // 2], perm[n // 2:]
    truth = {}  # {factor group: (rows to fit on, rows to score on)}
    for name, f in factors.items():
        y = torch.from_numpy(f).double()
        truth[name] = (y[fit_rows], y[new_rows])
    out = {}
    for part, x in model.parts().items():
        x = x.cpu()  # float32; only the two halves of the rows are made float64
        r2 = ridge_r2(x[fit_rows].double(), x[new_rows].double(), truth)
        out[part] = {name: round(v, 4) for name, v in r2.items()}
    return out


def format_r2(r2):
    lines = ["R^2 of planted factors from learned parts (held-out items): init -> best epoch",
             f"{'part':16s}" + "".join(f"{f:>20s}" for f in next(iter(r2["best"].values())))]
    for part, row in r2["best"].items():
        lines.append(f"{part:16s}" + "".join(f"{r2['init'][part][f]:>10.3f} ->{v:>7.3f}" for f, v in row.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Building and saving a run

class UsageError(Exception):
    """A command line that cannot be carried out; the message says why in one line."""


def flag(name):
    """The command-line flag of a configuration field: club_fit -> --club-fit."""
    return "--" + name.replace("_", "-")


def default(f, backbone):
    """The default of configuration field `f` for `backbone` (sand.BACKBONE_DEFAULTS, else the field's)."""
    return BACKBONE_DEFAULTS[backbone].get(f.name, f.default)


def make_config(**settings):
    """A run configuration with these settings; every other one at its default for the backbone."""
    backbone = settings.get("backbone", SANDConfig.backbone)
    parts = [{f.name: settings.get(f.name, default(f, backbone)) for f in dataclasses.fields(cls)}
             for cls in (SANDConfig, TrainConfig)]
    unknown = settings.keys() - parts[0].keys() - parts[1].keys()
    if unknown:
        raise TypeError(f"make_config: no setting {', '.join(sorted(unknown))}")
    return RunConfig(SANDConfig(**parts[0]), TrainConfig(**parts[1]))


def off_default(cfg):
    """{field: value} of every setting of the run configuration that is not at its default (for its backbone)."""
    return {f.name: getattr(part, f.name) for part in (cfg.sand, cfg.train) for f in dataclasses.fields(part)
            if getattr(part, f.name) != default(f, cfg.sand.backbone)}


def resolve_device(name):
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"numbered from 0; use --device cuda:0")
    return device


def build(cfg, ds, device, seed):
    """Model, CLUB estimator and their optimizers, initialised from `seed`."""
    torch.manual_seed(seed)
    features = {"image": torch.from_numpy(ds.image), "text": torch.from_numpy(ds.text)}
    if cfg.sand.backbone == "vbpr":
        model = (VBPRSAND if cfg.train.plain else FastVBPRSAND)(cfg.sand, ds.n_users, features).to(device)
        pair_dim = cfg.sand.embed_dim // 2  # the distancing pairs are the halves themselves
    else:
        if cfg.sand.knn_k > ds.n_items:
            raise UsageError(f"--knn-k {cfg.sand.knn_k} is more than the {ds.n_items} items of {ds.name}")
        adjacency = lightgcn_adjacency(torch.from_numpy(ds.train), ds.n_users, ds.n_items)
        STATUS.show(f"building the item-item kNN graph of {ds.n_items} items ...")
        graph = item_graph(features["image"].to(device), features["text"].to(device), cfg.sand.knn_k,
                           cfg.sand.image_weight)
        model = (SAND if cfg.train.plain else FastSAND)(cfg.sand, ds.n_users, features, adjacency, graph).to(device)
        pair_dim = cfg.sand.dist_dim
    club = CLUB(pair_dim, cfg.sand.club_hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    club_opt = torch.optim.Adam(club.parameters(), lr=cfg.train.lr, fused=True)
    return model, club, opt, club_opt


@dataclass
class RunConfig:
    sand: SANDConfig
    train: TrainConfig


def save_json(path, obj):
    data.atomic_write(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path, state):
    data.atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def write_metrics(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    data.atomic_write(path, buf.getvalue())


class Status:
    """The command line's progress line: on a terminal, one line rewritten in place and cleared before
    each logged line; elsewhere (a log file, a pipe) nothing, so the output is one line per epoch.
    main() turns it on when stdout is a terminal."""

    def __init__(self):
        self.on, self.width, self.shown_at = False, 0, -math.inf

    def show(self, text, every=0.0):
        """Put `text` on the progress line (at most once per `every` seconds)."""
        if self.on and time.perf_counter() - self.shown_at >= every:
            sys.stdout.write("\r" + text.ljust(self.width))
            sys.stdout.flush()
            self.width, self.shown_at = len(text), time.perf_counter()

    def log(self, *args):
        """print(), after clearing the progress line."""
        if self.width:
            sys.stdout.write("\r" + " " * self.width + "\r")
            self.width = 0
        print(*args, flush=True)


STATUS = Status()


class Timer:
    """Seconds per phase of an epoch; with `sync`, waits for the device at each lap (profiling)."""

    def __init__(self, device, sync):
        self.device, self.sync = device, sync and device.type == "cuda"
        self.total, self.last = {}, time.perf_counter()

    def lap(self, name):
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.total[name] = self.total.get(name, 0.0) + now - self.last
        self.last = now


# ---------------------------------------------------------------------------------------------
# Training

class TrainStep:
    """One training step on a batch (users, positives, negatives[, permutations]): the model's forward
    and backward, the CLUB estimator's steps (fit_club, after the model's backward and before its
    optimizer step), the model's optimizer step; returns the loss terms.
    On a GPU, the second batch of each size records the whole step once as a CUDA graph (thousands of
    kernels at Baby's size, most of them the estimator's), and every later batch of that size copies its
    tensors into the graph's input buffers and replays it: the same kernels on the same memory, so the
    same numbers, without launching them one by one from Python. The first batch of each size runs
    directly, which also makes the optimizers' state that the graph updates. With `graphs` off (--profile,
    which times each phase, and --plain) every step runs directly. `plain`: fit_club, else fit_club_fast."""

    def __init__(self, model, club, opt, club_opt, device, graphs=True, plain=False):
        self.model, self.club, self.opt, self.club_opt = model, club, opt, club_opt
        self.fit_club = fit_club if plain else fit_club_fast
        self.graphed = graphs and device.type == "cuda"
        self.seen, self.graphs = set(), {}  # batch sizes run so far; size: (graph, its input buffers, its terms)

    def run(self, batch, timer):
        user, pos, neg, *perms = batch
        self.opt.zero_grad(set_to_none=True)
        loss, terms, pairs = self.model.loss(user, pos, neg, self.club, *perms)
        timer.lap("forward")
        loss.backward()
        timer.lap("backward")
        if pairs is not None:
            terms["club_nll"] = self.fit_club(self.club, self.club_opt, *pairs, self.model.cfg.club_steps)
            timer.lap("estimator")
        self.opt.step()
        timer.lap("optimizer")
        return terms

    def __call__(self, batch, timer):
        size = len(batch[0])
        if not self.graphed or size not in self.seen:
            self.seen.add(size)
            return self.run(batch, timer)
        if size not in self.graphs:  # record (capture runs nothing), then replay below
            inputs = [t.clone() for t in batch]  # the graph's inputs, at fixed addresses
            graph, groups = torch.cuda.CUDAGraph(), self.opt.param_groups + self.club_opt.param_groups
            for g in groups:  # capture asks for it; fused Adam computes the same either way
                g["capturable"] = True
            with torch.cuda.graph(graph):
                terms = self.run(inputs, timer)
            for g in groups:
                g["capturable"] = False
            self.graphs[size] = graph, inputs, terms
        graph, inputs, terms = self.graphs[size]
        for buffer, t in zip(inputs, batch):
            buffer.copy_(t)
        graph.replay()
        return {k: v.clone() for k, v in terms.items()}  # the next replay overwrites them


def train_epoch(model, step, sampler, cfg, timer):
    """One pass over the train interactions; returns the mean of each loss term."""
    model.train()
    sums = {}
    batches = sampler.epoch(cfg.train.batch_size, len(MODALITIES) if cfg.sand.dist == "mi" else 0)
    timer.lap("sample")
    start = time.perf_counter()
    for done, batch in enumerate(batches, 1):
        for k, v in step(batch, timer).items():
            sums[k] = sums.get(k, 0) + v
        spent = time.perf_counter() - start
        STATUS.show(f"training: batch {done}/{len(batches)}, {spent:.1f} s, about "
                    f"{spent / done * (len(batches) - done):.0f} s left in this epoch", every=0.2)
    names = list(sums)
    values = (torch.stack([sums[k] for k in names]) / len(batches)).tolist()  # one host sync
    return dict(zip(names, values))


def early_stopping(score, best, bad_epochs, patience):
    """MMRec's rule: the score, rounded to 4 decimals as MMRec reports it, must strictly beat the
    best; stop once more than `patience` epochs in a row have not. -> (best, bad_epochs, improved, stop)"""
    score = round(score, 4)
    if score > best:
        return score, 0, True, False
    return best, bad_epochs + 1, False, bad_epochs + 1 > patience


def make_evaluator(ds, device):
    splits = {s: torch.from_numpy(getattr(ds, s)) for s in ("valid", "test")}
    return Evaluator(torch.from_numpy(ds.train), splits, ds.n_items, device)


def most_popular(ds, device):
    """The baseline every model must beat: rank items by their train interaction count."""
    counts = torch.bincount(torch.from_numpy(ds.train[:, 1]), minlength=ds.n_items).double().to(device)
    return make_evaluator(ds, device)(lambda users: counts.repeat(len(users), 1))


def scorer(model):
    """-> score(users [b]) -> [b, I]: the model's score of every item (SAND.score), from embeddings
    recomputed in eval mode (not left over from the last training batch)."""
    model.eval()
    with torch.no_grad():
        users, items, _ = model(parts=False)
    return functools.partial(model.score, users, items)


def evaluate(model, evaluator):
    return evaluator(scorer(model))


def fit(cfg, ds, device, out, resume=None, log=print):
    """Train with MMRec's early stopping on valid Recall@20; returns the results dict."""
    model, club, opt, club_opt = build(cfg, ds, device, cfg.train.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    sampler = BPRSampler(torch.from_numpy(ds.train).to(device), ds.n_items, gen)
    evaluator = make_evaluator(ds, device)
    step = TrainStep(model, club, opt, club_opt, device, graphs=not (cfg.train.profile or cfg.train.plain),
                     plain=cfg.train.plain)
    if resume is None:
        state = {"epoch": 0, "best_score": -1.0, "bad_epochs": 0, "best_epoch": None, "best": None,
                 "history": [], "stopped": False, "diverged": None,
                 "unique_info_r2_init": ds.factors and unique_info(model, ds.factors)}
    else:
        model.load_state_dict(resume["model"])
        club.load_state_dict(resume["club"])
        opt.load_state_dict(resume["opt"])
        club_opt.load_state_dict(resume["club_opt"])
        gen.set_state(resume["generator"])
        state = {"diverged": None, **resume["state"]}  # a checkpoint from before "diverged" was kept
        state["stopped"] = state["diverged"] is not None or state["bad_epochs"] > cfg.train.patience  # --patience may have changed
        log(f"resuming after epoch {state['epoch']} (--epochs {cfg.train.epochs}, --patience {cfg.train.patience})"
            + (": it has already stopped early" if state["stopped"] else ""))
    best_weights, saved_at = None, time.perf_counter() if resume else -math.inf  # a fresh run saves after epoch 1

    def save():  # last.pt: everything needed to resume; best.pt: the best epoch's weights
        save_checkpoint(os.path.join(out, "last.pt"), {
            "model": model.state_dict(), "club": club.state_dict(), "opt": opt.state_dict(),
            "club_opt": club_opt.state_dict(), "generator": gen.get_state(), "state": state,
            "epoch": state["epoch"], "config": dataclasses.asdict(cfg), "dataset": ds.summary()})
        if best_weights is not None:
            save_checkpoint(os.path.join(out, "best.pt"), {"model": best_weights, "epoch": state["best_epoch"],
                                                           "config": dataclasses.asdict(cfg), "dataset": ds.summary()})

    while not state["stopped"] and state["epoch"] < cfg.train.epochs:
        epoch = state["epoch"] + 1
        timer = Timer(device, cfg.train.profile)
        t0 = time.perf_counter()
        terms = train_epoch(model, step, sampler, cfg, timer)
        t1 = time.perf_counter()
        if not all(math.isfinite(v) for v in terms.values()):
            log(f"epoch {epoch}: a loss is not finite ({terms}); stopping, "
                + (f"the best epoch ({state['best_epoch']}) is kept" if state["best_epoch"] else "no epoch finished"))
            state["diverged"], state["stopped"] = epoch, True  # and a resumed run stays stopped
            break
        metrics = evaluate(model, evaluator)
        timer.lap("evaluate")
        t2 = time.perf_counter()
        state["best_score"], state["bad_epochs"], improved, state["stopped"] = early_stopping(
            metrics["valid"]["recall@20"], state["best_score"], state["bad_epochs"], cfg.train.patience)
        if improved:
            state.update(best_epoch=epoch, best=metrics)
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["epoch"] = epoch
        row = {"epoch": epoch, **{k: round(v, 6) for k, v in terms.items()},
               **{f"{s}_{k}": round(v, 6) for s in metrics for k, v in metrics[s].items()},
               "train_s": round(t1 - t0, 3), "eval_s": round(t2 - t1, 3)}
        state["history"].append(row)
        write_metrics(os.path.join(out, "metrics.csv"), state["history"])
        if time.perf_counter() - saved_at > CHECKPOINT_SECONDS:
            save()
            saved_at = time.perf_counter()
        loss_txt = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        log(f"epoch {epoch:4d} | {loss_txt} | valid R@20 {metrics['valid']['recall@20']:.4f} "
            f"test R@20 {metrics['test']['recall@20']:.4f} | train {t1 - t0:.2f}s eval {t2 - t1:.2f}s"
            + (" *" if improved else ""))
        if cfg.train.profile:
            log("  profile: " + " ".join(f"{k} {v:.3f}s" for k, v in timer.total.items()))
    save()
    hist = state["history"]
    results = {"best_epoch": state["best_epoch"], "valid": state["best"] and state["best"]["valid"],
               "test": state["best"] and state["best"]["test"], "epochs_run": state["epoch"],
               "diverged": state["diverged"] is not None,
               "train_s_per_epoch": float(np.median([r["train_s"] for r in hist])) if hist else None,
               "eval_s_per_epoch": float(np.median([r["eval_s"] for r in hist])) if hist else None,
               "peak_memory_gib": peak_memory_gib(device), "dataset": ds.summary()}
    if state["best_epoch"] is not None:  # leave the model at its best epoch
        model.load_state_dict(best_weights or load_checkpoint(os.path.join(out, "best.pt"))["model"])
    if ds.factors is not None and state["best_epoch"] is not None:  # built-in data: what do the parts carry?
        results["unique_info_r2"] = {"init": state["unique_info_r2_init"], "best": unique_info(model, ds.factors)}
    return results, model, evaluator


def peak_memory_gib(device):
    """Peak memory of this process so far: allocated on the GPU, or resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} not found (a run folder holds best.pt and last.pt)")
    not_ours = f"{path} is not a checkpoint written by train.py (a run folder's best.pt or last.pt)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # whatever torch.load makes of a file that is not one of ours
        raise UsageError(f"{not_ours}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or not {"model", "epoch", "config", "dataset"} <= ckpt.keys():
        raise UsageError(not_ours)
    return ckpt


def config_from_checkpoint(ckpt):
    c = ckpt["config"]  # a setting added since it was written takes its default
    return make_config(**c["sand"], **c["train"])


# A saved run keeps its configuration when it is continued (--resume) or evaluated (--eval-only). Only
# these flags may change it; any other flag must be left out or match the saved run, never ignored.
CHANGEABLE = {"resume": ("resume", "epochs", "patience", "device", "data_dir", "topk_out", "profile"),
              "eval_only": ("eval_only", "ckpt", "device", "data_dir", "topk_out")}


def saved_config(ckpt, path, cfg, mode):
    """The configuration of the run in checkpoint `ckpt` (read from `path`), with each flag of
    CHANGEABLE[mode] that the command line's `cfg` sets (to other than its default) taken from it."""
    saved = config_from_checkpoint(ckpt)
    for name, value in off_default(cfg).items():
        part = saved.sand if hasattr(saved.sand, name) else saved.train
        old = getattr(part, name)
        if value != old and name not in CHANGEABLE[mode]:
            others = ", ".join(flag(n) for n in CHANGEABLE[mode] if n != mode)
            raise UsageError(f"{flag(name)} {value} differs from the run in {path} ({old}); {flag(mode)} keeps "
                             f"that run's settings except {others}: leave out {flag(name)}, or start a new run")
        setattr(part, name, value)
    return saved


def environment(device):
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "command": sys.argv}


# Settings that do not change what a run computes
NOT_IN_RESULTS = ("data_dir", "device", "out", "topk_out", "eval_only", "ckpt", "resume", "ablation", "grid",
                  "seeds", "profile")


def default_folder(cfg, points=None):
    """runs/<dataset>-<dist>-seed<seed> for a run; for a grid of `points` (--ablation, --grid), whose
    runs are named by point and seed, runs/ablation-<dataset> or runs/grid-<dataset>-<the listed settings>;
    then -setting=value for every other setting that changes the results and is not at its default:
    runs with different settings do not overwrite each other's files."""
    t = cfg.train
    if points is None:
        name, named = f"{t.dataset}-{cfg.sand.dist}-seed{t.seed}", ("dataset", "dist", "seed")
    else:
        listed = list(dict.fromkeys(k for _, _, changes in points for k in changes))  # in order, once each
        name = f"grid-{t.dataset}-" + "-".join(listed) if t.grid else f"ablation-{t.dataset}"
        named = ("dataset", "seed", *listed)
    for setting, value in off_default(cfg).items():
        if setting not in NOT_IN_RESULTS + named:
            name += f"-{setting}={value}"
    return os.path.join("runs", name)


def load(t):
    """The dataset of training configuration `t`."""
    STATUS.show(f"loading {t.dataset} ..." if t.dataset not in data.BUILTIN else f"making the built-in {t.dataset} ...")
    return data.load_dataset(t.dataset, t.data_dir, t.data_seed)


def run(cfg, log=print):
    """The command line's work, given a resolved configuration."""
    check(cfg)
    t = cfg.train
    if t.eval_only:
        return eval_only(cfg, log)
    resume = None
    if t.resume:
        resume = load_checkpoint(t.resume)
        if "opt" not in resume:
            raise UsageError(f"{t.resume} holds only the best epoch's weights; resume from the run's last.pt")
        cfg = saved_config(resume, t.resume, cfg, "resume")
        cfg.train.out = os.path.dirname(os.path.abspath(t.resume))  # it goes on in its own folder
        t = cfg.train
    device = resolve_device(t.device)
    if t.ablation or t.grid:
        points = ABLATIONS if t.ablation else grid_points(t.grid)
        grid_runs(cfg, points)  # a bad point is refused now, before the data is loaded
        return grid(cfg, load(t), device, points, log)
    ds = load(t)
    out = t.out or default_folder(cfg)
    results, model, evaluator = train_one(cfg, ds, device, out, resume, log)
    if results["best_epoch"] is None:
        unwritten = f", {t.topk_out} was not written" if t.topk_out else ""
        log(f"no epoch finished: {out}/results.json holds no metrics{unwritten}")
        return results
    log(f"best epoch {results['best_epoch']}: test " + json.dumps(results["test"]))
    if "unique_info_r2" in results:
        log(format_r2(results["unique_info_r2"]))
    if t.topk_out:
        write_topk_file(model, evaluator, t.topk_out)
    return results


def train_one(cfg, ds, device, out, resume=None, log=print):
    """One run in folder `out`: config.json, then training, then results.json."""
    os.makedirs(out, exist_ok=True)
    # results.json exists only for a finished run, and a fresh run starts without an earlier run's files
    for name in ("results.json",) if resume else ("results.json", "metrics.csv", "last.pt", "best.pt"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    save_json(os.path.join(out, "config.json"), {**dataclasses.asdict(cfg), "dataset_stats": ds.summary(),
                                                 "environment": environment(device)})
    log(f"{ds.summary()} on {device}; writing to {out}/")
    for note in ds.notes:
        log(note)
    try:
        results, model, evaluator = fit(cfg, ds, device, out, resume, log)
    except KeyboardInterrupt:
        last = os.path.join(out, "last.pt")
        log(f"interrupted: --resume {last} continues from its epoch" if os.path.isfile(last) else
            f"interrupted before the first epoch ended: {out}/ holds no checkpoint")
        raise
    save_json(os.path.join(out, "results.json"), results)
    return results, model, evaluator


ABLATIONS = [  # the ablation grid's points: (run folder prefix, what it is, settings)
    ("mi-cross", "SAND, --dist mi (CLUB fitted cross-modal, as released)", {"dist": "mi", "align": "solo", "club_fit": "cross"}),
    ("mi-intra", "SAND, --dist mi --club-fit intra (as the paper describes)", {"dist": "mi", "align": "solo", "club_fit": "intra"}),
    ("l2", "SAND, --dist l2", {"dist": "l2", "align": "solo"}),
    ("align-only", "alignment only: --dist none", {"dist": "none", "align": "solo"}),
    ("dist-only", "distancing only: --align none --dist mi", {"dist": "mi", "align": "none"}),
    ("neither", "neither: --dist none --align none (with --backbone vbpr: VBPR itself)", {"dist": "none", "align": "none"}),
]
METRICS = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")]
# what --grid may list: every setting that changes results, except the data and the seed (--seeds)
GRID_SETTINGS = {f.name: f for part in (SANDConfig, TrainConfig) for f in dataclasses.fields(part)
                 if f.name not in NOT_IN_RESULTS + ("dataset", "data_seed", "seed")}


def parse_setting(f, text):
    """A value for field `f` from its text, as its flag would read it; a UsageError if it is not one."""
    try:
        value = {"true": True, "false": False}[text.lower()] if f.type is bool else f.type(text)
    except (ValueError, KeyError):
        raise UsageError(f"--grid {f.name}={text}: {text!r} is not a{'n' if f.type is int else ''} "
                         f"{f.type.__name__}") from None
    if value not in f.metadata.get("choices", (value,)):
        raise UsageError(f"--grid {f.name}={text}: choose from {', '.join(f.metadata['choices'])}")
    return value


def grid_points(specs):
    """--grid's words (setting=v1,v2,...) -> the points of their product, in the order listed:
    [(run folder prefix, label, {setting: value})]."""
    axes = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in GRID_SETTINGS or not values:
            raise UsageError(f"--grid {spec!r} is not SETTING=V1,V2,... with one of the settings that change "
                             f"results: {', '.join(GRID_SETTINGS)}")
        if name in axes:
            raise UsageError(f"--grid lists {name} twice: give all its values once, {name}=V1,V2,...")
        axes[name] = [parse_setting(GRID_SETTINGS[name], v) for v in values.split(",")]
    points = []
    for combo in itertools.product(*axes.values()):
        changes = dict(zip(axes, combo))
        points.append(("-".join(f"{k}={v}" for k, v in changes.items()),
                       " ".join(f"{flag(k)} {v}" for k, v in changes.items()), changes))
    return points


def with_settings(cfg, changes, **train):
    """The run configuration with `changes` (model or training settings) and `train` applied; a changed
    backbone brings its own defaults for the settings left at theirs."""
    return make_config(**{**off_default(cfg), **changes, **train})


def grid_runs(cfg, points):
    """-> the grid's folder (--out) and its runs [(point, seed, folder, configuration)]: every point for
    --seeds seeds (--seed, --seed + 1, ...), each configuration checked."""
    out = cfg.train.out or default_folder(cfg, points)
    runs = []
    for key, _, changes in points:
        for seed in range(cfg.train.seed, cfg.train.seed + cfg.train.seeds):
            folder = os.path.join(out, f"{key}-seed{seed}")
            one = with_settings(cfg, changes, seed=seed, out=folder, ablation=False, grid=(), seeds=TrainConfig.seeds)
            try:
                check(one)
            except UsageError as e:
                raise UsageError(f"grid point {key}: {e}") from None
            runs.append((key, seed, folder, one))
    return out, runs


def grid(cfg, ds, device, points, log):
    """Runs every point of the grid (grid_runs), each run in its own folder, then writes <kind>.csv (a
    row per run), <kind>.md (per point, mean and sample std over its seeds) and <kind>.json (the chosen
    point), kind = ablation or grid. The chosen point has the best mean valid Recall@20 among the points
    none of whose runs diverged (a loss that was not finite); a tie goes to the point listed first. Its
    test metrics are what the grid reports: nothing is chosen by test. A run whose folder holds
    results.json for the same configuration is read back, not run again, so an interrupted grid goes on
    where it stopped."""
    kind = "grid" if cfg.train.grid else "ablation"
    out, runs = grid_runs(cfg, points)
    rows = []
    for key, seed, folder, one in runs:
        results = read_finished(folder, one) or train_one(one, ds, device, folder, log=lambda *_: None)[0]
        scores = {f"{s}_{m}": results[s] and results[s][m] for s in ("valid", "test") for m in METRICS}
        log(f"{key} seed {seed}: best epoch {results['best_epoch']}" + (", diverged" if results["diverged"] else "")
            + ", test " + " ".join(f"{m} {results['test'][m]:.4f}" if results["test"] else f"{m} -" for m in METRICS))
        rows.append({"point": key, "seed": seed, "best_epoch": results["best_epoch"],
                     "diverged": results["diverged"], **scores})
    write_metrics(os.path.join(out, f"{kind}.csv"), rows)
    columns = [f"{s}_{m}" for s in ("valid", "test") for m in METRICS]
    summary = []
    for key, label, changes in points:
        mine = [r for r in rows if r["point"] == key]
        done = [r for r in mine if r["best_epoch"] is not None]
        summary.append({
            "point": key, "label": label, "settings": changes, "diverged": sum(r["diverged"] for r in mine),
            "mean": {c: float(np.mean([r[c] for r in done])) for c in columns} if done else None,
            "std": {c: float(np.std([r[c] for r in done], ddof=1)) if len(done) > 1 else 0.0 for c in columns},
            "best_epoch": np.mean([r["best_epoch"] or 0 for r in mine]),
            "runs": [folder for k, _, folder, _ in runs if k == key]})
    eligible = [p for p in summary if not p["diverged"] and p["mean"]]
    chosen = max(eligible, key=lambda p: p["mean"]["valid_recall@20"], default=None)  # max keeps the first of ties
    seeds = sorted({seed for _, seed, _, _ in runs})
    lines = [f"Valid and test metrics at the best valid epoch on `{ds.name}`, mean ± sample std over "
             f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}).", "",
             "| point | " + " | ".join(c.replace("_", " ") for c in columns) + " | best epoch |",
             "|---" * (len(columns) + 2) + "|"]
    for p in summary:
        cells = [f"{p['mean'][c]:.4f} ± {p['std'][c]:.4f}" if p["mean"] else "-" for c in columns]
        mark = (" (chosen)" if p is chosen else "") + (f" (diverged in {p['diverged']} runs)" if p["diverged"] else "")
        lines.append(f"| {p['label']}{mark} | " + " | ".join(cells) + f" | {p['best_epoch']:.0f} |")
    popular = most_popular(ds, device)
    lines.append("| most popular (train counts, no training) | "
                 + " | ".join(f"{popular[c.split('_')[0]][c.split('_')[1]]:.4f}" for c in columns) + " | |")
    lines += ["", f"Chosen by the best mean valid Recall@20: {chosen['label']}; its test metrics are the grid's "
              "result." if chosen else "No point finished without diverging: none is chosen."]
    table = "\n".join(lines) + "\n"
    data.atomic_write(os.path.join(out, f"{kind}.md"), table)
    save_json(os.path.join(out, f"{kind}.json"), {
        "rule": "best mean valid recall@20 over the points with no diverged run; a tie goes to the point listed first",
        "chosen": chosen and {"point": chosen["point"], "settings": chosen["settings"], "runs": chosen["runs"],
                              **{s: {m: chosen["mean"][f"{s}_{m}"] for m in METRICS} for s in ("valid", "test")}}})
    log(table)
    return rows


def read_finished(folder, cfg):
    """results.json of a finished run with this configuration, else None."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # a tuple is a list there
    try:  # a setting added since the run was made takes its default
        same = as_json(make_config(**saved["sand"], **saved["train"])) == as_json(cfg)
    except TypeError:  # a setting that no longer exists
        return None
    return results if same else None


def write_topk_file(model, evaluator, path):
    """The top-20 items of every test user: a TSV line each, user id then items, best first."""
    rows = evaluator.splits["test"][1]
    top = evaluator.topk(scorer(model))[rows]
    lines = ["\t".join(map(str, [u] + row)) for u, row in zip(evaluator.users[rows].tolist(), top.tolist())]
    data.atomic_write(path, "\n".join(lines) + "\n")


def eval_only(cfg, log):
    if not cfg.train.ckpt:
        raise UsageError("--eval-only needs --ckpt PATH (a run folder's best.pt)")
    ckpt = load_checkpoint(cfg.train.ckpt)
    saved = saved_config(ckpt, cfg.train.ckpt, cfg, "eval_only")
    device = resolve_device(saved.train.device)
    ds = load(saved.train)
    if ds.summary() != ckpt["dataset"]:
        raise data.DataError(f"checkpoint was trained on {ckpt['dataset']}, but the data is {ds.summary()}")
    model = build(saved, ds, device, saved.train.seed)[0]
    model.load_state_dict(ckpt["model"])
    evaluator = make_evaluator(ds, device)
    metrics = evaluate(model, evaluator)
    log(json.dumps({"epoch": ckpt["epoch"], **metrics}, indent=2))
    if cfg.train.topk_out:
        write_topk_file(model, evaluator, cfg.train.topk_out)
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line

def parser():
    p = argparse.ArgumentParser(description="Train SAND (Separate Alignment aNd Distancing) and report "
                                "MMRec's Recall@10/20 and NDCG@10/20 at the best valid epoch.")
    for group, cls in (("training", TrainConfig), ("model (defaults: the authors' released code)", SANDConfig)):
        g = p.add_argument_group(group)
        for f in dataclasses.fields(cls):
            # default None: a flag left out takes its default for the backbone (make_config)
            if f.type is bool:
                g.add_argument(flag(f.name), action="store_true", default=None, help=f.metadata["help"])
            elif "nargs" in f.metadata:
                g.add_argument(flag(f.name), nargs=f.metadata["nargs"], help=f.metadata["help"],
                               metavar=f.metadata["metavar"])
            else:
                others = "".join(f"; {b}: {d[f.name]}" for b, d in BACKBONE_DEFAULTS.items() if f.name in d)
                shown = f" (default: {f.default}{others})" if f.default != "" else ""
                g.add_argument(flag(f.name), type=f.type, help=f.metadata["help"] + shown,
                               choices=f.metadata.get("choices"))
    return p


ONLY_WITH = {"ckpt": ("eval_only",), "seeds": ("ablation", "grid")}  # flags that mean something only with another


def check(cfg):
    """Every number of the configuration finite and within its option's range, no flag that would be
    ignored, no output path of the wrong kind (found out now, not after training), else a UsageError."""
    t, given = cfg.train, off_default(cfg)
    for name, needed in ONLY_WITH.items():
        if name in given and not any(getattr(t, n) for n in needed):
            raise UsageError(f"{flag(name)} is read only with {' or '.join(map(flag, needed))}")
    many = [n for n in ("ablation", "grid", "resume", "eval_only") if getattr(t, n)]
    if len(many) > 1:
        raise UsageError(f"{flag(many[0])} and {flag(many[1])} do not go together: run them one at a time")
    for name in ("topk_out", "profile"):
        if many and many[0] in ("ablation", "grid") and getattr(t, name):
            raise UsageError(f"{flag(name)} does nothing in {flag(many[0])}: run one point alone with it")
    for name, folder in (("out", True), ("topk_out", False)):
        path = getattr(t, name)
        if path and os.path.exists(path) and os.path.isdir(path) != folder:
            raise UsageError(f"{flag(name)} {path} is a {'file' if folder else 'folder'}: give a "
                             f"{'folder' if folder else 'file'} path")
    for part in (cfg.sand, cfg.train):
        for f in dataclasses.fields(part):
            v, m, name = getattr(part, f.name), f.metadata, flag(f.name)
            if f.type is float and not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number (got {v})")
            if "min" in m and not v >= m["min"]:
                raise UsageError(f"{name} must be at least {m['min']} (got {v})")
            if "above" in m and not v > m["above"]:
                raise UsageError(f"{name} must be above {m['above']} (got {v})")
            if "max" in m and not v <= m["max"]:
                raise UsageError(f"{name} must be at most {m['max']} (got {v})")


def config_from_args(args):
    given = {k: v for k, v in vars(args).items() if v is not None}  # the flags on the command line
    if "grid" in given:
        given["grid"] = tuple(given["grid"])  # argparse gives a list
    return make_config(**given)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        STATUS.on = sys.stdout.isatty()
        run(config_from_args(args), log=STATUS.log)
    except (data.DataError, UsageError, OSError) as e:  # OSError: a file or folder that cannot be written
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("train.py: interrupted; every file written so far is complete (a run continues with --resume "
              "RUN/last.pt, a --grid or --ablation by running it again)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
