"""Train and evaluate SAND: BPR sampling, MMRec's Recall/NDCG, one training step, the epoch loop.

    python train.py                              # the built-in synthetic dataset, no download
    python train.py --dataset baby --dist l2     # data/baby/ in MMRec's format

Read it top to bottom: 1. BPR sampling, 2. evaluation, 3. one training step (train_step), 4. the epoch
loop with early stopping (fit), 5. what the learned parts carry (a diagnostic on the built-in data).
Below the banner "Run management" comes what keeps runs safe and comparable: the configuration and its
checks, the run folder, checkpoints, resume and interruption, grids, progress, CUDA graphs and the
command line. A reader of the method may stop at that banner. Defaults live in one place each:
TrainConfig below, and SANDConfig (with the VBPR backbone's) in sand.py.
"""
import argparse
import contextlib
import copy
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
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import data
import sand
from sand import BACKBONES, MODALITIES, SANDConfig, chunk_rows, fit_club, option

KS = (10, 20)  # Recall@K and NDCG@K


@dataclass
class TrainConfig:
    """Everything about a run that is not the model. Defaults follow MMRec and the released code."""
    dataset: str = option("synthetic", "a built-in dataset (synthetic, synthetic-baby, synthetic-clothing) "
                          "or a folder name under --data-dir in MMRec's format (baby, sports, clothing)")
    data_dir: str = option("data", "folder holding <dataset>/ in MMRec's format")
    data_seed: int = option(0, "seed of a built-in dataset's generator", min=0, max=2 ** 63 - 1)
    device: str = option("", "cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    seed: int = option(999, "seed of initialisation and sampling", min=0, max=2 ** 63 - 1)
    epochs: int = option(1000, "most training epochs", min=1, max=10 ** 9)
    patience: int = option(20, "early stopping: stop once valid Recall@20 has gone more than this many epochs "
                           "without improving (MMRec's rule: 20 stops at the 21st)", min=0, max=10 ** 9)
    batch_size: int = option(2048, "BPR triples per training batch", min=1, max=2 ** 31 - 1)
    lr: float = option(1e-4, "Adam learning rate (model and CLUB estimator)", above=0, vbpr=1e-3, freedom=1e-3)
    plain: bool = option(False, "run sand.py's plain tier (autograd, X_m formed) instead of its fast paths "
                         "(section 5 of sand.py), and on a GPU without CUDA graphs: the same "
                         "mathematics, other float rounding; slower")
    out: str = option("", "run folder (default: runs/<dataset>-<dist>-seed<seed>, then -setting=value for each "
                      "other setting not at its default)")
    topk_out: str = option("", "write the top-20 items of every test user at the best epoch to this TSV (a new "
                           "file, or one that --topk-out wrote before)")
    eval_only: bool = option(False, "evaluate the checkpoint --ckpt on valid and test, no training")
    ckpt: str = option("", "checkpoint for --eval-only")
    resume: str = option("", "continue the run that wrote this checkpoint (last.pt: written after the first epoch, "
                         "then at most once a minute, at the end, and on Ctrl-C or SIGTERM), in its folder and with "
                         "its settings; --epochs and --patience may extend it")
    ablation: bool = option(False, "run the ablation grid (SAND with mi and l2, cross and intra CLUB fitting, "
                            "alignment only, distancing only, neither, complete alignment) and write "
                            "ablation.csv/.md/.json")
    grid: tuple = option((), "run every point of the product of the listed settings, e.g. --grid alpha=0.012,0.1 "
                         "tau=0.1,0.2 (any model or training setting that changes results), and write "
                         "grid.csv/.md/.json; the chosen point is the best mean valid Recall@20, a tie going to "
                         "the point listed first. Run again, it reads back finished runs and resumes interrupted "
                         "ones", nargs="+", metavar="SETTING=V1,V2,...")
    seeds: int = option(3, "seeds per point in --ablation or --grid: --seed, --seed + 1, ...", min=1, max=10 ** 6)
    profile: bool = option(False, "print per-epoch seconds in sampling, forward, backward, estimator, "
                           "optimizer and evaluation (synchronises the device; on a GPU the steps then "
                           "run without CUDA graphs, so that each phase can be timed)")


# ---------------------------------------------------------------------------------------------
# 1. BPR sampling

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
        """-> list of (users, positives, negatives, permutations) batches, [B] each; with n_perms, the
        permutations are n_perms random orders of all items [n_perms, I] (the CLUB bound's, one per
        modality), else None: everything random in an epoch is drawn here, from one generator."""
        order = torch.randperm(len(self.pairs), generator=self.gen, device=self.pairs.device)
        user, pos = self.pairs[order].unbind(1)
        neg = self.negatives(user)
        batches = zip(user.split(batch_size), pos.split(batch_size), neg.split(batch_size))
        perm = lambda: torch.randperm(self.n_items, generator=self.gen, device=user.device)  # [I]
        return [(u, p, n, torch.stack([perm() for _ in range(n_perms)]) if n_perms else None) for u, p, n in batches]


# ---------------------------------------------------------------------------------------------
# 2. Evaluation: full ranking, MMRec's Recall@K and NDCG@K

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


def make_evaluator(ds, device):
    splits = {s: torch.from_numpy(getattr(ds, s)) for s in ("valid", "test")}
    return Evaluator(torch.from_numpy(ds.train), splits, ds.n_items, device)


def scorer(model):
    """-> score(users [b]) -> [b, I]: the model's score of every item (SAND.score), from embeddings
    recomputed in eval mode (not left over from the last training batch)."""
    model.eval()
    with torch.no_grad():
        users, items, _ = model(parts=False)
    return functools.partial(model.score, users, items)


def evaluate(model, evaluator):
    return evaluator(scorer(model))


def most_popular(ds, device):
    """The baseline every model must beat: rank items by their train interaction count."""
    counts = torch.bincount(torch.from_numpy(ds.train[:, 1]), minlength=ds.n_items).double().to(device)
    return make_evaluator(ds, device)(lambda users: counts.repeat(len(users), 1))


# ---------------------------------------------------------------------------------------------
# 3. One training step

def train_step(model, club, opt, club_opt, batch, hp, lap=lambda phase: None):
    """One step on a batch (users, positives, negatives [B] each, the CLUB bound's permutations [2, I] or
    None); `hp` is the model's SANDConfig, `lap` a timer (--profile).
    -> the loss terms {name: tensor}.
    The objective (sand.sand_loss): L = BPR + alpha * SoloSim + (ureg * CLUB  or  w_l2 * negL2)."""
    user, pos, neg, perms = batch
    # 1. forward and loss
    opt.zero_grad(set_to_none=True)
    loss, terms, pairs = model.loss(user, pos, neg, club, perms)
    lap("forward")
    # 2. backward: the model's gradients (the CLUB bound gives the estimator none)
    loss.backward()
    lap("backward")
    # 3. --dist mi: the estimator q takes its steps on the detached pairs, between backward and step (released)
    if pairs is not None:
        fit = sand._fit_club_fast if model.fast else fit_club  # the model's tier
        terms["club_nll"] = fit(club, club_opt, *pairs, hp.club_steps)
        lap("estimator")
    # 4. the model's optimizer step
    opt.step()
    lap("optimizer")
    return terms


def train_epoch(model, step, sampler, cfg, lap=lambda phase: None):
    """One pass over the train interactions, `step(batch)` per batch; -> the mean of each loss term."""
    model.train()
    batches = sampler.epoch(cfg.train.batch_size, n_perms=len(MODALITIES) if cfg.sand.dist == "mi" else 0)
    lap("sample")
    sums = {}
    for done, batch in enumerate(batches, 1):
        for k, v in step(batch).items():
            sums[k] = sums.get(k, 0) + v
        STATUS.batch(done, len(batches))
    names = list(sums)
    values = (torch.stack([sums[k] for k in names]) / len(batches)).tolist()  # one host sync
    return dict(zip(names, values))


# ---------------------------------------------------------------------------------------------
# 4. The epoch loop, with MMRec's early stopping

@dataclass
class Progress:
    """Where a run stands after an epoch: what early stopping and the results need (saved in last.pt)."""
    epoch: int = 0  # epochs finished
    best_score: float = -1.0  # the best valid Recall@20 so far, rounded to 4 decimals as MMRec does
    bad_epochs: int = 0  # epochs in a row since it last improved
    best_epoch: int | None = None
    best: dict | None = None  # valid and test metrics of the best epoch
    diverged: int | None = None  # the epoch after which a loss or a weight was not finite
    history: list = field(default_factory=list)  # metrics.csv: a row per epoch
    diagnostic_init: dict | None = None  # what the parts carried before training (built-in data)


def early_stopping(score, best, bad_epochs):
    """MMRec's rule: the score, rounded to 4 decimals as MMRec reports it, must strictly beat the best.
    -> (best, bad_epochs, improved); the run stops once bad_epochs exceeds the patience."""
    score = round(score, 4)
    if score > best:
        return score, 0, True
    return best, bad_epochs + 1, False


def fit(cfg, ds, device, out, resume=None, log=print):
    """Train on `ds` with early stopping on valid Recall@20, in run folder `out`: a new run, or the one
    that checkpoint `resume` continues. -> (results, the model at its best epoch, the evaluator)"""
    t = cfg.train
    if not t.plain:  # the fast tier must compute what the plain code says, as it stands now
        check_tiers(cfg.sand, ds, log)
    model, club, opt, club_opt = build(cfg, ds, device, t.seed)
    sampler = BPRSampler(torch.from_numpy(ds.train).to(device), ds.n_items,
                         torch.Generator(device=device).manual_seed(t.seed))
    evaluator = make_evaluator(ds, device)
    timer = Timer(device, sync=t.profile)
    step = functools.partial(train_step, model, club, opt, club_opt, hp=cfg.sand, lap=timer.lap)
    if device.type == "cuda" and not (t.plain or t.profile):
        step = CUDAGraphed(step, [opt, club_opt])  # the same step, recorded once and replayed
    with Run(cfg, ds, out, log) as run:
        p = run.start(model, club, opt, club_opt, sampler.gen, resume)  # a new Progress, or the checkpoint's
        while p.epoch < t.epochs and p.bad_epochs <= t.patience and p.diverged is None:
            epoch, t0 = p.epoch + 1, time.perf_counter()
            terms = train_epoch(model, step, sampler, cfg, timer.lap)
            t1 = time.perf_counter()
            if not finite(terms, model, club):  # no later epoch, nor this one, can be trusted
                p.diverged = epoch
                run.diverged(p, terms)
                break
            metrics = evaluate(model, evaluator)
            t2 = time.perf_counter()
            p.best_score, p.bad_epochs, improved = early_stopping(metrics["valid"]["recall@20"], p.best_score,
                                                                  p.bad_epochs)
            if improved:
                p.best_epoch, p.best = epoch, metrics
            p.epoch = epoch
            run.end_epoch(p, terms, metrics, improved, t1 - t0, t2 - t1, timer)  # metrics.csv, checkpoints, log
        results = run.finish(p, model, evaluator)  # last.pt, best.pt, results.json; the model back at its best epoch
    return results, model, evaluator


def check_tiers(hp, ds, log):
    """Stop with one line if a fast path no longer computes what its plain piece does (sand.tier_mismatch)."""
    STATUS.show("checking the fast tier against the plain one ...")
    t0 = time.perf_counter()
    why = sand.tier_mismatch(hp, {"image": ds.image.shape[1], "text": ds.text.shape[1]})
    if why:
        raise UsageError(why)
    log(f"the fast tier computes what the plain one does on a small instance of this configuration "
        f"({time.perf_counter() - t0:.1f} s)")


def finite(terms, *modules):
    """Are every loss term and every weight finite? (one host sync)"""
    weights = [p for m in modules for p in m.parameters()]
    return all(math.isfinite(v) for v in terms.values()) and bool(torch.stack([w.isfinite().all() for w in weights]).all())


# ---------------------------------------------------------------------------------------------
# 5. Analysis, not training: what the learned parts carry (built-in data, whose planted factors are known)
#
# Each item of the built-in data carries three independent groups of planted factors: generic (seen by both
# modalities), image-unique and text-unique; each modality's features are a linear map of its two groups plus
# noise. The diagnostic asks, on held-out items, how much of each learned part's variance each group explains:
# R^2(part | group). A part that SAND's split separates as it claims shows a generic half (and its alignment
# view z_m and distancing projection a_m) explained by the generic factors and a unique half (b_m) by its own
# modality's unique ones; a random linear map of the features shows each group's share of the features.

def explained_share(part, factors, fit_rows, new_rows):
    """R^2(part | group) for each factor group: the share of the part's variance on the `new_rows` items that
    a least-squares affine map from the group's factors, fitted on the `fit_rows` items, explains:
        R^2 = 1 - sum ||P_new - F_new B - c||^2 / sum ||P_new - mean P_new||^2   over all columns of P
    part [I, k]; factors {group: [I, f]}. Since the groups are independent, the shares add up (for a part
    that is linear in the features), the rest being noise; a group the part ignores scores about 0."""
    p = part.double()
    p_fit, p_new = p[fit_rows], p[new_rows]
    total = ((p_new - p_new.mean(0)) ** 2).sum()
    out = {}
    for name, f in factors.items():
        f = torch.as_tensor(f).double()
        design = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)  # [I, f + 1]: the factors and an intercept
        coef = torch.linalg.lstsq(design[fit_rows], p_fit).solution  # [f + 1, k]
        out[name] = float(1 - ((p_new - design[new_rows] @ coef) ** 2).sum() / total)
    return out


def linear_cka(x, y):
    """Linear CKA (Kornblith et al., 2019) of two representations of the same n items, x [n, p], y [n, q]:
        ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),  Xc, Yc centred by column.
    1 when one is a rotation and scaling of the other, about 0 for unrelated ones (of few columns)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


CKA_PAIRS = [("text g", "image g"), ("text z", "image z"), ("text a", "text b"), ("image a", "image b")]


def diagnostic(model, factors, seed=0):
    """-> {"shares": {part: {group: R^2(part | group)}}, "cka": {"x ~ y": linear CKA}} on the items of a random
    half (fitted on the other half) for every part in model.parts(), in eval mode; CKA of the two modalities'
    generic halves and alignment views, and of each modality's distancing pair (VBPR's: the halves, a_m = g_m)."""
    STATUS.show("planted-factor diagnostic ...")
    n = len(factors["generic"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit_rows, new_rows = perm[:n // 2], perm[n // 2:]
    was_training = model.training
    model.eval()
    parts = {name: x.cpu() for name, x in model.parts().items()}
    model.train(was_training)
    alias = lambda name: name if name in parts else name.replace(" a", " g").replace(" b", " u")  # VBPR: a = g, b = u
    cka = {}
    for x, y in CKA_PAIRS:
        x, y = alias(x), alias(y)
        if x in parts and y in parts:
            cka[f"{x} ~ {y}"] = round(linear_cka(parts[x][new_rows], parts[y][new_rows]), 4)
    shares = {name: {g: round(v, 4) for g, v in explained_share(x, factors, fit_rows, new_rows).items()}
              for name, x in parts.items()}
    return {"shares": shares, "cka": cka}


def format_diagnostic(init, best):
    groups = list(next(iter(best["shares"].values())))
    lines = ["R^2(part | planted factor group) on held-out items, at initialisation -> at the best epoch",
             f"{'part':10s}" + "".join(f"{g:>18s}" for g in groups)]
    for part, row in best["shares"].items():
        lines.append(f"{part:10s}" + "".join(f"{init['shares'][part][g]:>9.3f} ->{v:>6.3f}" for g, v in row.items()))
    lines += ["linear CKA: " + ", ".join(f"{k} {init['cka'][k]:.3f} -> {v:.3f}" for k, v in best["cka"].items())]
    return "\n".join(lines)


# =============================================================================================
# Run management. Nothing below changes what a run computes: it builds and checks the configuration,
# keeps the run's folder whole (checked before it is touched, locked while in use, every file written
# whole, the last finished epoch written on an interruption), resumes, runs grids, shows progress,
# records the training step as a CUDA graph on a GPU, and reads the command line.

class UsageError(Exception):
    """A command line that cannot be carried out; the message says why in one line."""


# ---------------------------------------------------------------------------------------------
# The configuration: settings as given, the rest at the variant's defaults, and their checks

@dataclass
class RunConfig:
    sand: SANDConfig
    train: TrainConfig
    given: frozenset = frozenset()  # the settings set explicitly: on the command line, or by a grid point

    def as_dict(self):
        return {"sand": dataclasses.asdict(self.sand), "train": dataclasses.asdict(self.train)}


FIELDS = {f.name: f for part in (SANDConfig, TrainConfig) for f in dataclasses.fields(part)}


def flag(name):
    """The command-line flag of a configuration field: club_fit -> --club-fit."""
    return "--" + name.replace("_", "-")


def variant_defaults(backbone, dist, align):
    """{setting: default} where the variant's default differs from its field's: the backbone's own, given in
    the field (option(..., vbpr=...)), and plain VBPR's (plain_vbpr=...)."""
    keys = [backbone] + (["plain_" + backbone] if dist == align == "none" else [])
    return {name: f.metadata[k] for name, f in FIELDS.items() for k in keys if k in f.metadata}


def make_config(given=None, **settings):
    """A run configuration with these settings; every other one at its default for the variant. The
    settings count as given (checked by check_read) unless `given` names which ones were."""
    unknown = settings.keys() - FIELDS.keys()
    if unknown:
        raise TypeError(f"make_config: no setting {', '.join(sorted(unknown))}")
    backbone = settings.get("backbone", SANDConfig.backbone)
    pick = lambda name, extra: settings.get(name, extra.get(name, FIELDS[name].default))
    first = variant_defaults(backbone, None, None)
    defaults = variant_defaults(backbone, pick("dist", first), pick("align", first))
    values = {name: pick(name, defaults) for name in FIELDS}
    return RunConfig(SANDConfig(**{f.name: values[f.name] for f in dataclasses.fields(SANDConfig)}),
                     TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig)}),
                     frozenset(settings if given is None else given))


def value(cfg, name):
    return getattr(cfg.sand if name in cfg.sand.__dataclass_fields__ else cfg.train, name)


def off_default(cfg):
    """{field: value} of every setting of the run configuration that is not at its default for its variant."""
    s = cfg.sand
    defaults = variant_defaults(s.backbone, s.dist, s.align)
    return {name: value(cfg, name) for name, f in FIELDS.items() if value(cfg, name) != defaults.get(name, f.default)}


# How a run is started and what it writes besides its results: not settings of the run itself
MODES = ("topk_out", "eval_only", "ckpt", "resume", "ablation", "grid", "seeds", "profile")
NOT_IN_RESULTS = ("data_dir", "device", "out", *MODES)  # settings that do not change what a run computes
ONLY_WITH = {"ckpt": ("eval_only",), "seeds": ("ablation", "grid")}  # flags that mean something only with another
PATHS = ("dataset", "data_dir", "out", "topk_out", "ckpt", "resume")  # an empty one is a mistake


def check(cfg):
    """Every setting of its type, within its option's range and choices; no flag that would be ignored or
    fail late; output paths of the right kind (found out now, not after training). Else a UsageError."""
    for name, f in FIELDS.items():
        v, m, fl = value(cfg, name), f.metadata, flag(name)
        kind = (int, float) if f.type is float else f.type
        if not isinstance(v, kind) or (f.type is not bool and isinstance(v, bool)):
            raise UsageError(f"{fl} must be a{'n' if f.type is int else ''} {f.type.__name__} (got {v!r})")
        if f.type is float and not math.isfinite(v):
            raise UsageError(f"{fl} must be a finite number (got {v})")
        if v not in m.get("choices", (v,)):
            raise UsageError(f"{fl} must be one of {', '.join(m['choices'])} (got {v!r})")
        for key, ok, words in (("min", lambda b: v >= b, "at least"), ("max", lambda b: v <= b, "at most"),
                               ("above", lambda b: v > b, "above"), ("below", lambda b: v < b, "below")):
            if key in m and not ok(m[key]):
                raise UsageError(f"{fl} must be {words} {m[key]} (got {v})")
    t, s = cfg.train, cfg.sand
    for name in PATHS:
        if name in cfg.given and value(cfg, name) == "":
            raise UsageError(f"{flag(name)} '' is empty: give a path, or leave the flag out")
    for name, needed in ONLY_WITH.items():
        if name in cfg.given and not any(getattr(t, n) for n in needed):
            raise UsageError(f"{flag(name)} is read only with {' or '.join(map(flag, needed))}")
    builtin = t.dataset in data.BUILTIN
    for name, ok, why in (("data_seed", builtin, "read only with a built-in --dataset"),
                          ("data_dir", not builtin, f"not read by the built-in --dataset {t.dataset}")):
        if name in cfg.given and not ok:
            raise UsageError(f"{flag(name)} is {why}: leave it out")
    many = [n for n in ("ablation", "grid", "resume", "eval_only") if getattr(t, n)]
    if len(many) > 1:
        raise UsageError(f"{flag(many[0])} and {flag(many[1])} do not go together: run them one at a time")
    for name in ("topk_out", "profile"):
        if many and many[0] in ("ablation", "grid") and getattr(t, name):
            raise UsageError(f"{flag(name)} does nothing in {flag(many[0])}: run one point alone with it")
    if t.seed + (t.seeds - 1 if many and many[0] in ("ablation", "grid") else 0) > FIELDS["seed"].metadata["max"]:
        raise UsageError(f"--seed {t.seed} with --seeds {t.seeds} goes past {FIELDS['seed'].metadata['max']}")
    if s.backbone == "vbpr" and (s.embed_dim < 2 or s.embed_dim % 2):
        raise UsageError(f"--backbone vbpr splits --embed-dim into a generic and a unique half: give an even "
                         f"number, 2 or more (got {s.embed_dim})")
    if t.out and os.path.isfile(t.out):
        raise UsageError(f"--out {t.out} is a file: give a folder path")
    if t.topk_out:
        check_topk_path(t.topk_out)


def check_read(cfg):
    """Refuse a given model setting that the variant does not read (sand.unread): it would be ignored."""
    unread = sand.unread(cfg.sand)
    for name in FIELDS:  # in the order of the flags
        if name in cfg.given and name in unread:
            raise UsageError(f"{flag(name)} is {unread[name]}: leave it out")


def check_for_data(cfg, ds, device):
    """The settings that depend on the data: the kNN graph's k, and the memory the run needs."""
    if cfg.sand.backbone == "dragon" and cfg.sand.knn_k > ds.n_items:
        raise UsageError(f"--knn-k {cfg.sand.knn_k} is more than the {ds.n_items} items of {ds.name}")
    need, what = memory_needed(cfg, ds)
    have = memory_available(device)
    if have is not None and need > have:
        raise UsageError(f"this run needs at least {need / 2 ** 30:.1f} GiB ({what}), more than the "
                         f"{have / 2 ** 30:.1f} GiB available on {device}")


def memory_needed(cfg, ds):
    """A lower bound on the bytes a run holds at once, and what they are: every parameter with its gradient and
    Adam's two moments, the features, and (--plain) X_m and SoloSimLoss's I x I logits. The model is built on
    the meta device to count its parameters: nothing is allocated."""
    dims = {"image": ds.image.shape[1], "text": ds.text.shape[1]}
    with torch.device("meta"):
        model, club = sand.build_model(cfg.sand, ds.n_users, {m: torch.empty(ds.n_items, d) for m, d in dims.items()})
    params = {**dict(model.named_parameters()), **{f"club.{k}": p for k, p in club.named_parameters()}}
    n = sum(p.numel() for p in params.values())
    need = 16 * n + 4 * ds.n_items * sum(dims.values())
    if cfg.train.plain:
        need += 2 * 4 * ds.n_items * sum(dims.values()) + (3 * 4 * ds.n_items ** 2 if cfg.sand.align != "none" else 0)
    largest = max(params, key=lambda k: params[k].numel())
    what = (f"{n:,} parameters, each with its gradient and Adam's two moments; the largest, {largest}, is "
            f"{' x '.join(map(str, params[largest].shape))}")
    if cfg.sand.dist == "mi":  # the estimator's hidden activations, both networks on both sets of pairs, and theirs
        need += 4 * 4 * 2 * ds.n_items * 2 * cfg.sand.club_hidden  # gradients, the ReLU masks, the fast path's buffers
        what += f"; the CLUB estimator's activations, 2 x {ds.n_items} pairs through --club-hidden {cfg.sand.club_hidden}"
    return need, what


def memory_available(device):
    """Bytes free for a run on `device` (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def resolve_device(name):
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported (the graphs use sparse CSR products)")
    if device.type == "cpu" and device.index is not None:
        raise UsageError(f"--device {name}: the CPU has no device number; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"numbered from 0; use --device cuda:0")
    return device


def build(cfg, ds, device, seed):
    """Model, CLUB estimator and their optimizers, initialised from `seed`."""
    torch.manual_seed(seed)
    features = {m: torch.from_numpy(getattr(ds, m)).to(device) for m in MODALITIES}
    if cfg.sand.backbone != "vbpr":
        STATUS.show(f"building the item-item kNN graph of {ds.n_items} items ...")
    model, club = sand.build_model(cfg.sand, ds.n_users, features, torch.from_numpy(ds.train), fast=not cfg.train.plain)
    model, club = model.to(device), club.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    club_opt = torch.optim.Adam(club.parameters(), lr=cfg.train.lr, fused=True)
    return model, club, opt, club_opt


def load(t):
    """The dataset of training configuration `t`."""
    STATUS.show(f"loading {t.dataset} ..." if t.dataset not in data.BUILTIN else f"making the built-in {t.dataset} ...")
    return data.load_dataset(t.dataset, t.data_dir, t.data_seed)


# ---------------------------------------------------------------------------------------------
# The run folder: config.json, metrics.csv, last.pt, best.pt, results.json

RUN_FILES = ("config.json", "metrics.csv", "results.json", "last.pt", "best.pt")
CHECKPOINT_SECONDS = 60  # last.pt and best.pt: after the first epoch, then at most this often, at the end, on interruption


class Run:
    """A run's folder and its bookkeeping, used as `with Run(...) as run:` around the epoch loop.
    start() checks everything that can fail before it touches the folder: the checkpoint it resumes loads
    into the model, no other train.py holds the folder (a lock), and the folder holds no other run's files
    (other settings or other data) that a new run would replace. Every file is written whole. Each epoch's
    state is kept in memory and written to last.pt after the first epoch, then at most once a minute, at the
    end, and when the run is interrupted (Ctrl-C, SIGTERM), so that no finished epoch is lost."""

    def __init__(self, cfg, ds, out, log):
        self.cfg, self.ds, self.out, self.log = cfg, ds, out, log
        self.lock, self.kept, self.saved_at = FolderLock(out), None, -math.inf  # kept: (last.pt, best.pt) to write
        self.saved_epoch = self.saved_best = None  # the epochs that last.pt and best.pt hold

    def path(self, name):
        return os.path.join(self.out, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        try:
            if kind is not None and issubclass(kind, KeyboardInterrupt) and self.lock.held:
                if self.kept is not None and self.kept[0]["epoch"] != self.saved_epoch:
                    with INTERRUPTS.held():  # metrics.csv as last.pt has it
                        self.save()
                        write_rows(self.path("metrics.csv"), self.kept[0]["progress"]["history"])
                last = self.path("last.pt")
                self.log(f"interrupted: --resume {last} continues after epoch {self.saved_epoch}"
                         if os.path.isfile(last) else f"interrupted before the first epoch ended: {self.out}/ "
                         f"holds no checkpoint")
        finally:
            self.lock.release()

    def start(self, model, club, opt, club_opt, gen, resume):
        """-> the run's Progress: a new one, or the checkpoint's (its weights, optimizers and generators restored)."""
        self.parts = model, club, opt, club_opt, gen
        p = restore(resume, model, club, opt, club_opt, gen) if resume is not None else None
        self.lock.acquire()
        if p is None:
            self.start_fresh()
            p = Progress(diagnostic_init=self.ds.factors and diagnostic(model, self.ds.factors))
        else:
            self.saved_epoch, self.saved_best, self.saved_at = p.epoch, p.best_epoch, time.perf_counter()
            if os.path.exists(self.path("results.json")):
                os.remove(self.path("results.json"))  # it is no longer a finished run
            listed = len(read_rows(self.path("metrics.csv")))
            t = self.cfg.train
            self.log(f"resuming {self.out}/ after epoch {p.epoch} (--epochs {t.epochs}, --patience {t.patience})"
                     + (f"; metrics.csv listed {listed} epochs, those after {p.epoch} are run again"
                        if listed > p.epoch else "")
                     + (": it has already stopped" if p.diverged or p.bad_epochs > t.patience else ""))
        write_config(self.path("config.json"), self.cfg, self.ds, model_device(model))
        self.log(f"{self.ds.summary(short=True)} on {model_device(model)}; writing to {self.out}/")
        for note in self.ds.notes:
            self.log(note)
        return p

    def start_fresh(self):
        """A new run in the folder: an earlier run of these settings and data is replaced, another refused."""
        held = run_files(self.out, self.cfg, self.ds)
        if held:
            self.log(f"replacing the earlier run of these settings and data in {self.out}/")
        for name in held:
            os.remove(self.path(name))

    def end_epoch(self, p, terms, metrics, improved, train_s, eval_s, timer):
        """After an epoch: metrics.csv, the state kept (with the best epoch's weights), the checkpoint when due, the
        log line."""
        p.history.append({"epoch": p.epoch, **{k: round(v, 6) for k, v in terms.items()},
                          **{f"{s}_{k}": round(v, 6) for s in metrics for k, v in metrics[s].items()},
                          "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)})
        self.keep(p, improved)
        write_rows(self.path("metrics.csv"), p.history)
        if time.perf_counter() - self.saved_at > CHECKPOINT_SECONDS:
            self.save()
        loss_txt = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        self.log(f"epoch {p.epoch:4d} | {loss_txt} | valid R@20 {metrics['valid']['recall@20']:.4f} "
                 f"test R@20 {metrics['test']['recall@20']:.4f} | train {train_s:.2f}s eval {eval_s:.2f}s"
                 + (" *" if improved else ""))
        if self.cfg.train.profile:
            self.log("  profile: " + " ".join(f"{k} {v:.3f}s" for k, v in timer.total.items())
                     + f" evaluate {eval_s:.3f}s")
        timer.total.clear()

    def diverged(self, p, terms):
        """An epoch whose loss or weights are not finite: the run stops (and stays stopped if resumed)."""
        self.log(f"epoch {p.diverged}: a loss or a weight is not finite ({terms}); stopping, "
                 + (f"the best epoch ({p.best_epoch}) is kept" if p.best_epoch else "no epoch finished"))
        self.keep(p, improved=False)

    def keep(self, p, improved):
        """Copy now what last.pt and best.pt are to hold: every weight, optimizer state and random generator, and
        the best epoch's weights. One assignment, so that what is written is always one epoch's."""
        model, club, opt, club_opt, gen = self.parts
        rng = {"cpu": torch.get_rng_state()}
        if gen.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(gen.device)
        last = {name: copy.deepcopy(part.state_dict()) for name, part in  # tensors cloned: training moves on
                (("model", model), ("club", club), ("opt", opt), ("club_opt", club_opt))}
        last.update(generator=gen.get_state(), rng=rng, progress=dataclasses.asdict(p), epoch=p.epoch,
                    **checkpoint_header(self.cfg, self.ds))
        best = self.kept and self.kept[1]
        if improved:
            best = {"model": last["model"], "epoch": p.best_epoch, **checkpoint_header(self.cfg, self.ds)}
        self.kept = last, best

    def save(self):
        """best.pt, then last.pt, from the kept state, both or neither interrupted (a signal waits for them)."""
        last, best = self.kept
        with INTERRUPTS.held():
            if best is not None and best["epoch"] != self.saved_best:
                save_checkpoint(self.path("best.pt"), best)
                self.saved_best = best["epoch"]
            save_checkpoint(self.path("last.pt"), last)
            self.saved_epoch, self.saved_at = last["epoch"], time.perf_counter()

    def finish(self, p, model, evaluator):
        """The end of the run: last.pt and best.pt, the model left at its best epoch, results.json."""
        if self.kept is None:  # a resumed run that had already stopped
            self.keep(p, improved=False)
        self.save()
        hist = p.history
        results = {"best_epoch": p.best_epoch, "valid": p.best and p.best["valid"], "test": p.best and p.best["test"],
                   "epochs_run": p.epoch, "diverged": p.diverged is not None,
                   "train_s_per_epoch": float(np.median([r["train_s"] for r in hist])) if hist else None,
                   "eval_s_per_epoch": float(np.median([r["eval_s"] for r in hist])) if hist else None,
                   "peak_memory_gib": peak_memory_gib(model_device(model)), "dataset": self.ds.summary()}
        if p.best_epoch is not None:  # leave the model at its best epoch
            best = self.kept[1] or load_checkpoint(self.path("best.pt"))
            if best["epoch"] != p.best_epoch:
                raise UsageError(f"{self.path('best.pt')} holds epoch {best['epoch']}, but the run's best epoch is "
                                 f"{p.best_epoch}: it was not written by this run")
            model.load_state_dict(best["model"])
            if self.ds.factors is not None:  # built-in data: what do the parts carry?
                results["diagnostic"] = {"init": p.diagnostic_init, "best": diagnostic(model, self.ds.factors)}
        save_json(self.path("results.json"), results)
        return results


def model_device(model):
    return next(model.parameters()).device


def checkpoint_header(cfg, ds):
    """What every checkpoint says of its run: the configuration and the data (its fingerprint included)."""
    return {"config": cfg.as_dict(), "given": sorted(cfg.given), "dataset": ds.summary()}


def restore(ckpt, model, club, opt, club_opt, gen):
    """Load a last.pt into the run's model, estimator, optimizers and generators -> its Progress (or a UsageError)."""
    try:
        model.load_state_dict(ckpt["model"])
        club.load_state_dict(ckpt["club"])
        opt.load_state_dict(ckpt["opt"])
        club_opt.load_state_dict(ckpt["club_opt"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if gen.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], gen.device)
        return Progress(**ckpt["progress"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"the checkpoint does not fit this run's model ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def write_config(path, cfg, ds, device):
    save_json(path, {**cfg.as_dict(), "given": sorted(cfg.given), "dataset_stats": ds.summary(),
                     "environment": environment(device)})


def same_run(folder, cfg, ds):
    """Is the run in `folder` one of these settings (all that change results) on this data? -> True, or
    what differs."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        theirs = config_from_dict(saved)
    except (OSError, ValueError, UsageError):
        return "its config.json is missing or unreadable"
    if saved.get("dataset_stats") != ds.summary():
        return f"made on other data: {saved.get('dataset_stats')}"
    for name in FIELDS:
        if name not in NOT_IN_RESULTS and as_json(value(theirs, name)) != as_json(value(cfg, name)):
            return f"{flag(name)} {value(theirs, name)}, not {value(cfg, name)}"
    return True


def as_json(v):
    return json.loads(json.dumps(v))  # a tuple is a list there


def run_files(folder, cfg, ds):
    """The run files (RUN_FILES) that `folder` holds, which must be a run of these settings on this data:
    else a UsageError, before anything is touched."""
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    same = same_run(folder, cfg, ds) if held else True
    if same is not True:
        raise UsageError(f"{folder}/ holds another run ({same}); give another --out, or delete that folder")
    return held


def finished_results(folder):
    """results.json of the finished run in `folder` (checked by run_files), else None."""
    try:
        with open(os.path.join(folder, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class FolderLock:
    """An exclusive lock on a run folder (its file .lock), held while a run writes there. A folder that
    acquire() made, and that nothing else was written to, is removed again on release()."""

    def __init__(self, folder):
        self.folder, self.fd, self.made = folder, None, False

    @property
    def held(self):
        return self.fd is not None

    def acquire(self):
        self.made = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock_file(fd)
        except OSError:
            os.close(fd)
            with open(os.path.join(self.folder, ".lock")) as f:
                holder = f.read().strip() or "?"
            raise UsageError(f"{self.folder}/ is in use by another train.py (pid {holder}): wait for it to end, "
                             f"or give another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self):
        if self.fd is None:
            return
        os.close(self.fd)  # closing the file releases the lock
        self.fd = None
        if self.made and os.listdir(self.folder) == [".lock"]:
            os.remove(os.path.join(self.folder, ".lock"))
            os.rmdir(self.folder)


if os.name == "nt":  # Windows: msvcrt's lock on the file's first byte
    import msvcrt
    lock_file = lambda fd: msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
else:
    import fcntl
    lock_file = lambda fd: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM stop the program with KeyboardInterrupt, but never in the middle of writing
    a file: a signal that arrives then takes effect once the file is written; later signals are ignored while
    the run writes its last epoch and stops. main() installs it."""

    def __init__(self):
        self.holding, self.pending, self.signal = 0, False, None

    def install(self):
        self.holding, self.pending, self.signal = 0, False, None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # already stopping: a second Ctrl-C waits for the last files too
            return
        self.signal = signum
        if self.holding:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if not self.holding and self.pending:
                self.pending = False
                raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def write_whole(path, content, mode="w"):
    with INTERRUPTS.held():
        data.atomic_write(path, content, mode)


def save_json(path, obj):
    write_whole(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path, state):
    write_whole(path, lambda f: torch.save(state, f), mode="wb")


def write_rows(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_whole(path, buf.getvalue())


def read_rows(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def load_checkpoint(path):
    """A checkpoint that train.py wrote (tensors and plain values only: nothing else is unpickled)."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} not found (a run folder holds best.pt and last.pt)")
    not_ours = f"{path} is not a checkpoint written by this train.py (a run folder's best.pt or last.pt)"
    try:
        with warnings.catch_warnings():  # torch's notes on old file formats: the file is judged below
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch.load makes of a file that is not one of ours
        raise UsageError(f"{not_ours}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if not isinstance(ckpt, dict) or not {"model", "epoch", "config", "dataset"} <= ckpt.keys():
        raise UsageError(not_ours)
    if "fingerprint" not in (ckpt["dataset"] if isinstance(ckpt["dataset"], dict) else {}):
        raise UsageError(f"{path} was written by an older train.py (its data has no fingerprint); start a new run")
    return ckpt


def config_from_dict(c, given=()):
    """The configuration a checkpoint or config.json records (a setting added since takes its default)."""
    try:
        settings = {**c["sand"], **c["train"]}
        if "grid" in settings:
            settings["grid"] = tuple(settings["grid"])
        return make_config(given=given, **settings)
    except (TypeError, KeyError) as e:
        raise UsageError(f"a saved configuration that this train.py cannot read ({e})") from None


# A saved run keeps its configuration when it is continued (--resume) or evaluated (--eval-only). Only
# these flags may change it; any other flag given must match the saved run, never be ignored.
CHANGEABLE = {"resume": ("resume", "epochs", "patience", "device", "data_dir", "topk_out", "profile"),
              "eval_only": ("eval_only", "ckpt", "device", "data_dir", "topk_out")}
NOT_READ = {"eval_only": ("epochs", "patience", "batch_size", "lr", "out", "profile")}  # no training


def saved_config(ckpt, path, cfg, mode):
    """The configuration of the run in checkpoint `ckpt` (read from `path`), with each flag of
    CHANGEABLE[mode] that the command line `cfg` gives taken from it; any other flag given must match."""
    saved = config_from_dict(ckpt["config"])
    for name in MODES:  # how the saved run was started (say, resumed) is not one of its settings
        setattr(saved.train, name, FIELDS[name].default)
    for name in sorted(cfg.given, key=list(FIELDS).index):
        new, old = value(cfg, name), value(saved, name)
        if name in NOT_READ.get(mode, ()):
            raise UsageError(f"{flag(name)} is not read by {flag(mode)}: leave it out")
        if name in PATHS and new and old and os.path.realpath(new) == os.path.realpath(old):
            continue
        if name in CHANGEABLE[mode]:
            setattr(saved.sand if name in saved.sand.__dataclass_fields__ else saved.train, name, new)
        elif as_json(new) != as_json(old):
            others = ", ".join(flag(n) for n in CHANGEABLE[mode] if n != mode)
            raise UsageError(f"{flag(name)} {new} differs from the run in {path} ({old}); {flag(mode)} keeps "
                             f"that run's settings except {others}: leave out {flag(name)}, or start a new run")
    saved.given = frozenset(cfg.given)
    try:
        check(saved)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    return saved


def check_data(ckpt, path, ds):
    if ckpt["dataset"] != ds.summary():
        raise data.DataError(f"{path} was trained on other data ({ckpt['dataset']}), not on {ds.summary()}: "
                             f"give the --data-dir it was trained on, or start a new run")


def environment(device):
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "command": sys.argv}


def peak_memory_gib(device):
    """Peak memory of this process so far: allocated on the GPU, or resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def default_folder(cfg, points=None):
    """runs/<dataset>-<dist>-seed<seed> for a run; for a grid of `points` (--ablation, --grid), whose
    runs are named by point and seed, runs/ablation-<dataset> or runs/grid-<dataset>-<the listed settings>;
    then -setting=value for every other setting that changes the results and is not at its default:
    runs with different settings do not overwrite each other's files (and a run on other data in the same
    folder is refused, not replaced)."""
    t = cfg.train
    if points is None:
        name, named = f"{t.dataset}-{cfg.sand.dist}-seed{t.seed}", ("dataset", "dist", "seed")
    else:
        listed = list(dict.fromkeys(k for _, _, changes in points for k in changes))  # in order, once each
        name = f"grid-{t.dataset}-" + "-".join(listed) if t.grid else f"ablation-{t.dataset}"
        named = ("dataset", "seed", *listed)
    for setting, v in off_default(cfg).items():
        if setting not in NOT_IN_RESULTS + named:
            name += f"-{setting}={v}"
    return os.path.join("runs", name)


# ---------------------------------------------------------------------------------------------
# Top-k files

TOPK_HEADER = "userID\t" + "\t".join(f"item{r}" for r in range(1, max(KS) + 1))


def check_topk_target(path, folder):
    """--topk-out must not be the run folder, nor one of its files (its lock included), by any path to them."""
    real = os.path.realpath(path)
    if real == os.path.realpath(folder) or real in {os.path.realpath(os.path.join(folder, f))
                                                     for f in RUN_FILES + (".lock",)}:
        raise UsageError(f"--topk-out {path} is the run's folder or one of its files: give another path")


def check_folder_name(path):
    """A run folder's name must fit the file system (a grid of many settings makes long default names)."""
    for part in os.path.normpath(path).split(os.sep):
        if len(part.encode()) > 255:
            raise UsageError(f"the run folder name {part[:40]}... is {len(part.encode())} bytes, more than a file "
                             f"system allows (255): give --out")


def check_topk_path(path):
    """--topk-out writes a new file, or replaces one that --topk-out wrote; its folder must be writable."""
    if os.path.isdir(path):
        raise UsageError(f"--topk-out {path} is a folder: give a file path")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline().rstrip("\n")
        except (OSError, UnicodeDecodeError):
            first = None
        if first != TOPK_HEADER:
            raise UsageError(f"--topk-out {path} exists and is not a top-k file that --topk-out wrote: give a new path")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"--topk-out {path}: {folder} is not a folder this user can write to")


def write_topk_file(model, evaluator, path):
    """The top-20 items of every test user: a header, then a TSV line each, user id then items, best first.
    The path is checked again now: a file made there since the run began is not replaced."""
    check_topk_path(path)
    rows = evaluator.splits["test"][1]
    top = evaluator.topk(scorer(model))[rows]
    lines = [TOPK_HEADER] + ["\t".join(map(str, [u] + row)) for u, row in zip(evaluator.users[rows].tolist(), top.tolist())]
    write_whole(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# What the command line does

def run(cfg, log=print):
    """The command line's work, given a configuration. Everything that can be checked is checked before
    any file is written."""
    check(cfg)
    t = cfg.train
    if t.eval_only:
        return eval_only(cfg, log)
    if t.ablation or t.grid:
        points = ABLATIONS if t.ablation else grid_points(t.grid)
        grid_runs(cfg, points)  # a bad point is refused now, before the data is loaded
        return grid(cfg, load(t), resolve_device(t.device), points, log)
    resume = None
    if t.resume:
        resume = load_checkpoint(t.resume)
        if "opt" not in resume:
            raise UsageError(f"{t.resume} holds only the best epoch's weights; resume from the run's last.pt")
        cfg = saved_config(resume, t.resume, cfg, "resume")
        cfg.train.out = os.path.dirname(os.path.abspath(t.resume))  # it goes on in its own folder
        t = cfg.train
    else:
        check_read(cfg)
    device = resolve_device(t.device)
    out = t.out or default_folder(cfg)
    check_folder_name(out)
    if t.topk_out:
        check_topk_target(t.topk_out, out)
    ds = load(t)
    if resume is not None:
        check_data(resume, t.resume, ds)
    check_for_data(cfg, ds, device)
    results, model, evaluator = fit(cfg, ds, device, out, resume, log)
    if results["best_epoch"] is None:
        unwritten = f", {t.topk_out} was not written" if t.topk_out else ""
        log(f"no epoch finished: {out}/results.json holds no metrics{unwritten}")
        return results
    log(f"best epoch {results['best_epoch']}: test " + json.dumps(results["test"]))
    if "diagnostic" in results:
        log(format_diagnostic(**results["diagnostic"]))
    if t.topk_out:
        write_topk_file(model, evaluator, t.topk_out)
    return results


def eval_only(cfg, log):
    if not cfg.train.ckpt:
        raise UsageError("--eval-only needs --ckpt PATH (a run folder's best.pt)")
    ckpt = load_checkpoint(cfg.train.ckpt)
    saved = saved_config(ckpt, cfg.train.ckpt, cfg, "eval_only")
    if saved.train.topk_out:
        check_topk_target(saved.train.topk_out, os.path.dirname(os.path.abspath(cfg.train.ckpt)))
    device = resolve_device(saved.train.device)
    ds = load(saved.train)
    check_data(ckpt, cfg.train.ckpt, ds)
    check_for_data(saved, ds, device)
    model = build(saved, ds, device, saved.train.seed)[0]
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"{cfg.train.ckpt} does not fit its run's model ({str(e).strip().splitlines()[0]})") from None
    evaluator = make_evaluator(ds, device)
    metrics = evaluate(model, evaluator)
    log(json.dumps({"epoch": ckpt["epoch"], **metrics}, indent=2))
    if cfg.train.topk_out:
        write_topk_file(model, evaluator, cfg.train.topk_out)
    return metrics


# ---------------------------------------------------------------------------------------------
# Grids: --ablation and --grid

ABLATIONS = [  # the ablation grid's points: (run folder prefix, what it is, settings)
    ("mi-cross", "SAND, --dist mi (CLUB fitted cross-modal, as released)", {"dist": "mi", "align": "solo", "club_fit": "cross"}),
    ("mi-intra", "SAND, --dist mi --club-fit intra (as the paper describes)", {"dist": "mi", "align": "solo", "club_fit": "intra"}),
    ("l2", "SAND, --dist l2", {"dist": "l2", "align": "solo"}),
    ("align-only", "alignment only: --dist none", {"dist": "none", "align": "solo"}),
    ("dist-only", "distancing only: --align none --dist mi", {"dist": "mi", "align": "none"}),
    ("neither", "neither: --dist none --align none (with --backbone vbpr: VBPR itself)", {"dist": "none", "align": "none"}),
    ("complete", "complete alignment: --align complete --dist none (no split)", {"dist": "none", "align": "complete"}),
]
METRICS = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")]
# what --grid may list: every setting that changes results, except the data and the seed (--seeds)
GRID_SETTINGS = {name: f for name, f in FIELDS.items() if name not in NOT_IN_RESULTS + ("dataset", "data_seed", "seed")}
GRID_ONLY = ("ablation", "grid", "seeds", "out", "seed")  # settings of the grid, not of its runs


def parse_setting(f, text):
    """A value for field `f` from its text, as its flag would read it; a UsageError if it is not one."""
    try:
        v = {"true": True, "false": False}[text.lower()] if f.type is bool else f.type(text)
    except (ValueError, KeyError):
        raise UsageError(f"--grid {f.name}={text}: {text!r} is not a{'n' if f.type is int else ''} "
                         f"{f.type.__name__}") from None
    if v not in f.metadata.get("choices", (v,)):
        raise UsageError(f"--grid {f.name}={text}: choose from {', '.join(f.metadata['choices'])}")
    return v


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
        parsed = [parse_setting(GRID_SETTINGS[name], v) for v in values.split(",")]
        twice = next((v for k, v in enumerate(parsed) if v in parsed[:k]), None)
        if twice is not None:
            raise UsageError(f"--grid {spec}: {name} {twice} is listed twice; one point is one point")
        axes[name] = parsed
    return [grid_point(dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]


def grid_point(changes):
    return ("-".join(f"{k}={v}" for k, v in changes.items()), " ".join(f"{flag(k)} {v}" for k, v in changes.items()),
            changes)


@dataclass
class GridRun:
    key: str  # the point's name: its run folder's prefix
    label: str  # the point as flags
    changes: dict  # the point's settings
    seed: int
    folder: str
    cfg: RunConfig


def grid_runs(cfg, points):
    """-> the grid's folder, its runs [GridRun] (every point for --seeds seeds: --seed, --seed + 1, ...,
    each checked) and notes for the log. A setting that a point's variant does not read is dropped from that
    point (sand.unread), and points that are then the same run are run once (the first listed); a setting
    that no point reads is refused, and so is a flag that a point sets itself."""
    out = cfg.train.out or default_folder(cfg, points)
    base = {name: value(cfg, name) for name in cfg.given if name not in GRID_ONLY}
    kind = "--ablation" if cfg.train.ablation else "--grid"
    for name in base:
        if any(name in changes for _, _, changes in points):
            raise UsageError(f"{flag(name)} is set by the {kind} points: leave it out")
    runs, seen, read, why, notes = [], {}, set(), {}, []
    for key, label, changes in points:
        settings = {**base, **changes}
        unread = sand.unread(make_config(**settings).sand)
        read |= settings.keys() - unread.keys()
        why |= unread
        kept = {k: v for k, v in changes.items() if k not in unread}
        if not cfg.train.ablation:  # a grid point is named by the settings it keeps
            key, label, _ = grid_point(kept)
        if key in seen:
            dropped = "; ".join(f"{flag(k)} is {unread[k]}" for k in changes if k in unread)
            notes.append(f"{kind}: {' '.join(f'{flag(k)} {v}' for k, v in changes.items())} is the same run as "
                         f"{seen[key]} ({dropped}): run once")
            continue
        seen[key] = label
        for seed in range(cfg.train.seed, cfg.train.seed + cfg.train.seeds):
            folder = os.path.join(out, f"{key}-seed{seed}")
            check_folder_name(folder)
            one = make_config(**{k: v for k, v in settings.items() if k not in unread}, seed=seed, out=folder)
            try:
                check(one)
                check_read(one)
            except UsageError as e:
                raise UsageError(f"{kind} point {key}: {e}") from None
            runs.append(GridRun(key, label, kept, seed, folder, one))
    for name in [*base, *(k for _, _, changes in points for k in changes)]:
        if name not in read:
            raise UsageError(f"{kind}: {flag(name)} is {why.get(name, 'read by no point')}, and no point has that: "
                             f"leave it out")
    return out, runs, notes


def grid(cfg, ds, device, points, log):
    """Runs every run of the grid (grid_runs), each in its own folder, then writes <kind>.csv (a row per
    run), <kind>.md (per point, mean and sample std over its seeds) and <kind>.json (the chosen point),
    kind = ablation or grid. The chosen point has the best mean valid Recall@20 among the points none of
    whose runs diverged (a loss that was not finite); a tie goes to the point listed first. Its test
    metrics are what the grid reports: nothing is chosen by test. Before anything runs, every run is
    checked against the data, and every run folder that holds a run must hold one of its settings on this
    data; a finished one is read back, an interrupted one resumed from its last.pt, so that a grid run
    again goes on where it stopped."""
    kind = "grid" if cfg.train.grid else "ablation"
    out, runs, notes = grid_runs(cfg, points)
    for note in notes:
        log(note)
    try:
        with open(os.path.join(out, f"{kind}.json")) as f:
            theirs = json.load(f).get("points")
    except (OSError, ValueError, AttributeError):
        theirs = None
    ours = grid_index(runs)
    if theirs is not None and theirs != ours:
        raise UsageError(f"{out}/ holds the tables of another {kind} ({', '.join(theirs)}); give this one "
                         f"another --out")
    todo = []
    for r in runs:
        try:
            check_for_data(r.cfg, ds, device)
        except UsageError as e:
            raise UsageError(f"--{kind} point {r.key}: {e}") from None
        todo.append(finished_results(r.folder) if run_files(r.folder, r.cfg, ds) else None)
    lock = FolderLock(out)
    lock.acquire()
    try:
        rows, diagnostics = [], {}
        for r, results in zip(runs, todo):
            if results is None:  # not yet run, or interrupted: then it goes on from its last.pt
                last = os.path.join(r.folder, "last.pt")
                resume = load_checkpoint(last) if os.path.isfile(last) else None
                results = fit(r.cfg, ds, device, r.folder, resume, log=lambda *_: None)[0]
            scores = {f"{s}_{m}": results[s] and results[s][m] for s in ("valid", "test") for m in METRICS}
            log(f"{r.key} seed {r.seed}: best epoch {results['best_epoch']}" + (", diverged" if results["diverged"] else "")
                + ", test " + " ".join(f"{m} {results['test'][m]:.4f}" if results["test"] else f"{m} -" for m in METRICS))
            rows.append({"point": r.key, "seed": r.seed, "best_epoch": results["best_epoch"],
                         "diverged": results["diverged"], **scores})
            diagnostics.setdefault(r.key, []).append(results.get("diagnostic"))
        write_grid_tables(ds, device, kind, out, runs, rows, diagnostics, log)
    finally:
        lock.release()
    return rows


def grid_index(runs):
    """{point: its seeds}: what a grid's <kind>.json records, to tell it from another grid in the folder."""
    return {r.key: sorted(x.seed for x in runs if x.key == r.key) for r in runs}


def write_grid_tables(ds, device, kind, out, runs, rows, diagnostics, log):
    write_rows(os.path.join(out, f"{kind}.csv"), rows)
    columns = [f"{s}_{m}" for s in ("valid", "test") for m in METRICS]
    summary = []
    for point in {r.key: r for r in runs}.values():  # the first run of each point, in order
        mine = [row for row in rows if row["point"] == point.key]
        done = [row for row in mine if row["best_epoch"] is not None]
        summary.append({
            "point": point.key, "label": point.label, "settings": point.changes,
            "diverged": sum(row["diverged"] for row in mine),
            "mean": {c: float(np.mean([row[c] for row in done])) for c in columns} if done else None,
            "std": {c: float(np.std([row[c] for row in done], ddof=1)) if len(done) > 1 else 0.0 for c in columns},
            "best_epoch": np.mean([row["best_epoch"] or 0 for row in mine]),
            "runs": [r.folder for r in runs if r.key == point.key]})
    eligible = [p for p in summary if not p["diverged"] and p["mean"]]
    chosen = max(eligible, key=lambda p: p["mean"]["valid_recall@20"], default=None)  # max keeps the first of ties
    seeds = sorted({r.seed for r in runs})
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
    lines += diagnostic_tables(summary, diagnostics)
    table = "\n".join(lines) + "\n"
    write_whole(os.path.join(out, f"{kind}.md"), table)
    save_json(os.path.join(out, f"{kind}.json"), {
        "points": grid_index(runs),
        "rule": "best mean valid recall@20 over the points with no diverged run; a tie goes to the point listed first",
        "chosen": chosen and {"point": chosen["point"], "settings": chosen["settings"], "runs": chosen["runs"],
                              **{s: {m: chosen["mean"][f"{s}_{m}"] for m in METRICS} for s in ("valid", "test")}}})
    log(table)


def diagnostic_tables(summary, diagnostics):
    """The grid's planted-factor diagnostic (built-in data), at initialisation -> at the best epoch, each figure the
    mean over the point's seeds and the two modalities: per part, R^2(part | group) of the generic factors, the
    part's own modality's unique factors and the other modality's (a control: about 0); then linear CKA. Lines of
    markdown (none without a diagnostic)."""
    done = {p["label"]: [d for d in diagnostics.get(p["point"], []) if d] for p in summary}
    done = {label: ds for label, ds in done.items() if ds}
    if not done:
        return []
    other = dict(zip(MODALITIES, reversed(MODALITIES)))
    groups = {"generic": lambda m: "generic", "own unique": lambda m: m, "other unique": lambda m: other[m]}
    pairs = {"g_text ~ g_image": ["text g ~ image g"], "z_text ~ z_image": ["text z ~ image z"],
             "a_m ~ b_m": [f"{m} a ~ {m} b" for m in MODALITIES], "g_m ~ u_m": [f"{m} g ~ {m} u" for m in MODALITIES]}

    def cell(ds, values):  # values(diagnostic at a time) -> the figures to average, or None if it has none
        at = {when: [v for d in ds for v in (values(d[when]) or [])] for when in ("init", "best")}
        return f"{np.mean(at['init']):.2f} -> {np.mean(at['best']):.2f}" if at["best"] else "-"
    lines = ["", "What the learned parts carry (train.py's diagnostic): R^2(part | planted factor group) on held-out "
             "items, at initialisation -> at the best epoch, mean over the seeds and both modalities.", "",
             "| point | part | " + " | ".join(groups) + " |", "|---" * (len(groups) + 2) + "|"]
    for label, ds in done.items():
        names = ds[0]["best"]["shares"]
        for kind in dict.fromkeys(name.split()[-1] for name in names):  # g, u, z, a, b (plain VBPR: features)
            mods = [m for m in MODALITIES if f"{m} {kind}" in names]
            if not mods:  # a part of both modalities at once: its shares by group name
                lines.append(f"| {label} | {kind} | " + " | ".join(
                    [cell(ds, lambda d: [d["shares"][kind]["generic"]])] + ["-"] * (len(groups) - 1)) + " |")
                continue
            lines.append(f"| {label} | {kind}_m | " + " | ".join(cell(ds, lambda d, g=g: [
                d["shares"][f"{m} {kind}"][g(m)] for m in mods]) for g in groups.values()) + " |")
    lines += ["", "Linear CKA on held-out items, at initialisation -> at the best epoch, mean over the seeds (and "
              "over both modalities for a_m ~ b_m and g_m ~ u_m).", "",
              "| point | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
    for label, ds in done.items():
        lines.append(f"| {label} | " + " | ".join(cell(ds, lambda d, keys=keys: [d["cka"][k] for k in keys if k in d["cka"]])
                                                   for keys in pairs.values()) + " |")
    return lines


# ---------------------------------------------------------------------------------------------
# Progress, timing, CUDA graphs

class Status:
    """The command line's progress line: on a terminal, one line rewritten in place and cleared before
    each logged line; elsewhere (a log file, a pipe) nothing, so the output is one line per epoch.
    main() turns it on when stdout is a terminal."""

    def __init__(self):
        self.on, self.width, self.shown_at, self.epoch_start = False, 0, -math.inf, None

    def show(self, text, every=0.0):
        """Put `text` on the progress line (at most once per `every` seconds)."""
        if self.on and time.perf_counter() - self.shown_at >= every:
            sys.stdout.write("\r" + text.ljust(self.width))
            sys.stdout.flush()
            self.width, self.shown_at = len(text), time.perf_counter()

    def batch(self, done, total):
        """Training's progress: batches, seconds, time left in the epoch."""
        if done == 1 or self.epoch_start is None:
            self.epoch_start = time.perf_counter()
        spent = time.perf_counter() - self.epoch_start
        self.show(f"training: batch {done}/{total}, {spent:.1f} s, about {spent / done * (total - done):.0f} s "
                  f"left in this epoch", every=0.0 if done == 1 else 0.2)
        if done == total:
            self.epoch_start = None

    def log(self, *args):
        """print(), after clearing the progress line."""
        if self.width:
            sys.stdout.write("\r" + " " * self.width + "\r")
            self.width = 0
        print(*args, flush=True)


STATUS = Status()


class Timer:
    """Seconds per phase of an epoch, in `total`; with `sync`, waits for the device at each lap (profiling)."""

    def __init__(self, device, sync):
        self.device, self.sync = device, sync and device.type == "cuda"
        self.total, self.last = {}, time.perf_counter()

    def lap(self, name):
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.total[name] = self.total.get(name, 0.0) + now - self.last
        self.last = now


class CUDAGraphed:
    """A training step, `step(batch) -> loss terms` for a batch of tensors, run as CUDA graphs. The second
    batch of each size records the whole step once (forward, backward, the estimator's steps, both optimizer
    steps: thousands of kernels at Baby's size, most of them the estimator's), and every later batch of that
    size copies its tensors into the graph's input buffers and replays it: the same kernels on the same
    memory, so the same numbers, without launching them one by one from Python. The first batch of each size
    runs directly, which also makes the optimizers' state that the graph then updates."""

    def __init__(self, step, optimizers):
        self.step, self.optimizers = step, optimizers
        self.seen, self.graphs = set(), {}  # batch sizes run so far; size: (graph, its input buffers, its terms)

    def __call__(self, batch):
        size = len(batch[0])
        if size not in self.seen:
            self.seen.add(size)
            return self.step(batch)
        if size not in self.graphs:  # record (capture runs nothing), then replay below
            inputs = [None if t is None else t.clone() for t in batch]  # the graph's inputs, at fixed addresses
            graph, groups = torch.cuda.CUDAGraph(), [g for o in self.optimizers for g in o.param_groups]
            for g in groups:  # capture asks for it; fused Adam computes the same either way
                g["capturable"] = True
            with torch.cuda.graph(graph):
                terms = self.step(inputs)
            for g in groups:
                g["capturable"] = False
            self.graphs[size] = graph, inputs, terms
        graph, inputs, terms = self.graphs[size]
        for buffer, t in zip(inputs, batch):
            if t is not None:
                buffer.copy_(t)
        graph.replay()
        return {k: v.clone() for k, v in terms.items()}  # the next replay overwrites them


# ---------------------------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other refusal (argparse prints its usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser():
    p = Parser(prog="train.py", description="Train SAND (Separate Alignment aNd Distancing) and report "
                                "MMRec's Recall@10/20 and NDCG@10/20 at the best valid epoch.")
    for group, cls in (("training", TrainConfig), ("model (defaults: the authors' released code)", SANDConfig)):
        g = p.add_argument_group(group)
        for f in dataclasses.fields(cls):
            # default None: a flag left out takes its default for the variant (make_config)
            if f.type is bool:
                g.add_argument(flag(f.name), action="store_true", default=None, help=f.metadata["help"])
            elif "nargs" in f.metadata:
                g.add_argument(flag(f.name), nargs=f.metadata["nargs"], help=f.metadata["help"],
                               metavar=f.metadata["metavar"])
            else:
                others = "".join(f"; --backbone {b}: {f.metadata[b]}" for b in BACKBONES if b in f.metadata)
                if "plain_vbpr" in f.metadata:
                    others += f"; plain VBPR (--backbone vbpr --dist none --align none): {f.metadata['plain_vbpr']}"
                shown = f" (default: {f.default}{others})" if f.default != "" else ""
                g.add_argument(flag(f.name), type=f.type, help=f.metadata["help"] + shown,
                               choices=f.metadata.get("choices"))
    return p


def config_from_args(args):
    given = {k: v for k, v in vars(args).items() if v is not None}  # the flags on the command line
    if "grid" in given:
        given["grid"] = tuple(given["grid"])  # argparse gives a list
    return make_config(**given)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        STATUS.on = sys.stdout.isatty()
        INTERRUPTS.install()
        results = run(config_from_args(args), log=STATUS.log)
        if isinstance(results, dict) and "best_epoch" in results and results["best_epoch"] is None:
            sys.exit(1)  # the run diverged before its first epoch ended: it has no result
    except (data.DataError, UsageError, OSError) as e:  # OSError: a file or folder that cannot be written
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("train.py: interrupted; every file written so far is complete (a run continues with --resume "
              "RUN/last.pt, a --grid or --ablation by running it again)", file=sys.stderr)
        sys.exit(143 if INTERRUPTS.signal == signal.SIGTERM else 130)


if __name__ == "__main__":
    main()
