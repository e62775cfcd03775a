"""Train and evaluate SAND: BPR sampling, MMRec's Recall/NDCG, one training step, the epoch loop.

    python train.py                              # the built-in synthetic dataset, no download
    python train.py --dataset baby --dist l2     # data/baby/ in MMRec's format

Read it top to bottom: 1. BPR sampling, 2. evaluation, 3. one training step (train_step; on a GPU the same
step recorded once as a CUDA graph), 4. the epoch loop with early stopping (fit: it builds the model, trains,
and leaves it at its best epoch), 5. what the learned parts carry (a diagnostic on the built-in data). Below
the banner "Run management": the configuration (make_config and check: each setting's value, and whether it
may be given), the run folder (Run: its files, checkpoints, resume, interruption), grids and the command line.
A reader of the method may stop at that banner. A setting's default lives in its field: TrainConfig below,
SANDConfig in sand.py, each with its backbones' own defaults beside it.
"""
import argparse
import collections
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
import re
import resource
import signal
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): leave quietly, nothing is written yet
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("train.py: interrupted\n"), os._exit(130)))

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
    plain: bool = option(False, "run sand.py's plain code (autograd, X_m formed) instead of its fast paths, and on "
                         "a GPU without CUDA graphs: the same mathematics, other float rounding; slower")
    out: str = option("", "run folder (default: runs/<dataset>-<dist>-seed<seed>, then -setting=value for each "
                      "other setting not at its default)")
    resume: str = option("", "continue the run in this folder (or its last.pt), with its settings: --epochs (not "
                         "below the epochs trained), --patience (not lowered), --device (of the same kind), "
                         "--data-dir and --profile may change", metavar="RUN")
    eval_only: str = option("", "evaluate this run folder's best epoch (or a checkpoint: RUN/best.pt, RUN/last.pt) on "
                            "valid and test, no training; --device and --data-dir may change", metavar="RUN")
    ablation: bool = option(False, "run the ablation grid (SAND with mi and l2, cross and intra CLUB fitting, "
                            "alignment only, distancing only, neither, complete alignment) and write "
                            "ablation.csv/.md/.json")
    grid: tuple = option((), "run every point of the product of the listed settings, e.g. --grid alpha=0.012,0.1 "
                         "tau=0.1,0.2 (any setting that changes results), and write grid.csv/.md/.json; the chosen "
                         "point is the best mean valid Recall@20, a tie going to the point listed first. Run again, "
                         "it reads back finished runs and resumes interrupted ones", metavar="SETTING=V1,V2,...")
    seeds: int = option(3, "seeds per point in --ablation or --grid: --seed, --seed + 1, ...", min=1, max=10 ** 4)
    profile: bool = option(False, "print per-epoch seconds in sampling, forward, backward, estimator, "
                           "optimizer and evaluation (synchronises the device; on a GPU the steps then "
                           "run without CUDA graphs, so that each phase can be timed)")


# ---------------------------------------------------------------------------------------------
# 1. BPR sampling

class BPRSampler:
    """Every train interaction once per epoch in a fresh random order, each with one negative drawn
    uniformly from the items that occur in the train split and redrawn while it is one of the
    user's train items (MMRec's protocol). Vectorised, on the training device, from `generator`; the CLUB
    bound's permutations from `perm_generator` (default: the same one)."""

    def __init__(self, train, n_items, generator, perm_generator=None):
        self.pairs, self.n_items, self.gen = train, n_items, generator  # [N, 2] on the device
        self.perm_gen = perm_generator or generator
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
        modality), else None. Everything random in an epoch is drawn here."""
        order = torch.randperm(len(self.pairs), generator=self.gen, device=self.pairs.device)
        user, pos = self.pairs[order].unbind(1)
        neg = self.negatives(user)
        batches = zip(user.split(batch_size), pos.split(batch_size), neg.split(batch_size))
        perm = lambda: torch.randperm(self.n_items, generator=self.perm_gen, device=user.device)  # [I]
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
    ops per chunk of users and one host sync. A pair repeated within a split counts once; a masked item
    is never ranked, even where fewer than K items are left.
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
        """-> [n_eval, k] item ids per user of self.users, best first, train items excluded (-1 where fewer than
        k items are left to rank)."""
        out = []
        for users, rows, cols in self.chunks:
            scores = score(users)  # [b, I]
            scores[rows, cols] = -math.inf
            top = scores.topk(min(k, self.n_items), dim=1)
            out.append(top.indices.masked_fill(top.values == -math.inf, -1))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, score):
        """-> {split: {"recall@10": ..., "ndcg@10": ..., "recall@20": ..., "ndcg@20": ...}}"""
        top = self.topk(score)  # [n_eval, K]
        top_keys = torch.where(top >= 0, self.users[:, None] * self.n_items + top, -1)  # -1: no item, never a hit
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
    """-> score(users [b]) -> [b, I]: the model's score of every item (sand.score), from embeddings
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
    None); `hp` is the model's SANDConfig, `lap` a timer (--profile). -> the loss terms {name: tensor}.
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
    model.new_epoch(sampler.gen)  # FREEDOM draws this epoch's pruned graph; the other backbones draw nothing
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


class CUDAGraphed:
    """On a GPU, a training step `step(batch) -> loss terms` run as CUDA graphs: the same kernels on the same memory,
    so the same numbers, without launching them one by one from Python. The second batch of each size records the
    whole step once (forward, backward, the estimator's steps, both optimizer steps: thousands of kernels at Baby's
    size, most of them the estimator's), and every later batch of that size copies its tensors into the graph's
    input buffers and replays it. The first batch of each size runs directly, which also makes the optimizers'
    state that the graph then updates."""

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
# 4. The epoch loop, with MMRec's early stopping

@dataclass
class Progress:
    """Where a run stands after an epoch: what early stopping and the results need (saved in last.pt)."""
    epoch: int = 0  # epochs finished
    best_score: float = -1.0  # the best valid Recall@20 so far, rounded to 4 decimals as MMRec does
    bad_epochs: int = 0  # epochs in a row since it last improved
    best_epoch: int | None = None
    best: dict | None = None  # valid and test metrics of the best epoch
    best_model: dict | None = None  # the model's weights at the best epoch
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


def build(cfg, ds, device, seed=None):
    """Model, CLUB estimator and their optimizers, initialised from `seed` (default: the run's)."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    features = {m: torch.from_numpy(getattr(ds, m)).to(device) for m in MODALITIES}
    if cfg.sand.backbone != "vbpr":
        STATUS.show(f"building the item-item kNN graph of {ds.n_items} items ...")
    model, club = sand.build_model(cfg.sand, ds.n_users, features, torch.from_numpy(ds.train), fast=not cfg.train.plain)
    model, club = model.to(device), club.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    club_opt = torch.optim.Adam(club.parameters(), lr=cfg.train.lr, fused=True)
    return model, club, opt, club_opt


def check_tiers(hp, ds, log):
    """Stop with one line if a fast path no longer computes what its plain piece does (sand.tier_mismatch)."""
    STATUS.show("checking the fast paths against the plain code ...")
    t0 = time.perf_counter()
    why = sand.tier_mismatch(hp, {"image": ds.image.shape[1], "text": ds.text.shape[1]}, ds.n_items)
    if why:
        raise UsageError(why)
    log(f"the fast paths compute what the plain code does on a small instance of this configuration "
        f"({time.perf_counter() - t0:.1f} s)")


def fit(cfg, ds, device, folder, resume=None, log=print):
    """Train on `ds` with early stopping on valid Recall@20, in run folder `folder` (Run): a new run, or the one
    that checkpoint `resume` continues. -> (results, the model at its best epoch, the evaluator). On the fast tier,
    check_tiers first (run() and grid() do)."""
    t = cfg.train
    model, club, opt, club_opt = build(cfg, ds, device)
    gen = torch.Generator(device=device).manual_seed(t.seed)
    # FREEDOM+SAND draws the CLUB's permutations from a generator of their own, so that SAND leaves FREEDOM's
    # sampling as it is (at --reg-weight 0 its scores are FREEDOM's); the other backbones draw them after the
    # epoch's negatives, as they always have
    perm_gen = torch.Generator(device=device).manual_seed(t.seed) if cfg.sand.backbone == "freedom" else gen
    sampler = BPRSampler(torch.from_numpy(ds.train).to(device), ds.n_items, gen, perm_gen)
    evaluator = make_evaluator(ds, device)
    timer = Timer(device, sync=t.profile)
    step = functools.partial(train_step, model, club, opt, club_opt, hp=cfg.sand, lap=timer.lap)
    if device.type == "cuda" and not (t.plain or t.profile or cfg.sand.backbone == "freedom"):
        step = CUDAGraphed(step, [opt, club_opt])  # the same step, recorded once and replayed (FREEDOM's graph
        # changes every epoch, so its steps run directly)
    with locked(folder), Run(cfg, ds, folder, log) as run:
        p = run.start((model, club, opt, club_opt, [gen, perm_gen]), resume)  # a new Progress, or the checkpoint's
        while p.epoch < t.epochs and p.bad_epochs <= t.patience and p.diverged is None:
            epoch, t0 = p.epoch + 1, time.perf_counter()
            terms = train_epoch(model, step, sampler, cfg, timer.lap)
            t1 = time.perf_counter()
            if not finite(terms, model, club):  # no later epoch, nor this one, can be trusted
                p.diverged = epoch
                run.end_epoch(p, terms)
                break
            metrics = evaluate(model, evaluator)
            t2 = time.perf_counter()
            p.best_score, p.bad_epochs, improved = early_stopping(metrics["valid"]["recall@20"], p.best_score,
                                                                  p.bad_epochs)
            if improved:
                p.best_epoch, p.best, p.best_model = epoch, metrics, copy.deepcopy(model.state_dict())
            p.epoch = epoch
            run.end_epoch(p, terms, metrics, improved, t1 - t0, t2 - t1, timer)  # metrics, checkpoint when due, log
        if p.best_model is not None:
            model.load_state_dict(p.best_model)  # the model at its best epoch, which the results are of
        results = run.finish(p, model, evaluator)  # the last epoch's checkpoint; results.json, topk.tsv
    return results, model, evaluator


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
    lines += ["linear CKA: " + ", ".join(f"{k} {init['cka'][k]:.3f} -> {v:.3f}" for k, v in best["cka"].items())
              ] if best["cka"] else []  # plain VBPR: one feature map, no pairs
    return "\n".join(lines)


def diagnostic_tables(points):
    """A grid's diagnostic as markdown lines, {point: its runs' diagnostics}: at initialisation -> at the best epoch,
    each figure the mean over the point's seeds and the two modalities. Per part, R^2(part | group) of the generic
    factors, of the part's own modality's unique ones and of the other modality's (a control: about 0); then CKA."""
    other = dict(zip(MODALITIES, reversed(MODALITIES)))
    groups = {"generic": lambda m: "generic", "own unique": lambda m: m, "other unique": lambda m: other[m]}
    pairs = {"g_text ~ g_image": ["text g ~ image g"], "z_text ~ z_image": ["text z ~ image z"],
             "a_m ~ b_m": [f"{m} a ~ {m} b" for m in MODALITIES], "g_m ~ u_m": [f"{m} g ~ {m} u" for m in MODALITIES]}

    def cell(ds, values):  # values(a diagnostic) -> the figures to average (none: "-")
        at = {when: [v for d in ds for v in values(d[when])] for when in ("init", "best")}
        return f"{np.mean(at['init']):.2f} -> {np.mean(at['best']):.2f}" if at["best"] else "-"
    lines = ["", "What the learned parts carry (train.py's diagnostic): R^2(part | planted factor group) on held-out "
             "items, at initialisation -> at the best epoch, mean over the seeds and both modalities.", "",
             "| point | part | " + " | ".join(groups) + " |", "|---" * (len(groups) + 2) + "|"]
    for label, ds in points.items():
        names = ds[0]["best"]["shares"]
        for part in dict.fromkeys(name.split()[-1] for name in names):  # g, u, z, a, b (plain VBPR: features)
            mods = [m for m in MODALITIES if f"{m} {part}" in names]
            lines.append(f"| {label} | {part}_m | " + " | ".join(cell(ds, lambda d, g=g: [
                d["shares"][f"{m} {part}"][g(m)] for m in mods]) for g in groups.values()) + " |" if mods else
                f"| {label} | {part} | {cell(ds, lambda d: [d['shares'][part]['generic']])} | - | - |")
    lines += ["", "Linear CKA on held-out items, at initialisation -> at the best epoch, mean over the seeds (and over "
              "both modalities for a_m ~ b_m and g_m ~ u_m).", "", "| point | " + " | ".join(pairs) + " |",
              "|---" * (len(pairs) + 1) + "|"]
    for label, ds in points.items():
        cells = [cell(ds, lambda d, keys=keys: [d["cka"][k] for k in keys if k in d["cka"]]) for keys in pairs.values()]
        lines += [f"| {label} | " + " | ".join(cells) + " |"] if set(cells) != {"-"} else []  # plain VBPR: no halves
    return lines if points else []




# =============================================================================================
# Run management. Nothing below changes what a run computes: the configuration (each setting's value, and
# whether it may be given), the run folder (its files, checkpoints, resume, interruption), grids, progress and
# the command line.

class UsageError(Exception):
    """A command line that cannot be carried out; the message says why in one line."""


@dataclass
class RunConfig:
    sand: SANDConfig
    train: TrainConfig
    given: frozenset = frozenset()  # the settings set explicitly: on the command line, or by a grid point

    def as_dict(self):
        return {"sand": dataclasses.asdict(self.sand), "train": dataclasses.asdict(self.train)}


FIELDS = {f.name: f for part in (SANDConfig, TrainConfig) for f in dataclasses.fields(part)}
HOW = ("data_dir", "device", "out", "resume", "eval_only", "ablation", "grid", "seeds", "profile")  # not what it computes
MAY_CHANGE = {"resume": ("epochs", "patience", "device", "data_dir", "profile"),  # the flags a saved run lets change
              "eval_only": ("device", "data_dir")}
MAX_RUNS = 10_000  # in one grid


def flag(name):
    return "--" + name.replace("_", "-")  # club_fit -> --club-fit


def value(cfg, name):
    return getattr(cfg.sand if name in cfg.sand.__dataclass_fields__ else cfg.train, name)


def defaults(backbone, dist=None, align=None):
    """{setting: default} of a variant: each field's own default, or its backbone's where the field gives one
    (option(..., vbpr=...)), and for VBPR without SAND's terms (--dist none --align none) its plain_vbpr=."""
    keys = [backbone] + (["plain_" + backbone] if dist == align == "none" else [])
    return {name: next((f.metadata[k] for k in reversed(keys) if k in f.metadata), f.default) for name, f in FIELDS.items()}


def make_config(given=None, **settings):
    """The run configuration of these settings, every other one at its default for the variant (defaults()). The
    settings count as given (check() refuses a given one that the variant does not read) unless `given` names which."""
    if settings.keys() - FIELDS.keys():
        raise TypeError(f"make_config: no setting {', '.join(sorted(settings.keys() - FIELDS.keys()))}")
    backbone = settings.get("backbone", SANDConfig.backbone)
    first = defaults(backbone)
    values = defaults(backbone, settings.get("dist", first["dist"]), settings.get("align", first["align"])) | settings
    return RunConfig(SANDConfig(**{f.name: values[f.name] for f in dataclasses.fields(SANDConfig)}),
                     TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig)}),
                     frozenset(settings if given is None else given))


def check(cfg):
    """Each setting of its type, in its range and choices; no flag that would be ignored (one the variant does not
    read: sand.unread; one read only with another), no two modes at once. Else a UsageError, before anything runs."""
    for name, f in FIELDS.items():
        v, m, fl = value(cfg, name), f.metadata, flag(name)
        if not isinstance(v, (int, float) if f.type is float else f.type) or (f.type is not bool and isinstance(v, bool)):
            raise UsageError(f"{fl} must be a{'n' if f.type is int else ''} {f.type.__name__} (got {v!r})")
        if f.type is float and not math.isfinite(v):
            raise UsageError(f"{fl} must be a finite number (got {v})")
        if v not in m.get("choices", (v,)):
            raise UsageError(f"{fl} must be one of {', '.join(m['choices'])} (got {v!r})")
        for key, ok, words in (("min", lambda b: v >= b, "at least"), ("max", lambda b: v <= b, "at most"),
                               ("above", lambda b: v > b, "above"), ("below", lambda b: v < b, "below")):
            if key in m and not ok(m[key]):
                raise UsageError(f"{fl} must be {words} {m[key]} (got {v})")
        if name in cfg.given and v == "":
            raise UsageError(f"{fl} '' is empty: give a value, or leave the flag out")
    t, s = cfg.train, cfg.sand
    modes = [n for n in ("resume", "eval_only", "ablation", "grid") if getattr(t, n)]
    if len(modes) > 1:
        raise UsageError(f"{flag(modes[0])} and {flag(modes[1])} do not go together: run them one at a time")
    grid, saved = modes[:1] in (["ablation"], ["grid"]), modes[:1] in (["resume"], ["eval_only"])
    unread = {"seeds": "read only with --ablation or --grid"} if not grid else {
        "profile": "not read by --ablation or --grid (profile one point alone)"}
    if not saved:  # a saved run's own settings are judged with those given, by saved_run; a grid's points by grid_runs
        unread |= ({} if grid else sand.unread(s)) | ({"data_seed": "read only with a built-in --dataset"} if
                                                      t.dataset not in data.BUILTIN else
                                                      {"data_dir": f"not read by the built-in --dataset {t.dataset}"})
    for name in FIELDS:  # in the order of the flags
        if name in cfg.given and name in unread:
            raise UsageError(f"{flag(name)} is {unread[name]}: leave it out")
    if s.backbone != "dragon" and (s.embed_dim < 2 or s.embed_dim % 2):
        raise UsageError(f"--backbone {s.backbone} splits --embed-dim into a generic and a unique half: give an even "
                         f"number, 2 or more (got {s.embed_dim})")
    if t.seed + (t.seeds - 1 if grid else 0) > FIELDS["seed"].metadata["max"]:
        raise UsageError(f"--seed {t.seed} with --seeds {t.seeds} goes past {FIELDS['seed'].metadata['max']}")


def check_folder(path):
    """A run folder's path must be one that a folder can be made at (a grid of many settings makes long names)."""
    if os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path)):
        raise UsageError(f"{path} is a file or a broken symbolic link: give a folder path")
    for part in os.path.normpath(path).split(os.sep):
        if len(part.encode()) > 255:
            raise UsageError(f"the run folder name {part[:40]}... is {len(part.encode())} bytes, more than a file "
                             f"system allows (255): give --out")


def check_for_data(cfg, n_users, n_items, widths, device):
    """The settings that depend on the data's sizes: the kNN graph's k, and the memory the run needs."""
    if cfg.sand.backbone != "vbpr" and cfg.sand.knn_k > n_items:
        raise UsageError(f"--knn-k {cfg.sand.knn_k} is more than the {n_items} items of {cfg.train.dataset}")
    need, what = memory_needed(cfg, n_users, n_items, widths)
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else data.memory_available()
    if have is not None and need > have:
        raise UsageError(f"this run needs at least {need / 2 ** 30:.1f} GiB ({what}), more than the "
                         f"{have / 2 ** 30:.1f} GiB available on {device}")


def memory_needed(cfg, n_users, n_items, widths):
    """A lower bound on the bytes a run holds at once, and what they are: every parameter (counted on the meta
    device: nothing is allocated) with its gradient and Adam's two moments, the features, the CLUB estimator's
    activations, and (--plain) X_m and SoloSimLoss's I x I logits."""
    with torch.device("meta"):
        model, club = sand.build_model(cfg.sand, n_users, {m: torch.empty(n_items, d) for m, d in widths.items()})
    params = {**dict(model.named_parameters()), **{f"club.{k}": p for k, p in club.named_parameters()}}
    n, largest = sum(p.numel() for p in params.values()), max(params, key=lambda k: params[k].numel())
    need = 16 * n + 4 * n_items * sum(widths.values())
    what = f"{n:,} parameters, each with its gradient and Adam's two moments; the largest, {largest}, is " + \
           " x ".join(map(str, params[largest].shape))
    if cfg.train.plain:
        need += 2 * 4 * n_items * sum(widths.values()) + (3 * 4 * n_items ** 2 if cfg.sand.align != "none" else 0)
    if cfg.sand.dist == "mi":  # both networks' hidden layers on both sets of pairs, their gradients, masks, buffers
        need += 4 * 4 * 2 * n_items * 2 * cfg.sand.club_hidden
        what += f"; the CLUB estimator's activations, 2 x {n_items} pairs through --club-hidden {cfg.sand.club_hidden}"
    if not cfg.train.plain:  # the check of the fast paths first: a float64 model with its gradients, ~30 users and items
        with torch.device("meta"):
            check = sum(p.numel() for p in sand.build_model(cfg.sand, 30, {m: torch.empty(40, d) for m, d in
                                                                          widths.items()})[0].parameters())
        if 32 * check > need:
            need, what = 32 * check, f"the check of the fast paths: {check:,} parameters in float64, with gradients"
    return need, what


def resolve_device(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for bad, why in ((device.type not in ("cpu", "cuda"), "only cpu and cuda are supported (sparse CSR products)"),
                     (device.type == "cpu" and device.index is not None, "the CPU has no device number; use --device cpu"),
                     (device.type == "cuda" and not count, "this torch sees no CUDA GPU; use --device cpu"),
                     (device.type == "cuda" and (device.index or 0) >= count,
                      f"this machine has {count} CUDA GPU(s), numbered from 0; use --device cuda:0")):
        if bad:
            raise UsageError(f"--device {name}: {why}")
    return device


def load(cfg, device, points=()):
    """The run's dataset, each configuration checked against its sizes (check_for_data) before the features are
    read: the run's, or a grid's `points` [(name, RunConfig)]."""
    t = cfg.train
    STATUS.show(f"loading {t.dataset} ..." if t.dataset not in data.BUILTIN else f"making the built-in {t.dataset} ...")

    def fits(*sizes):
        for name, c in points or [(None, cfg)]:
            try:
                check_for_data(c, *sizes, device)
            except UsageError as e:
                raise UsageError(f"{'--ablation' if t.ablation else '--grid'} point {name}: {e}" if name else e) from None
    return data.load_dataset(t.dataset, t.data_dir, t.data_seed, fits)


def default_folder(cfg, points=None):
    """runs/<dataset>-<dist>-seed<seed> for a run; for a grid of `points` (--ablation, --grid), whose runs are
    named by point and seed, runs/ablation-<dataset> or runs/grid-<dataset>-<the listed settings>; then
    -setting=value for every other setting that changes the results and is not at its default, so that runs of
    other settings do not meet in one folder (and a run of other settings or data found there is refused)."""
    t, s = cfg.train, cfg.sand
    name, named = f"{t.dataset}-{s.dist}-seed{t.seed}", ("dataset", "dist", "seed")
    if points is not None:
        listed = list(dict.fromkeys(k for _, _, changes in points for k in changes))  # in order, once each
        name = f"grid-{t.dataset}-" + "-".join(listed) if t.grid else f"ablation-{t.dataset}"
        named = ("dataset", "seed", *listed)
    d = defaults(s.backbone, s.dist, s.align)
    return os.path.join("runs", name + "".join(f"-{k}={value(cfg, k)}" for k in FIELDS
                                               if k not in HOW + named and value(cfg, k) != d[k]))


# ---------------------------------------------------------------------------------------------
# The run folder: config.json, metrics.csv, last.pt, best.pt, results.json, topk.tsv

RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best.pt", "results.json", "topk.tsv")
CHECKPOINT_SECONDS = 60  # after the first epoch, then at most this often, at the end, and on interruption


class Run:
    """A run's folder (locked by fit() while it trains), used as `with Run(...) as run:` around the epoch loop. It
    holds one run, and its files always describe one state of that run: a run writes nothing until its first
    checkpoint, which replaces what an earlier run of these settings left (a folder of another run is refused).
    A checkpoint is last.pt (all a run needs to go on: weights, optimizers, generators, the metrics so far, the
    best epoch's weights), best.pt and metrics.csv, each written whole before any is renamed into place; after
    the first epoch, at most once a minute after that, at the end, and on Ctrl-C or SIGTERM: no finished epoch is
    lost. config.json names the run, so a last.pt resumes only in the folder it was written in."""

    def __init__(self, cfg, ds, folder, log):
        self.cfg, self.ds, self.folder, self.log = cfg, ds, folder, log
        self.kept, self.saved_at, self.written, self.saved, self.saved_best = None, -math.inf, False, None, None
        self.saved_state = None  # the kept state that was last written

    def path(self, name):
        return os.path.join(self.folder, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            with INTERRUPTS.held():  # a second Ctrl-C waits for the last epoch's files
                if self.kept is not self.saved_state:
                    self.save()
                self.log(f"interrupted: --resume {self.folder} continues after epoch {self.saved}" if self.saved
                         is not None else f"interrupted before the first epoch ended: {self.folder}/ is as it was")

    def start(self, parts, resume):
        """-> the run's Progress: a new one, or that of the checkpoint `resume` with the run's state restored.
        parts: (model, estimator, optimizer, the estimator's, [generators])."""
        self.parts, model = parts, parts[0]
        if resume is None:
            same = same_run(self.folder, self.cfg, self.ds)
            if same is not True:
                raise UsageError(f"{self.folder}/ holds another run ({same}); give another --out, or delete that folder")
            if any(os.path.exists(self.path(name)) for name in RUN_FILES):
                self.log(f"{self.folder}/ holds an earlier run of these settings: this run's first checkpoint replaces it")
            self.id, p = uuid.uuid4().hex, Progress(diagnostic_init=self.ds.factors and diagnostic(model, self.ds.factors))
        else:
            if read_json(self.path("config.json")).get("run") != resume["run"]:
                raise UsageError(f"{self.folder}/ holds another run than the one its last.pt was written by")
            self.id, p, t = resume["run"], restore(resume, *parts), self.cfg.train
            self.saved, self.saved_at = p.epoch, time.perf_counter()  # best.pt is written again at the first checkpoint
            self.log(f"resuming {self.folder}/ after epoch {p.epoch} (--epochs {t.epochs}, --patience {t.patience})"
                     + (": it has already stopped" if p.diverged or p.bad_epochs > t.patience or p.epoch >= t.epochs
                        else ""))
        self.log(f"{self.ds.summary(short=True)} on {model_device(model)}; writing to {self.folder}/")
        for note in self.ds.notes:
            self.log(note)
        return p

    def end_epoch(self, p, terms, metrics=None, improved=False, train_s=0.0, eval_s=0.0, timer=None):
        """After an epoch: its metrics row, the state kept, a checkpoint when due, the log line. Without metrics: an
        epoch whose loss or weights are not finite, which stops the run (for good: resumed, it stays stopped)."""
        if metrics is None:
            self.log(f"epoch {p.diverged}: a loss or a weight is not finite ({terms}); stopping, "
                     + (f"the best epoch ({p.best_epoch}) is kept" if p.best_epoch else "no epoch finished"))
            return self.keep(p)
        p.history.append({"epoch": p.epoch, **{k: round(v, 6) for k, v in terms.items()},
                          **{f"{s}_{k}": round(v, 6) for s in metrics for k, v in metrics[s].items()},
                          "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)})
        self.keep(p, improved)
        if time.perf_counter() - self.saved_at > CHECKPOINT_SECONDS:
            self.save()
        self.log(f"epoch {p.epoch:4d} | " + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                 + f" | valid R@20 {metrics['valid']['recall@20']:.4f} test R@20 {metrics['test']['recall@20']:.4f} | "
                 f"train {train_s:.2f}s eval {eval_s:.2f}s" + (" *" if improved else ""))
        if self.cfg.train.profile:
            self.log("  profile: " + " ".join(f"{k} {v:.3f}s" for k, v in timer.total.items()) + f" evaluate {eval_s:.3f}s")
        timer.total.clear()

    def keep(self, p, improved=False):
        """Copy now what last.pt is to hold, as training moves on: every weight, optimizer state and generator, and
        the Progress (its best epoch's weights by reference: a new copy replaces them when the best moves; at an
        improving epoch they are the model's weights, kept once)."""
        model, club, opt, club_opt, generators = self.parts
        cuda = model_device(model).type == "cuda"
        self.kept = {"run": self.id, "epoch": p.epoch, "generators": [g.get_state() for g in generators],
                     "rng": {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(model_device(model))}
                                                              if cuda else {})},
                     "progress": {**vars(p), "history": list(p.history)}, **checkpoint_header(self.cfg, self.ds),
                     "model": p.best_model if improved else copy.deepcopy(model.state_dict()),
                     **{k: copy.deepcopy(part.state_dict()) for k, part in (("club", club), ("opt", opt), ("club_opt", club_opt))}}

    def save(self):
        """The kept state's checkpoint: last.pt, metrics.csv, best.pt if the best epoch moved and, at a run's first,
        config.json, all written before any is renamed into place (a full disk leaves the folder as it was); then
        no earlier run's results are left."""
        k, p, header = self.kept, self.kept["progress"], checkpoint_header(self.cfg, self.ds)
        best = {"run": self.id, "model": p["best_model"], "epoch": p["best_epoch"], **header}
        files = {"last.pt": (lambda f: torch.save(k, f), "wb"), "metrics.csv": (csv_text(p["history"]), "w")}
        if p["best_epoch"] not in (self.saved_best, None):
            files["best.pt"] = (lambda f: torch.save(best, f), "wb")
        if not self.written:  # this run's first checkpoint: the folder becomes its alone
            now, before = environment(model_device(self.parts[0])), read_json(self.path("config.json"))
            resumed = self.id == before.get("run")  # then config.json keeps how the run began, and adds this
            files["config.json"] = (json_text({**self.cfg.as_dict(), "run": self.id, "given": header["given"],
                                               "dataset_stats": header["dataset"],
                                               "environment": before["environment"] if resumed else now,
                                               "resumed": before.get("resumed", []) + [now] if resumed else []}), "w")
        with INTERRUPTS.held():
            try:
                data.write_together({self.path(name): content for name, content in files.items()})
            except (RuntimeError, OSError) as e:  # RuntimeError: torch.save's way of saying that a write failed
                raise OSError(f"cannot write a checkpoint in {self.folder}/ ({first_line(e)}): is the disk full?") from None
            if not self.written:  # an earlier run's results go, and its best.pt where this run has none yet
                for name in ["results.json", "topk.tsv"] + ([] if p["best_epoch"] else ["best.pt"]):
                    if os.path.exists(self.path(name)):
                        os.remove(self.path(name))
            self.written, self.saved_best, self.saved, self.saved_at = True, p["best_epoch"], k["epoch"], time.perf_counter()
            self.saved_state = k

    def finish(self, p, model, evaluator):
        """The last epoch's checkpoint (kept before fit() put the model back at its best epoch); then results.json
        and topk.tsv (each test user's top 20, best first) of the best epoch."""
        if self.kept is not self.saved_state:  # not written yet
            self.save()
        hist = p.history
        results = {"best_epoch": p.best_epoch, "valid": p.best and p.best["valid"], "test": p.best and p.best["test"],
                   "epochs_run": p.epoch, "diverged": p.diverged is not None,
                   "train_s_per_epoch": float(np.median([r["train_s"] for r in hist])) if hist else None,
                   "eval_s_per_epoch": float(np.median([r["eval_s"] for r in hist])) if hist else None,
                   "peak_memory_gib": peak_memory_gib(model_device(model)), "dataset": self.ds.summary()}
        if p.best_epoch is not None:
            if self.ds.factors is not None:  # built-in data: what do the parts carry?
                results["diagnostic"] = {"init": p.diagnostic_init, "best": diagnostic(model, self.ds.factors)}
            rows = evaluator.splits["test"][1]
            top = zip(evaluator.users[rows].tolist(), evaluator.topk(scorer(model))[rows].tolist())
            write_whole(self.path("topk.tsv"), "userID\t" + "\t".join(f"item{r}" for r in range(1, max(KS) + 1)) + "\n"
                        + "".join(f"{u}\t" + "\t".join(str(i) for i in row if i >= 0) + "\n" for u, row in top))
        write_whole(self.path("results.json"), json_text(results))
        return results


def model_device(model):
    return next(model.parameters()).device


def checkpoint_header(cfg, ds):
    """What every checkpoint says of its run: the configuration and the data (its fingerprint included)."""
    return {"config": cfg.as_dict(), "given": sorted(cfg.given), "dataset": ds.summary()}


def restore(ckpt, model, club, opt, club_opt, generators):
    """Load a last.pt into the run's model, estimator, optimizers and generators -> its Progress (or a UsageError)."""
    if [g.get_state().numel() for g in generators] != [s.numel() for s in ckpt.get("generators", [])]:
        raise UsageError(f"the run was made on another kind of device, whose random generators cannot go on here: "
                         f"resume it on that kind (its config.json names the device)")
    try:
        for part, name in ((model, "model"), (club, "club"), (opt, "opt"), (club_opt, "club_opt")):
            part.load_state_dict(ckpt[name])
        for g, state in zip(generators, ckpt["generators"]):
            g.set_state(state)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and model_device(model).type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], model_device(model))
        return Progress(**ckpt["progress"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"the checkpoint does not fit this run's model ({type(e).__name__}: {first_line(e)})") from None


def same_run(folder, cfg, ds):
    """Is the run in `folder` one of these settings (all that change results) on this data? -> True (also when the
    folder holds no run's files), or what differs."""
    if not any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES):
        return True
    saved = read_json(os.path.join(folder, "config.json"))
    try:
        theirs = config_from_dict(saved)
    except UsageError:
        return "its config.json is missing or unreadable"
    if saved.get("dataset_stats") != ds.summary():
        return f"made on other data: {saved.get('dataset_stats')}"
    as_json = lambda v: json.loads(json.dumps(v))  # a tuple is a list there
    differ = [name for name in FIELDS if name not in HOW and as_json(value(theirs, name)) != as_json(value(cfg, name))]
    return "; ".join(f"{flag(k)} {value(theirs, k)}, not {value(cfg, k)}" for k in differ) if differ else True


def config_from_dict(c, given=()):
    """The configuration a checkpoint or config.json records (a setting added since takes its default), without how
    that run was started (--resume, --out, ...)."""
    try:
        settings = {k: v for k, v in {**c["sand"], **c["train"]}.items() if k not in HOW or k in ("data_dir", "device")}
        return make_config(given=[name for name in given if name in settings], **settings)
    except (TypeError, KeyError) as e:
        raise UsageError(f"a saved configuration that this train.py cannot read ({e})") from None


def saved_run(cfg, mode):
    """The run that --resume or --eval-only names (a run folder, or a checkpoint in one) -> (its checkpoint, its
    configuration, its folder). It keeps its settings: a flag of MAY_CHANGE[mode] given on the command line
    replaces the saved value, any other is refused. --patience may not go below the run's, nor --epochs below the
    epochs it has trained: a run so stopped might have stopped sooner, and its record would name settings that did
    not make its results."""
    path = value(cfg, mode)
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt" if mode == "resume" else "best.pt")
    ckpt = load_checkpoint(path)
    if mode == "resume" and "opt" not in ckpt:
        raise UsageError(f"{path} holds only the best epoch's weights; resume the run folder (its last.pt)")
    saved, before = config_from_dict(ckpt["config"], set(ckpt["given"]) | cfg.given - {mode}), config_from_dict(ckpt["config"])
    for name in sorted(cfg.given - {mode}, key=list(FIELDS).index):
        if name not in MAY_CHANGE[mode]:
            raise UsageError(f"{flag(name)} cannot be given with {flag(mode)}, which keeps the run's settings (it lets "
                             f"{', '.join(map(flag, MAY_CHANGE[mode]))} change); start a new run for other settings")
        setattr(saved.train, name, value(cfg, name))
    if mode == "resume" and saved.train.patience < before.train.patience:
        raise UsageError(f"--patience {saved.train.patience} is below the run's {before.train.patience}, which might have "
                         f"stopped it sooner: give {before.train.patience} or more, or start a new run")
    if mode == "resume" and saved.train.epochs < ckpt["epoch"]:
        raise UsageError(f"--epochs {saved.train.epochs}: the run has trained {ckpt['epoch']} epochs already")
    try:
        check(saved)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    saved.train.out = os.path.dirname(os.path.abspath(path))  # a run goes on in its own folder
    return ckpt, saved, saved.train.out


def check_data(ckpt, ds):
    if ckpt["dataset"] != ds.summary():
        raise data.DataError(f"the run was trained on other data ({ckpt['dataset']}), not on {ds.summary()}: give the "
                             f"--data-dir it was trained on, or start a new run")


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
        raise UsageError(f"{not_ours}: {type(e).__name__}: {first_line(e)}") from None
    kinds = {"model": dict, "epoch": int, "config": dict, "dataset": dict, "given": list}
    if not isinstance(ckpt, dict) or any(not isinstance(ckpt.get(k), t) or isinstance(ckpt.get(k), bool) for k, t in kinds.items()):
        raise UsageError(not_ours)
    if "run" not in ckpt:
        raise UsageError(f"{path} was written by an older train.py; start a new run")
    return ckpt


@contextlib.contextmanager
def locked(folder):
    """An exclusive lock on a run folder (its file .lock), held while a train.py writes there; a folder made here
    that holds nothing else when it ends is removed again."""
    made, path, f = [], os.path.join(folder, ".lock"), os.path.abspath(folder)
    while not os.path.exists(f):  # the folders made here, innermost first
        made, f = made + [f], os.path.dirname(f)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) if fcntl else msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            with open(path) as f:
                raise UsageError(f"{folder}/ is in use by another train.py (pid {f.read().strip() or '?'}): wait for it "
                                 f"to end, or give another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the file releases the lock
        if made and os.listdir(folder) == [".lock"]:
            os.remove(path)
            for f in made:
                if os.listdir(f):
                    break
                os.rmdir(f)


if os.name == "nt":
    import msvcrt
    fcntl = None
else:
    import fcntl


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM stop the program with KeyboardInterrupt, but never in the middle of writing a file
    (held()): a signal that comes then takes effect once the file is written, and later ones are ignored while the
    run writes its last epoch and stops. main() installs it."""
    holding, pending, signal = 0, False, None

    def install(self):
        self.holding, self.pending, self.signal = 0, False, None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is None:  # already stopping: a second Ctrl-C waits for the last files too
            self.signal, self.pending = signum, bool(self.holding)
            if not self.holding:
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


def write_whole(path, content):
    with INTERRUPTS.held():
        data.atomic_write(path, content)


def json_text(obj):
    return json.dumps(obj, indent=2) + "\n"


def csv_text(rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_json(path):
    """A JSON file's object, or {} if it is missing or unreadable."""
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def environment(device):
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "command": sys.argv}


def peak_memory_gib(device):
    """Peak memory of this process so far: allocated on the GPU, or resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# What the command line does: a run, a resumed run, an evaluation, a grid

def run(cfg, log=print):
    """The command line's work, given a configuration. Everything that can be checked is checked before any file
    is written."""
    check(cfg)
    t = cfg.train
    if t.eval_only:
        return eval_only(cfg, log)
    if t.ablation or t.grid:
        return grid(cfg, log)
    ckpt, folder = None, t.out or default_folder(cfg)
    if t.resume:
        ckpt, cfg, folder = saved_run(cfg, "resume")
    check_folder(folder)
    device = resolve_device(cfg.train.device)
    ds = load(cfg, device)
    if ckpt is not None:
        check_data(ckpt, ds)
    if not cfg.train.plain:  # the fast paths must compute what the plain code says, as it stands now
        check_tiers(cfg.sand, ds, log)
    results = fit(cfg, ds, device, folder, ckpt, log)[0]
    if results["best_epoch"] is None:
        log(f"no epoch finished: {folder}/results.json holds no metrics")
        return results
    log(f"best epoch {results['best_epoch']}: test " + json.dumps(results["test"]))
    if "diagnostic" in results:
        log(format_diagnostic(**results["diagnostic"]))
    return results


def eval_only(cfg, log):
    ckpt, saved, _ = saved_run(cfg, "eval_only")
    device = resolve_device(saved.train.device)
    ds = load(saved, device)
    check_data(ckpt, ds)
    if not saved.train.plain:
        check_tiers(saved.sand, ds, lambda *_: None)
    model = build(saved, ds, device)[0]
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"{cfg.train.eval_only} does not fit its run's model ({first_line(e)})") from None
    if not finite({}, model):
        raise UsageError(f"{cfg.train.eval_only} holds weights that are not finite: it is no model to evaluate")
    metrics = evaluate(model, make_evaluator(ds, device))
    log(json.dumps({"epoch": ckpt["epoch"], **metrics}, indent=2))
    return metrics


# ---------------------------------------------------------------------------------------------
# Grids: --ablation and --grid

ABLATIONS = [  # the ablation grid's points: (run folder prefix, what it is, settings)
    ("mi-cross", "SAND, --dist mi (CLUB fitted cross-modal, as released)", {"dist": "mi", "align": "solo", "club_fit": "cross"}),
    ("mi-intra", "SAND, --dist mi --club-fit intra (as the paper describes)", {"dist": "mi", "align": "solo", "club_fit": "intra"}),
    ("l2", "SAND, --dist l2", {"dist": "l2", "align": "solo"}),
    ("align-only", "alignment only: --dist none", {"dist": "none", "align": "solo"}),
    ("dist-only", "distancing only: --align none --dist mi", {"dist": "mi", "align": "none"}),
    ("neither", "neither: --dist none --align none (the backbone itself)", {"dist": "none", "align": "none"}),
    ("complete", "complete alignment: --align complete --dist none (no split)", {"dist": "none", "align": "complete"}),
]
METRICS = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")]


def grid_points(specs):
    """--grid's words (setting=v1,v2,...) -> the points of their product, in the order listed:
    [(run folder prefix, label, {setting: value})]."""
    axes, settings = {}, [name for name in FIELDS if name not in HOW + ("dataset", "data_seed", "seed")]
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in settings or not values:
            raise UsageError(f"--grid {spec!r} is not SETTING=V1,V2,... with one of the settings that change "
                             f"results: {', '.join(settings)}")
        if name in axes:
            raise UsageError(f"--grid lists {name} twice: give all its values once, {name}=V1,V2,...")
        f, axes[name] = FIELDS[name], []
        for text in values.split(","):  # each value as its flag would read it
            try:
                v = {"true": True, "false": False}[text.lower()] if f.type is bool else f.type(text)
            except (ValueError, KeyError):
                raise UsageError(f"--grid {name}={text}: {text!r} is not a{'n' if f.type is int else ''} "
                                 f"{f.type.__name__}") from None
            if v not in f.metadata.get("choices", (v,)):
                raise UsageError(f"--grid {name}={text}: choose from {', '.join(f.metadata['choices'])}")
            if v in axes[name]:
                raise UsageError(f"--grid {spec}: {name} {v} is listed twice; one point is one point")
            axes[name].append(v)
    return [grid_point(dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]


def grid_point(changes):
    return ("-".join(f"{k}={v}" for k, v in changes.items()), " ".join(f"{flag(k)} {v}" for k, v in changes.items()),
            changes)


GridRun = collections.namedtuple("GridRun", "key label changes seed folder cfg")  # a point's name, flags, settings


def grid_runs(cfg, points):
    """-> the grid's folder, its runs [GridRun] (every point for --seeds seeds: --seed, --seed + 1, ..., each
    checked) and notes for the log. The settings given besides the grid apply to the points that read them; a
    point's setting that its variant does not read is dropped (sand.unread), and points that are then the same
    run are run once (the first listed). A setting that no point reads is refused, as is one a point sets."""
    t = cfg.train
    kind = "--ablation" if t.ablation else "--grid"
    if len(points) * t.seeds > MAX_RUNS:
        raise UsageError(f"{kind} of {len(points)} points x {t.seeds} seeds is {len(points) * t.seeds:,} runs, more "
                         f"than {MAX_RUNS:,}: split it")
    out = t.out or default_folder(cfg, points)
    base = {name: value(cfg, name) for name in cfg.given if name not in ("ablation", "grid", "seeds", "out", "seed")}
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
        if not t.ablation:  # a grid point is named by the settings it keeps
            key, label, _ = grid_point(kept)
        if key in seen:
            notes.append(f"{kind}: {' '.join(f'{flag(k)} {v}' for k, v in changes.items())} is the same run as "
                         f"{seen[key]} ({'; '.join(f'{flag(k)} is {unread[k]}' for k in changes if k in unread)}): "
                         f"run once")
            continue
        seen[key] = label
        for seed in range(t.seed, t.seed + t.seeds):
            folder = os.path.join(out, f"{key}-seed{seed}")
            one = make_config(**{k: v for k, v in settings.items() if k not in unread}, seed=seed, out=folder)
            try:
                check(one)
                check_folder(folder)
            except UsageError as e:
                raise UsageError(f"{kind} point {key}: {e}") from None
            runs.append(GridRun(key, label, kept, seed, folder, one))
    for name in [*base, *(k for _, _, changes in points for k in changes)]:
        if name not in read:
            raise UsageError(f"{kind}: {flag(name)} is {why.get(name, 'read by no point')}, and no point has that: "
                             f"leave it out")
    return out, runs, notes


def grid(cfg, log):
    """Runs every run of the grid (grid_runs), each in its own folder, then writes <kind>.csv (a row per run),
    <kind>.md (per point, mean and sample std over its seeds; on the built-in data, what the parts carry) and
    <kind>.json (the chosen point), kind = ablation or grid. The chosen point has the best mean valid Recall@20
    among the points none of whose runs diverged (a loss that was not finite); a tie goes to the point listed
    first. Its test metrics are what the grid reports: nothing is chosen by test. Before anything runs, every run
    is checked against the data, and every run folder that holds a run must hold one of its settings on this data;
    a finished one is read back, an interrupted one resumed from its last.pt, so that a grid run again goes on."""
    kind = "grid" if cfg.train.grid else "ablation"
    out, runs, notes = grid_runs(cfg, grid_points(cfg.train.grid) if cfg.train.grid else ABLATIONS)
    device = resolve_device(cfg.train.device)
    ds = load(cfg, device, [(r.key, r.cfg) for r in runs if r.seed == cfg.train.seed])
    index = {}  # {point: its seeds}: what <kind>.json records, to tell this grid from another in the folder
    for r in runs:
        index.setdefault(r.key, []).append(r.seed)
    theirs = read_json(os.path.join(out, f"{kind}.json")).get("points")
    if theirs is not None and theirs != index:
        raise UsageError(f"{out}/ holds the tables of another {kind} ({', '.join(theirs)}); give this one another --out")
    for r in runs:
        same = same_run(r.folder, r.cfg, ds)
        if same is not True:
            raise UsageError(f"{r.folder}/ holds another run ({same}); delete it, or give the grid another --out")
    checked = []  # the fast paths against the plain code, once for each point's settings, before any run
    for r in runs:
        if not r.cfg.train.plain and r.cfg.sand not in checked:
            check_tiers(r.cfg.sand, ds, lambda *_: None)
            checked.append(r.cfg.sand)
    log(f"--{kind}: {len(index)} points x {cfg.train.seeds} seeds = {len(runs)} runs in {out}/")
    for note in notes:
        log(note)
    rows, diagnostics = [], {}
    with locked(out):
        for r in runs:
            results = read_json(os.path.join(r.folder, "results.json"))  # a finished run is read back
            results = results if {"best_epoch", "valid", "test", "diverged"} <= results.keys() else None
            if results is None:  # not yet run, or interrupted: then it goes on from its last.pt
                last = os.path.join(r.folder, "last.pt")
                resume = load_checkpoint(last) if os.path.isfile(last) else None
                results = fit(r.cfg, ds, device, r.folder, resume, log=lambda *_: None)[0]
            log(f"{r.key} seed {r.seed}: best epoch {results['best_epoch']}" + (", diverged" if results["diverged"] else "")
                + ", test " + " ".join(f"{m} {results['test'][m]:.4f}" if results["test"] else f"{m} -" for m in METRICS))
            rows.append({"point": r.key, "seed": r.seed, "best_epoch": results["best_epoch"], "diverged": results["diverged"],
                         **{f"{s}_{m}": results[s] and results[s][m] for s in ("valid", "test") for m in METRICS}})
            diagnostics.setdefault(r.key, []).append(results.get("diagnostic"))
        write_grid_tables(ds, device, kind, out, runs, index, rows, diagnostics, log)
    return rows


def write_grid_tables(ds, device, kind, out, runs, index, rows, diagnostics, log):
    columns = [f"{s}_{m}" for s in ("valid", "test") for m in METRICS]
    summary = []
    for point in {r.key: r for r in runs}.values():  # the first run of each point, in order
        mine = [row for row in rows if row["point"] == point.key]
        done = [row for row in mine if row["best_epoch"] is not None]
        summary.append({"point": point.key, "label": point.label, "settings": point.changes,
                        "diverged": sum(row["diverged"] for row in mine), "runs": [r.folder for r in runs if r.key == point.key],
                        "mean": {c: float(np.mean([row[c] for row in done])) for c in columns} if done else None,
                        "std": {c: float(np.std([row[c] for row in done], ddof=1)) if len(done) > 1 else 0.0 for c in columns},
                        "best_epoch": np.mean([row["best_epoch"] or 0 for row in mine]),
                        "diagnostics": [d for d in diagnostics[point.key] if d]})
    chosen = max([p for p in summary if not p["diverged"] and p["mean"]], key=lambda p: p["mean"]["valid_recall@20"],
                 default=None)  # max keeps the first of ties
    seeds, popular = sorted({r.seed for r in runs}), most_popular(ds, device)
    lines = [f"Valid and test metrics at the best valid epoch on `{ds.name}`, mean ± sample std over {len(seeds)} seeds "
             f"({seeds[0]}..{seeds[-1]}).", "", "| point | " + " | ".join(c.replace("_", " ") for c in columns)
             + " | best epoch |", "|---" * (len(columns) + 2) + "|"]
    for p in summary:
        mark = (" (chosen)" if p is chosen else "") + (f" (diverged in {p['diverged']} runs)" if p["diverged"] else "")
        lines.append(f"| {p['label']}{mark} | " + " | ".join(f"{p['mean'][c]:.4f} ± {p['std'][c]:.4f}" if p["mean"]
                                                              else "-" for c in columns) + f" | {p['best_epoch']:.0f} |")
    lines += ["| most popular (train counts, no training) | " + " | ".join(
        f"{popular[c.split('_')[0]][c.split('_')[1]]:.4f}" for c in columns) + " | |", "",
        f"Chosen by the best mean valid Recall@20: {chosen['label']}; its test metrics are the grid's result."
        if chosen else "No point finished without diverging: none is chosen."]
    lines += diagnostic_tables({p["label"]: p["diagnostics"] for p in summary if p["diagnostics"]})
    write_whole(os.path.join(out, f"{kind}.csv"), csv_text(rows))
    write_whole(os.path.join(out, f"{kind}.md"), "\n".join(lines) + "\n")
    write_whole(os.path.join(out, f"{kind}.json"), json_text({
        "points": index,
        "rule": "best mean valid recall@20 over the points with no diverged run; a tie goes to the point listed first",
        "chosen": chosen and {"point": chosen["point"], "settings": chosen["settings"], "runs": chosen["runs"],
                              **{s: {m: chosen["mean"][f"{s}_{m}"] for m in METRICS} for s in ("valid", "test")}}}))
    log("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Progress, timing, the command line

class Status:
    """The command line's progress line: on a terminal (main() turns it on), one line rewritten in place and cleared
    before each logged line; elsewhere (a log file, a pipe) nothing, so the output is one line per epoch."""
    on, width, shown_at, epoch_start = False, 0, -math.inf, None

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
        self.epoch_start = None if done == total else self.epoch_start

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
        self.device, self.sync, self.total, self.last = device, sync and device.type == "cuda", {}, time.perf_counter()

    def lap(self, name):
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.total[name], self.last = self.total.get(name, 0.0) + now - self.last, now


class Parser(argparse.ArgumentParser):
    def __init__(self, **kw):
        super().__init__(**kw)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)  # --lr -1e-3: a value

    def error(self, message):  # one line, as every other refusal (argparse prints its usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser():
    p = Parser(prog="train.py", description="Train SAND (Separate Alignment aNd Distancing) and report "
                                            "MMRec's Recall@10/20 and NDCG@10/20 at the best valid epoch.")
    variants = list(itertools.product(BACKBONES, ("mi", "l2", "none"), ("solo", "complete", "none")))
    for group, cls in (("training", TrainConfig), ("model (defaults: the authors' released code; a backbone's own where it "
                                                   "differs: the authors' VBPR+SAND and FREEDOM+SAND, MMRec's VBPR)",
                                                   SANDConfig)):
        g = p.add_argument_group(group)
        for f in dataclasses.fields(cls):  # default None: a flag left out takes its variant's default (make_config)
            readers = sorted({b for b, d, a in variants if f.name not in sand.unread(SANDConfig(b, d, a, dropout=0.5))},
                             key=BACKBONES.index) if cls is SANDConfig else BACKBONES
            text = f.metadata["help"] + (f" [--backbone {' or '.join(readers)} only]" if len(readers) < 3 else "")
            if f.type is bool:
                g.add_argument(flag(f.name), action="store_true", default=None, help=text)
            elif f.type is tuple:
                g.add_argument(flag(f.name), nargs="+", action="extend", help=text, metavar=f.metadata["metavar"])
            else:
                others = "".join(f"; --backbone {b}: {f.metadata[b]}" for b in BACKBONES if b in f.metadata)
                if "plain_vbpr" in f.metadata:
                    others += f"; plain VBPR (--backbone vbpr --dist none --align none): {f.metadata['plain_vbpr']}"
                g.add_argument(flag(f.name), type=f.type, help=text + (f" (default: {f.default}{others})" if f.default
                                                                       != "" else ""),
                               choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"))
    return p


def config_from_args(args):
    return make_config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if v is not None})


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
              "RUN, a --grid or --ablation by running it again)", file=sys.stderr)
        sys.exit(143 if INTERRUPTS.signal == signal.SIGTERM else 130)


if __name__ == "__main__":
    main()
