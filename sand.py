"""SAND: Separate Alignment aNd Distancing, for multimodal recommendation.

"Boosting Multimedia Recommendation via Separate Generic and Unique Awareness",
arXiv 2406.08270 (v2: "It is Never Too Late to Mend: Separate Learning for Multimedia
Recommendation"). Each item's modality representation is split into a generic half and a unique
half; the generic halves are aligned across modalities (SoloSimLoss) and each unique half is pushed
away from its generic half (a CLUB bound of their mutual information, or a negative L2 distance).
Equation numbers are those of the paper's v1, as the released code cites them.

Read it top to bottom:
  1. SANDConfig: every hyper-parameter with its default (the authors' released code) and each backbone's
     own default beside it; unread(): the settings a variant does not read.
  2. The graphs: the user-item LightGCN adjacency and propagation, the frozen item-item kNN graph,
     FREEDOM's edge pruning.
  3. The losses, each standalone, to copy into another model: bpr_loss, emb_loss, solo_sim_loss,
     neg_l2, CLUB with fit_club. Then sand_loss, SAND's whole objective for this project's models
     (it reads a SANDConfig and the modalities "text" and "image"):
         L = backbone's loss + alpha * SoloSim + (ureg * CLUB  or  w_l2 * negL2)
  4. The models, SAND on three backbones: SAND (the released backbone, MMRec's DRAGON without its
     user-user graph), VBPRSAND (the authors' VBPR+SAND, and VBPR) and FREEDOMSAND (FREEDOM+SAND, and
     FREEDOM); build_model.
  5. Fast paths, private to these models (not pieces to copy): each replaces one plain piece with the
     same mathematics in fewer operations. A model picks its tier where it calls the piece (`if
     self.fast:` beside the plain call; train.train_step picks the estimator's fit); tier_mismatch()
     checks the tiers against each other, and train.py runs that check before it trains on the fast
     tier, so that an edit to a plain piece is never silently ignored.
"""
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

MODALITIES = ("image", "text")  # fusion order, as released: [image | text]
BACKBONES = ("dragon", "vbpr", "freedom")


def option(default, help, **kw):
    """A dataclass field with its command-line help (train.py makes a flag of every field) and, in `kw`: for
    numbers, its range (min / max inclusive, above / below exclusive) and choices, which train.py checks; a
    backbone's own default (vbpr=..., freedom=...; plain_vbpr=... for VBPR without SAND's terms)."""
    return field(default=default, metadata={"help": help, **kw})


SIZE = 2 ** 20  # the largest layer width a flag may give (any more cannot fit in memory)


@dataclass
class SANDConfig:
    """SAND's hyper-parameters. Defaults reproduce the authors' released code, and beside each default is a
    backbone's own where it differs (VBPR+SAND: the authors' XVBPR.yaml; FREEDOM+SAND: their log and MMRec's
    FREEDOM.yaml). train.py turns every field into a command-line flag (--club-fit for club_fit, ...)."""
    backbone: str = option("dragon", "the recommender SAND is added to: dragon (MMRec's DRAGON without its user-user "
                           "graph, the released SAND), vbpr (the authors' VBPR+SAND) or freedom (FREEDOM+SAND, as the "
                           "authors' log shows it); VBPR or FREEDOM itself with --dist none --align none",
                           choices=BACKBONES)
    dist: str = option("mi", "distancing: mi (CLUB bound), l2 (negative L2) or none", choices=("mi", "l2", "none"),
                       vbpr="l2")
    align: str = option("solo", "alignment: solo (SoloSimLoss on the generic halves), complete (SoloSimLoss on the whole "
                        "of X_m, no split: the complete alignment the paper argues against) or none",
                        choices=("solo", "complete", "none"))
    club_fit: str = option("cross", "pairs the CLUB estimator is fitted on: cross = (a_text->a_image, "
                           "b_text->b_image) as released; intra = (a_m->b_m) as the paper describes",
                           choices=("cross", "intra"))
    alpha: float = option(0.012, "weight of SoloSimLoss", min=0, vbpr=0.1)
    ureg: float = option(0.006, "weight of the CLUB distancing term (--dist mi)", min=0)
    w_l2: float = option(0.01, "weight of the negative-L2 distancing term (--dist l2); the released SAND has these lines "
                         "commented out and unweighted, 0.01 is the authors' VBPR+SAND's explore_loss_coeff", min=0)
    tau: float = option(0.2, "SoloSimLoss temperature", above=0, vbpr=0.1)
    club_steps: int = option(50, "estimator steps per training batch (--dist mi)", min=0, max=10 ** 6)
    embed_dim: int = option(64, "embedding size: per modality on dragon; vbpr: of E_i and of X_m; freedom: of the "
                            "user and item embeddings and of X_m", min=1, max=SIZE)
    mlp_dim: int = option(256, "hidden size of the item feature MLP", min=1, max=SIZE)
    head_dim: int = option(64, "hidden size of the alignment projection head", min=1, max=SIZE, freedom=33)
    align_dim: int = option(32, "output size of the alignment projection head", min=1, max=SIZE, freedom=63)
    dist_dim: int = option(32, "size of the projected generic/unique parts used for distancing", min=1, max=SIZE)
    club_hidden: int = option(8, "hidden size of the CLUB estimator's mu and logvar networks", min=1, max=SIZE)
    n_layers: int = option(2, "LightGCN hops on the user-item graph", min=0, max=100)
    knn_k: int = option(10, "neighbours per item in the item-item graph", min=1, max=2 ** 31 - 1)
    image_weight: float = option(0.1, "image share of the item-item graph (text gets the rest)", min=0, max=1)
    reg_weight: float = option(0.0, "vbpr: weight of the embedding regulariser emb_loss; freedom: weight of the BPR "
                               "terms of the modality features (MMRec's reg_weight, both)", min=0, vbpr=2.0)
    dropout: float = option(0.0, "dropout on the user and item embeddings in training (the authors' VBPR+SAND uses "
                            "0.01, MMRec's plain VBPR none)", min=0, below=1, vbpr=0.01, plain_vbpr=0.0)
    eval_dropout: bool = option(False, "apply --dropout at evaluation too, a new mask at every evaluation, as the authors' "
                                "VBPR+SAND does (a noisy valid score, which prolongs early stopping; topk.tsv and "
                                "--eval-only draw masks of their own); drawn from torch's generator, seeded by --seed "
                                "and saved in checkpoints")
    edge_dropout: float = option(0.8, "share of the train edges that FREEDOM drops anew every epoch, by degree (MMRec's "
                                 "`dropout`); evaluation uses the whole graph", min=0, below=1)


def unread(cfg):
    """{setting: why} for each setting that this configuration's variant does not read, so that giving it
    would change nothing (train.py refuses such a flag, and runs a grid point that differs from another
    only in them once). The first reason that applies is given."""
    out = {}

    def no(names, why):
        for name in names.split():
            out.setdefault(name, why)
    if cfg.backbone != "dragon":
        no("mlp_dim dist_dim", "read only with --backbone dragon (its item MLP and distancing projections; the other "
                               "backbones distance the halves themselves)")
    if cfg.backbone == "vbpr":
        no("knn_k image_weight n_layers", "not read by --backbone vbpr (no graphs)")
    else:
        no("dropout eval_dropout", "read only with --backbone vbpr")
    if cfg.backbone == "dragon":
        no("reg_weight", "read only with --backbone vbpr or freedom")
    if cfg.backbone != "freedom":
        no("edge_dropout", "read only with --backbone freedom")
    if cfg.align == "none":
        no("alpha tau", "read only with --align solo or complete")
        if cfg.backbone != "vbpr" or cfg.dist == "none":  # VBPR scores its heads' z_m, aligned or not
            no("head_dim align_dim", "read only with --align solo or complete" if cfg.backbone != "vbpr" else
               "not read by plain VBPR (--dist none --align none)")
    if cfg.dist == "none":
        no("dist_dim", "read only with --dist mi or l2")
    if cfg.dist != "mi":
        no("ureg club_fit club_steps club_hidden", "read only with --dist mi")
    if cfg.dist != "l2":
        no("w_l2", "read only with --dist l2")
    if cfg.dropout == 0:
        no("eval_dropout", "read only with --dropout above 0")
    return out


# ---------------------------------------------------------------------------------------------
# 2. Graphs

def edge_values(train, n_users, n_items):
    """1/sqrt(d_u d_i) for each train interaction (u, i) [E, 2] -> [E]: its value in the LightGCN adjacency, with
    degrees counted over these interactions (a repeated pair counts as two edges, as in the released message
    passing)."""
    u, i = train[:, 0], train[:, 1] + n_users  # [E], [E]: items numbered after the users
    deg = torch.bincount(torch.cat([u, i]), minlength=n_users + n_items).float()  # [U+I]
    d_inv_sqrt = deg.clamp_min(1).rsqrt()  # [U+I]; every node of an edge has a degree of 1 or more
    return d_inv_sqrt[u] * d_inv_sqrt[i]


def lightgcn_adjacency(train, n_users, n_items):
    """A = D^-1/2 (R + R^T) D^-1/2 on the user-item graph (users first, then items), sparse CSR
    [U+I, U+I]. R holds the train interactions [E, 2]; no self loops; a node without edges has a zero row."""
    u, i = train[:, 0], train[:, 1] + n_users  # [E], [E]
    v = edge_values(train, n_users, n_items)  # [E]
    n = n_users + n_items
    adj = torch.sparse_coo_tensor(torch.stack([torch.cat([u, i]), torch.cat([i, u])]), torch.cat([v, v]), (n, n),
                                  check_invariants=False).coalesce()  # both directions
    return to_csr(adj)


def lightgcn(adj, h0, n_layers):
    """LightGCN propagation, layers summed as released: H0 + A H0 + A^2 H0 + ...  [N, D] -> [N, D]."""
    out, h = h0, h0
    for _ in range(n_layers):
        h = adj @ h  # [N, D]
        out = out + h
    return out


def knn_graph(feat, k, chunk=None):
    """S[i, j] = 1/k for the k items j with the highest cosine similarity of raw features to item i
    (i itself included; ties go to the lower index), as a sparse [I, I] matrix. Built in chunks of
    rows, so memory is O(chunk * I + I * k): no dense I x I matrix is ever formed."""
    x = F.normalize(feat, dim=1)  # [I, d]; an all-zero row stays zero (similarity 0 to all)
    n = x.shape[0]
    chunk = chunk or max(1, 2 ** 24 // n)  # 64 MiB of similarities: each block reads all of x, so few and large
    cols = torch.empty(n, k, dtype=torch.long, device=x.device)  # [I, k] the kept items of each row
    for lo in range(0, n, chunk):
        sim = x[lo:lo + chunk] @ x.T  # [c, I]
        kth = sim.topk(k, dim=1).values[:, -1:]  # [c, 1] the k-th largest similarity
        above, tied = sim > kth, sim == kth  # [c, I]
        room = k - above.sum(1, keepdim=True)  # [c, 1] places left for tied items
        keep = above | (tied & (tied.cumsum(1) <= room))  # [c, I], exactly k per row
        cols[lo:lo + chunk] = keep.nonzero()[:, 1].view(-1, k)  # row by row, in column order
    rows = torch.arange(n, device=x.device).repeat_interleave(k)  # [I k]
    cols = cols.flatten()  # [I k]
    values = torch.full(rows.shape, 1.0 / k, dtype=feat.dtype, device=feat.device)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=False).coalesce()


def item_graph(image, text, k, image_weight):
    """The frozen item-item graph S = w S_image + (1 - w) S_text, sparse CSR [I, I]."""
    s = image_weight * knn_graph(image, k) + (1 - image_weight) * knn_graph(text, k)
    return to_csr(s.coalesce())


def pruned_adjacency(train, weights, n_users, n_items, dropout, generator):
    """FREEDOM's degree-sensitive edge pruning (MMRec's pre_epoch_processing): keep int(E (1 - dropout)) of the E
    train edges [E, 2], drawn without replacement with probability proportional to `weights` [E] (each edge's
    1/sqrt(d_u d_i) in the whole graph, so edges between rarely seen nodes are kept more often), then the
    LightGCN adjacency of the kept edges alone."""
    keep = torch.multinomial(weights, int(len(weights) * (1 - dropout)), generator=generator)  # [E'] edge ids
    return lightgcn_adjacency(train[keep], n_users, n_items)


def to_csr(a):
    """A sparse COO matrix as CSR, without torch's notice that CSR support is in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return a.to_sparse_csr()


# ---------------------------------------------------------------------------------------------
# 3. Losses: each one standalone, to lift into another model

def check_inputs(who, *tensors):
    """Every piece's inputs: floating-point tensors of one dtype and device, none of them empty."""
    if not all(torch.is_tensor(t) and t.is_floating_point() for t in tensors):
        raise ValueError(f"{who}: the inputs must be floating-point tensors (got "
                         f"{', '.join(str(t.dtype) if torch.is_tensor(t) else type(t).__name__ for t in tensors)})")
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        raise ValueError(f"{who}: the inputs must share one dtype and device (got "
                         f"{', '.join(f'{t.dtype} on {t.device}' for t in tensors)})")
    if any(t.numel() == 0 for t in tensors):
        raise ValueError(f"{who}: an input is empty (shapes {', '.join(str(list(t.shape)) for t in tensors)})")


def bpr_loss(pos, neg, base=2):
    """BPR, -mean log sigmoid(s(u, i+) - s(u, i-)), [B], [B] -> scalar; log base 2 (the default) as the released
    SAND, base e as MMRec's BPRLoss (its VBPR) and FREEDOM. The authors' VBPR+SAND writes -log(1e-10 + sigmoid(x)):
    the same in float32 above a margin x of about -6, larger below (badly ranked pairs)."""
    check_inputs("bpr_loss", pos, neg)
    if pos.ndim != 1 or pos.shape != neg.shape:
        raise ValueError(f"bpr_loss: pos and neg must both be [B], one score per triple (got {list(pos.shape)} and "
                         f"{list(neg.shape)}); squeeze a [B, 1] scorer's output")
    if not (isinstance(base, (int, float)) and not isinstance(base, bool) and base > 0 and base != 1):
        raise ValueError(f"bpr_loss: base must be a number above 0 other than 1 (got {base!r}): 2 or math.e")
    return -F.logsigmoid(pos - neg).mean() / math.log(base)


def emb_loss(*rows):
    """MMRec's EmbLoss, VBPR's regulariser: the sum of the L2 (Frobenius) norms, not squared, of the
    batch's embedding rows [B, D] each, over the batch size B."""
    check_inputs("emb_loss", *rows)
    if not rows or any(r.ndim != 2 or len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"emb_loss: give the batch's rows, [B, D] each with one B (got shapes "
                         f"{', '.join(str(list(r.shape)) for r in rows) or 'none'})")
    return sum(r.norm() for r in rows) / rows[-1].shape[0]


def solo_sim_loss(anchor, other, tau):
    """SoloSimLoss (Eq. 10): InfoNCE in one direction over all N items, on L2-normalised projections
    of the generic parts; the text view anchors, as released:
        L = -1/N sum_i log( exp(t_i . v_i / tau) / sum_j exp(t_i . v_j / tau) )
    anchor, other: [N, D], row i of both the same item, rows L2-normalised; tau: a number above 0, or a
    one-element tensor. To learn the temperature, keep it positive by construction: a parameter log_tau and
    tau = log_tau.exp().clamp(min=0.01) (a raw learnable tau can cross 0, which is refused)."""
    check_views(anchor, other, tau)
    logits = anchor @ other.T / tau  # [N, N]
    return (logits.logsumexp(1) - logits.diagonal()).mean()


def check_views(anchor, other, tau):
    """SoloSimLoss scores anchor i against other i: both must hold the same N > 0 items, in the same order."""
    who = "solo_sim_loss"
    check_inputs(who, anchor, other)
    if anchor.ndim != 2 or anchor.shape != other.shape:
        raise ValueError(f"{who}: anchor and other must both be [N, D], row i of each the same item (got "
                         f"{list(anchor.shape)} and {list(other.shape)}); for a batch of B items, index both views "
                         f"with the batch's item ids")
    if not (torch.is_tensor(tau) and tau.is_floating_point() and tau.numel() == 1 or
            isinstance(tau, (int, float)) and not isinstance(tau, bool)):
        raise ValueError(f"{who}: tau must be one number above 0, or a one-element floating-point tensor (got {tau!r})")
    if torch.is_tensor(tau) and tau.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # reading the value would synchronise; it was checked when the step ran before capture
    value = tau.detach().item() if torch.is_tensor(tau) else tau
    if not value > 0:
        raise ValueError(f"{who}: tau must be above 0 (got {value}); a learnable one: tau = log_tau.exp().clamp(min=0.01)")


def neg_l2(a, b):
    """Negative-L2 distancing (Eq. 14): -mean (a - b)^2 over pairs a, b of one shape. Minimising it pushes a and b
    apart; it is unbounded below, so keep its weight small (w_l2), and use it only where the score does not
    grow with a and b (SAND's backbone normalises its graph input; an unnormalised one degrades)."""
    check_pairs("neg_l2", a, b, same_width=True)
    return -F.mse_loss(a, b)


def check_pairs(who, x, y, same_width=False, club=None):
    """Pairs x [..., N, D_x], y [..., N, D_y], row k of each the same item, N > 0; with `club`, of its widths."""
    check_inputs(who, x, y)
    if x.ndim < 2 or x.shape[:-1] != y.shape[:-1] or (same_width and x.shape != y.shape):
        raise ValueError(f"{who}: x and y must both be [..., N, D] with N > 0, row k of each the same item (got "
                         f"{list(x.shape)} and {list(y.shape)})")
    for net in (club.mu, club.logvar) if club is not None else ():  # its widths, where its Linear layers say them
        linears = [layer for layer in net.modules() if isinstance(layer, nn.Linear)
                   and not isinstance(layer.weight, nn.parameter.UninitializedParameter)]  # a LazyLinear: not yet
        if linears and (linears[0].in_features, linears[-1].out_features) != (x.shape[-1], y.shape[-1]):
            raise ValueError(f"{who}: the pairs are {x.shape[-1]} and {y.shape[-1]} wide, the estimator reads "
                             f"{linears[0].in_features} and gives {linears[-1].out_features}")


class CLUB(nn.Module):
    """CLUB, a sampled upper bound of the mutual information I(x; y) (Cheng et al., ICML 2020), SAND's
    distancing term (Eq. 13), with a variational q(y|x) = N(mu(x), exp(logvar(x))). The bound is, as released,
    half of Cheng et al.'s CLUBSample, clamped at 0:
        CLUBSample = 1/N sum_k [log q(y_k | x_k) - log q(y_pi(k) | x_k)]       (log q without its constant)
        bound      = max(0, CLUBSample / 2)                                      pi a random permutation
    (log_q below already carries the Gaussian's 1/2; the released code divides by 2 once more.) The model
    minimises the bound; q is fitted separately by maximum likelihood (fit_club), so the bound's gradient
    reaches x and y only, never q's parameters. x and y may differ in width: CLUB(x_dim, y_dim, hidden), as
    Cheng et al.'s CLUBSample(x_dim, y_dim, hidden_size), whose hidden layers are hidden_size // 2 wide (here:
    `hidden`)."""

    def __init__(self, x_dim, y_dim, hidden):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    @staticmethod
    def log_q(mu, logvar, y):
        """log N(y; mu, exp(logvar)) up to its constant, per row: [..., N, D] -> [..., N]."""
        return (-(mu - y) ** 2 / logvar.exp() / 2 - logvar / 2).sum(-1)

    def forward(self, x, y, perm):
        """x [..., N, x_dim], y [..., N, y_dim], perm [..., N] -> the bound of each set of N pairs [...]. A leading
        dimension holds independent sets (SAND: one per modality): one bound per set, so take .mean() (or a
        weighted sum) for a loss. perm holds positions 0..N-1 within each set (a random permutation:
        torch.randperm(N)), not item ids."""
        check_pairs("CLUB", x, y, club=self)
        if perm.shape != x.shape[:-1] or perm.dtype != torch.long:
            raise ValueError(f"CLUB: perm must be int64 of shape {list(x.shape[:-1])}, one position per pair "
                             f"(got {perm.dtype} {list(perm.shape)})")
        if not (perm.is_cuda and torch.cuda.is_current_stream_capturing()):  # a check would synchronise there
            lo, hi = torch.stack([perm.min(), perm.max()]).tolist()
            if not 0 <= lo <= hi < x.shape[-2]:
                raise ValueError(f"CLUB: perm holds {lo}..{hi}, but it must hold positions 0..{x.shape[-2] - 1} "
                                 f"within the {x.shape[-2]} pairs (not item ids)")
        # q's networks run on copies of its weights taken now, in the pairs' dtype (functional_call puts them in
        # place of the parameters): detached, so no gradient reaches q; copied (they are tiny), so that fitting q
        # before this bound's backward, by any optimizer, cannot change what the backward reads
        run = lambda net: torch.func.functional_call(
            net, {k: p.detach().to(x.dtype, copy=True) for k, p in net.named_parameters()}, (x,))
        mu, logvar = run(self.mu), run(self.logvar)  # [..., N, y_dim] each
        y_perm = y.gather(-2, perm[..., None].expand(y.shape))  # [..., N, y_dim]: row k holds y_pi(k)
        gap = self.log_q(mu, logvar, y) - self.log_q(mu, logvar, y_perm)  # [..., N]
        return (gap.mean(-1) / 2).clamp(min=0)  # [...]

    def nll(self, x, y):
        """The estimator's own loss: -mean_k log q(y_k | x_k) of each set of pairs, summed over the sets
        (x, y [..., N, D] -> scalar): SAND fits two sets at once, as the released trainer's
        `mi_loss + mi_loss1`."""
        return -self.log_q(self.mu(x), self.logvar(x), y).mean(-1).sum()


def check_estimator_optimizer(club, optimizer):
    """fit_club steps `optimizer`: it must hold the estimator's trainable parameters (some of them) and nothing
    else, and take a step without a closure."""
    own, held = {id(p) for p in club.parameters()}, [p for group in optimizer.param_groups for p in group["params"]]
    if any(id(p) not in own for p in held):
        raise ValueError("fit_club: the optimizer holds parameters that are not the estimator's, which its "
                         "steps would move; give the estimator its own, e.g. torch.optim.Adam(club.parameters())")
    if not any(p.requires_grad for p in held) or isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("fit_club: the optimizer must hold trainable estimator parameters and step without a closure "
                         "(not LBFGS), e.g. torch.optim.Adam(club.parameters())")


def fit_club(club, optimizer, x, y, steps):
    """Fit the estimator q by maximum likelihood: `steps` steps of `optimizer` on club.nll(x, y), the pairs
    detached (nothing reaches the model) and in q's own dtype, outside any autocast (whose cached low-precision
    weights would hold every step at the first's). SAND, as released, runs 50 steps per batch, after the model's
    backward and before the model's optimizer step. Returns the last step's loss, taken before its update (with
    no steps, as it stands): club.nll, the sum over the sets of each set's mean negative log-likelihood, without
    the Gaussian's constant. Every estimator gradient is None afterwards, so that no other optimizer holding
    them (a model's, with the CLUB as its submodule) moves it."""
    check_estimator_optimizer(club, optimizer)
    check_pairs("fit_club", x, y, club=club)
    if not hasattr(steps, "__index__") or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"fit_club: steps must be a whole number, 0 or more (got {steps!r})")
    dtype = next(club.parameters()).dtype
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        x, y = (t.detach().to(dtype).clone() if t.is_inference() else t.detach().to(dtype) for t in (x, y))
        for _ in range(steps):
            club.zero_grad(set_to_none=True)
            loss = club.nll(x, y)
            loss.backward()
            optimizer.step()
        club.zero_grad(set_to_none=True)
        if steps == 0:
            with torch.no_grad():
                loss = club.nll(x, y)
    return loss.detach()


def sand_loss(cfg, terms, aux, club, perms=None, fast=False):
    """SAND's total objective, as released, for this project's models: the backbone's own terms (BPR, a
    regulariser), then
        L = ... + alpha * SoloSim + (ureg * CLUB  or  w_l2 * negL2), the distancing averaged over modalities.
    cfg: a SANDConfig; terms: {name: value} of the backbone's loss; aux: per modality, named "text" and "image",
    {"z": [I, D] alignment views (rows L2-normalised), "a", "b": [I, K] distancing pairs}; perms [2, I]: the CLUB
    bound's permutations of the items, text's then image's (--dist mi; drawn from torch's global generator if not
    given); fast: SoloSimLoss by its fast path. Returns (loss, {term: value}, the (x, y) pairs [2, I, K] the CLUB
    estimator is fitted on, or None)."""
    if (cfg.align != "none" or cfg.dist != "none") and not {"text", "image"} <= set(aux):
        raise ValueError(f"sand_loss: aux must hold the modalities 'text' and 'image' (got {sorted(aux)}): SoloSimLoss "
                         f"anchors the text view on the image view; name your two modalities so")
    t, v = aux.get("text"), aux.get("image")
    terms, pairs = dict(terms), None
    if cfg.align != "none":  # solo: z_m from the generic half; complete: from the whole of X_m
        terms["solo"] = (_solo_sim_loss_fast if fast else solo_sim_loss)(t["z"], v["z"], cfg.tau)
    if cfg.dist == "mi":  # text first, then image, as released
        if perms is None:
            perms = torch.stack([torch.randperm(len(t["a"]), device=t["a"].device) for _ in (t, v)])  # [2, I]
        a, b = torch.stack([t["a"], v["a"]]), torch.stack([t["b"], v["b"]])  # [2, I, K] each
        terms["club"] = club(a, b, perms).mean()  # [2] -> mean over the modalities
        if cfg.club_fit == "cross":
            # as released: q(a_image | a_text) and q(b_image | b_text), pairs across the modalities, while the bound
            # reads q on the pairs within one (a_m, b_m). A q fitted on other pairs scores the true pairs no better
            # than shuffled ones, so this bound is almost always clamped at 0 (the README's results measure it).
            pairs = torch.stack([t["a"], t["b"]]), torch.stack([v["a"], v["b"]])
        else:  # intra: q(b_m | a_m), the pairs the bound is applied to (the paper)
            pairs = a, b
    elif cfg.dist == "l2":
        terms["neg_l2"] = (neg_l2(t["a"], t["b"]) + neg_l2(v["a"], v["b"])) / 2
    weight = {"bpr": 1.0, "reg": cfg.reg_weight, "solo": cfg.alpha, "club": cfg.ureg, "neg_l2": cfg.w_l2}
    loss = sum(weight[k] * value for k, value in terms.items())
    return loss, {k: value.detach() for k, value in terms.items()}, pairs


# ---------------------------------------------------------------------------------------------
# 4. The models

def projection_head(d_in, hidden, d_out):
    """The alignment head, as released: Linear BN ReLU Linear BN ReLU Linear (its output is L2-normalised)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def score(users, items, user, item=None):
    """The prediction of every model here, score(u, i) = users[u] . items[i], from the embeddings of its forward():
    user [B] and item [B] -> [B] (training's pairs); user [B] alone -> [B, I] (evaluation: every item).
    Rows by F.embedding, not users[user]: a gather's backward adds with atomics on CPU (not repeatable)."""
    u = F.embedding(user, users)  # [B, D]
    if item is None:
        return u @ items.T  # [B, I]
    return (u * F.embedding(item, items)).sum(1)  # [B]


class SAND(nn.Module):
    """SAND on its released backbone, MMRec's DRAGON without the user-user graph: a LightGCN per
    modality, fused with per-user modality weights and a frozen item-item graph. Per modality m with
    item features f_m [I, d_m]:
        X_m = Linear(d_m -> d_m)(f_m)                  feature transform (all items)
        g_m, u_m = X_m[:, :d_m/2], X_m[:, d_m/2:]      generic and unique halves (auxiliary losses only)
        item_m = Linear(256 -> 64)(LeakyReLU(Linear(d_m -> 256)(X_m)))
        R_m = LightGCN(normalise([P_m; item_m]))        P_m: learnable user preferences [U, 64]
    user = [w_u,image R_image[u] | w_u,text R_text[u]],  item = I0 + S I0 with I0 = [R_image[i] | R_text[i]],
    score = user . item. Alignment: SoloSim(z_text, z_image) with z_m = normalise(head_m(g_m)) (--align complete:
    head_m(X_m), no split, the complete alignment the paper argues against). Distancing on a_m = Linear(g_m),
    b_m = Linear(u_m): CLUB(a_m, b_m) or -MSE(a_m, b_m). `fast`: the fast paths where they apply (section 5)."""

    def __init__(self, cfg, n_users, features, adjacency, item_item, fast=True):
        super().__init__()
        self.cfg, self.n_users, self.fast = cfg, n_users, fast
        for m in MODALITIES:  # frozen raw features [I, d_m]; constants, not saved in checkpoints
            self.register_buffer(f"feat_{m}", features[m], persistent=False)
        self.register_buffer("adj", adjacency, persistent=False)  # sparse CSR [U+I, U+I]
        self.register_buffer("item_item", item_item, persistent=False)  # sparse CSR [I, I]
        self.transform, self.mlp_in, self.mlp_out = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.head, self.to_a, self.to_b = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.pref = nn.ParameterDict()
        for m in MODALITIES:
            d = features[m].shape[1]
            self.transform[m] = nn.Linear(d, d)
            self.mlp_in[m] = nn.Linear(d, cfg.mlp_dim)
            self.mlp_out[m] = nn.Linear(cfg.mlp_dim, cfg.embed_dim)
            self.pref[m] = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, cfg.embed_dim)))
            self.head[m] = projection_head(d if cfg.align == "complete" else d // 2, cfg.head_dim, cfg.align_dim)
            self.to_a[m] = nn.Linear(d // 2, cfg.dist_dim)
            self.to_b[m] = nn.Linear(d - d // 2, cfg.dist_dim)
        w = nn.init.xavier_normal_(torch.empty(n_users, len(MODALITIES), 1))  # as released
        self.user_weight = nn.Parameter(F.softmax(w, dim=1).squeeze(2))  # [U, 2], free after init

    def split(self, m):
        """The feature transform X_m = transform_m(f_m) [I, d] and its generic and unique halves
        g_m [I, d/2], u_m [I, d - d/2]."""
        x = self.transform[m](getattr(self, f"feat_{m}"))  # [I, d]
        return x, x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]

    def modality(self, m, parts):
        """One modality's item side: the graph input item_m [I, 64] and, if `parts`, what the auxiliary
        losses read: {"z": head_m(g_m) [I, 32] L2-normalised (alignment; --align complete: head_m(X_m)),
        "a": a_m, "b": b_m [I, 32] (distancing)}."""
        x, g, u = self.split(m)
        item = self.mlp_out[m](F.leaky_relu(self.mlp_in[m](x)))  # [I, 64]
        out = {}
        if parts and self.cfg.align != "none":
            out["z"] = F.normalize(self.head[m](x if self.cfg.align == "complete" else g), dim=1)  # [I, 32]
        if parts and self.cfg.dist != "none":
            out["a"], out["b"] = self.to_a[m](g), self.to_b[m](u)  # [I, 32] each
        return item, out

    def forward(self, parts=True):
        """-> users [U, 128], items [I, 128], and per modality the parts of `modality` (if `parts`)."""
        r, aux = {}, {}
        for m in MODALITIES:
            if self.fast:  # the same outputs, X_m never formed
                item, aux[m] = _composed_modality(self, m, parts)
            else:
                item, aux[m] = self.modality(m, parts)
            h0 = F.normalize(torch.cat([self.pref[m], item]), dim=1)  # [U+I, 64]
            r[m] = (_lightgcn_fast if self.fast else lightgcn)(self.adj, h0, self.cfg.n_layers)  # [U+I, 64]
        U = self.n_users
        users = torch.cat([self.user_weight[:, k, None] * r[m][:U] for k, m in enumerate(MODALITIES)], dim=1)  # [U, 128]
        items = torch.cat([r[m][U:] for m in MODALITIES], dim=1)  # [I, 128]
        items = items + self.item_item @ items  # [I, 128]: one hop on the frozen item-item graph
        return users, items, aux

    score = staticmethod(score)

    def new_epoch(self, generator):
        """Nothing is drawn per epoch on this backbone (FREEDOM prunes its graph here)."""

    @torch.no_grad()
    def parts(self):
        """The learned parts of every item, for the planted-factor diagnostic: per modality "<m> g", "<m> u"
        (the halves of X_m), "<m> z" (the alignment view) and "<m> a", "<m> b" (the distancing pairs),
        those that the variant trains. In eval mode (BatchNorm on its running statistics)."""
        out = {}
        for m in MODALITIES:
            aux = self.modality(m, parts=True)[1]  # the plain formulas, whatever the tier
            _, g, u = self.split(m)
            out.update({f"{m} g": g, f"{m} u": u, **{f"{m} {k}": v for k, v in aux.items()}})
        return out

    def loss(self, user, pos, neg, club, perms=None):
        """Training loss for one BPR batch: BPR (log base 2), then sand_loss. -> (loss, terms, CLUB pairs)"""
        users, items, aux = self(parts=True)
        bpr = bpr_loss(self.score(users, items, user, pos), self.score(users, items, user, neg))
        return sand_loss(self.cfg, {"bpr": bpr}, aux, club, perms, self.fast)


class VBPRSAND(nn.Module):
    """SAND on a VBPR backbone, the paper's generalisation experiment, as the authors' XVBPR
    (bruno686/MM_OOD, src/models/xvbpr.py). Per modality m with item features f_m [I, d_m], d = embed_dim:
        X_m = Linear(d_m -> d)(f_m),  g_m, u_m = X_m[:, :d/2], X_m[:, d/2:]     generic and unique halves
        z_m = normalise(head_m(g_m))   (--align complete: head_m(X_m))          head as SAND's, [I, 32]
    item = [E_i | z_text | z_image],  user = P_u,  score = user . item, dropout on both in training
    (--eval-dropout: at evaluation too, as the authors' code does).
    The generic halves reach the score through z_m; the unique halves feed only the distancing, which
    acts on the halves themselves (a_m = g_m, b_m = u_m). Loss: BPR (natural log, MMRec's BPRLoss) +
    reg_weight * emb_loss(batch rows) + sand_loss's terms. With --dist none --align none it is MMRec's
    plain VBPR: item = [E_i | Linear(d_text + d_image -> d)([f_text | f_image])]."""
    split = SAND.split  # X_m and its halves
    new_epoch = SAND.new_epoch
    score = staticmethod(score)

    def __init__(self, cfg, n_users, features, fast=True):
        super().__init__()
        self.cfg, self.n_users, self.fast, d = cfg, n_users, fast, cfg.embed_dim
        self.vbpr_only = cfg.dist == "none" and cfg.align == "none"  # MMRec's plain VBPR
        for m in MODALITIES:  # frozen raw features [I, d_m]; constants, not saved in checkpoints
            self.register_buffer(f"feat_{m}", features[m], persistent=False)
        n_items = features["text"].shape[0]
        width = d + (d if self.vbpr_only else 2 * cfg.align_dim)  # the score's dimension
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, width)))  # as released
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        if self.vbpr_only:
            self.features = nn.Linear(sum(f.shape[1] for f in features.values()), d)
        else:
            self.transform = nn.ModuleDict({m: nn.Linear(features[m].shape[1], d) for m in MODALITIES})
            head_in = d if cfg.align == "complete" else d // 2
            self.head = nn.ModuleDict({m: projection_head(head_in, cfg.head_dim, cfg.align_dim) for m in MODALITIES})
        for module in self.modules():  # MMRec's xavier_normal_initialization
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def views(self):
        """-> the items' feature part of the score [I, D - d] and, per modality, {"z", "a", "b"}."""
        aux = {}
        if self.vbpr_only:
            return self.features(torch.cat([self.feat_text, self.feat_image], dim=1)), aux  # [I, d]
        for m in MODALITIES:
            x, g, u = self.split(m)
            z = F.normalize(self.head[m](x if self.cfg.align == "complete" else g), dim=1)  # [I, 32]
            aux[m] = {"z": z, "a": g, "b": u}  # [I, 32], [I, d/2] x 2
        return torch.cat([aux["text"]["z"], aux["image"]["z"]], dim=1), aux  # [I, 64]: text first, as released

    def forward(self, parts=True):
        """-> users [U, D], items [I, D], and per modality {"z", "a", "b"} (whether or not `parts`: z is scored)."""
        feats, aux = self.views()
        items = torch.cat([self.item, feats], dim=1)  # [I, D]
        drop = lambda e: F.dropout(e, self.cfg.dropout, self.training or self.cfg.eval_dropout)  # --eval-dropout: as released
        return drop(self.user), drop(items), aux

    @torch.no_grad()
    def parts(self):
        """The learned parts of every item, for the planted-factor diagnostic: per modality "<m> g", "<m> u" (the
        halves, which are also the distancing pairs) and "<m> z" (the alignment view); plain VBPR: its feature map."""
        feats, aux = self.views()
        if self.vbpr_only:
            return {"features": feats}
        return {f"{m} {k}": aux[m][name] for m in MODALITIES for k, name in (("g", "a"), ("u", "b"), ("z", "z"))}

    def loss(self, user, pos, neg, club, perms=None):
        """Training loss for one BPR batch: BPR (natural log) + reg_weight * emb_loss, then sand_loss."""
        users, items, aux = self(parts=True)
        u, i, j = F.embedding(user, users), F.embedding(pos, items), F.embedding(neg, items)  # [B, D] each
        terms = {"bpr": bpr_loss((u * i).sum(1), (u * j).sum(1), base=math.e)}
        if self.cfg.reg_weight:
            terms["reg"] = emb_loss(u, i, j)
        return sand_loss(self.cfg, terms, aux, club, perms, self.fast)


class FREEDOMSAND(nn.Module):
    """SAND on FREEDOM (Zhou et al., "A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal
    Recommendation", MM 2023) as MMRec's FREEDOM (enoche/MMRec, src/models/freedom.py), with the alignment heads
    of the authors' XFREEDOM (their FREEDOM+SAND log: 32 -> 33 -> 33 -> 63). d = embed_dim:
        x_m = trs_m(F_m) [I, d],  g_m, u_m = x_m[:, :d/2], x_m[:, d/2:]     F_m the raw features, trainable
        H = mean(H0, A H0, ..., A^L H0),  H0 = [E_user; E_item]             LightGCN, layers averaged, not summed
        user = H[u],  item = H[i] + (S E_item)[i]                            S the frozen kNN item graph, one hop
    A drops a share `edge_dropout` of its train edges anew each epoch (new_epoch), by degree; evaluation uses the
    whole graph. Loss: BPR (natural log) + reg_weight * (BPR(user, x_text) + BPR(user, x_image)) + sand_loss's terms
    on the halves: z_m = normalise(head_m(g_m)), distancing on a_m = g_m, b_m = u_m. The features x_m reach the score
    only through reg_weight's terms, so at reg_weight 0 (the authors' setting) SAND's terms change no prediction."""
    def __init__(self, cfg, n_users, features, train, adjacency, item_item, fast=True):
        super().__init__()
        self.cfg, self.n_users, self.fast, d = cfg, n_users, fast, cfg.embed_dim
        n_items = features["text"].shape[0]
        self.register_buffer("adj", adjacency, persistent=False)  # sparse CSR [U+I, U+I]: the whole graph
        self.register_buffer("train_adj", adjacency, persistent=False)  # this epoch's pruned graph (new_epoch)
        self.register_buffer("item_item", item_item, persistent=False)  # sparse CSR [I, I]
        self.register_buffer("edges", train, persistent=False)  # [E, 2] the train interactions
        weights = None if train is None else edge_values(train, n_users, n_items)  # [E]: kept by these odds
        self.register_buffer("edge_weights", weights, persistent=False)
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.feat = nn.ParameterDict({m: nn.Parameter(features[m].clone()) for m in MODALITIES})  # trainable, as MMRec
        self.trs = nn.ModuleDict({m: nn.Linear(features[m].shape[1], d) for m in MODALITIES})  # torch's init, as MMRec
        if cfg.align != "none":  # SAND's modules last, so that FREEDOM's own initialisation is the same without them
            head_in = d if cfg.align == "complete" else d // 2
            self.head = nn.ModuleDict({m: projection_head(head_in, cfg.head_dim, cfg.align_dim) for m in MODALITIES})

    score = staticmethod(score)

    def new_epoch(self, generator):
        """This epoch's training graph: FREEDOM's degree-sensitive edge pruning, drawn from `generator`."""
        if self.cfg.edge_dropout > 0:
            self.train_adj = pruned_adjacency(self.edges, self.edge_weights, self.n_users, len(self.item),
                                              self.cfg.edge_dropout, generator)

    def split(self, m):
        """The modality projection x_m = trs_m(F_m) [I, d] and its generic and unique halves [I, d/2] each."""
        x = self.trs[m](self.feat[m])  # [I, d]
        return x, x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]

    def features(self):
        """Per modality {"x": x_m [I, d], "z": the alignment view [I, align_dim], "a": g_m, "b": u_m [I, d/2]}."""
        aux = {}
        for m in MODALITIES:
            x, g, u = self.split(m)
            aux[m] = {"x": x, "a": g, "b": u}
            if self.cfg.align != "none":
                aux[m]["z"] = F.normalize(self.head[m](x if self.cfg.align == "complete" else g), dim=1)
        return aux

    def forward(self, parts=True):
        """-> users [U, d], items [I, d], and (if `parts`) per modality the items' features of `features`."""
        adj = self.train_adj if self.training else self.adj
        h0 = torch.cat([self.user, self.item])  # [U+I, d]
        n = self.cfg.n_layers
        h = (_lightgcn_fast if self.fast else lightgcn)(adj, h0, n) / (n + 1)  # [U+I, d]: the mean of the layers
        items = h[self.n_users:] + self.item_item @ self.item  # [I, d]: plus one hop of the IDs on the item graph
        return h[:self.n_users], items, self.features() if parts else {}

    @torch.no_grad()
    def parts(self):
        """The learned parts of every item, for the planted-factor diagnostic: per modality "<m> g", "<m> u" (the
        halves of x_m, which are also the distancing pairs) and, with alignment, "<m> z"."""
        aux = self.features()
        return {f"{m} {k}": aux[m][name] for m in MODALITIES for k, name in (("g", "a"), ("u", "b"), ("z", "z"))
                if name in aux[m]}

    def loss(self, user, pos, neg, club, perms=None):
        """Training loss for one BPR batch: BPR (natural log) + reg_weight * the features' BPR, then sand_loss.
        At reg_weight 0 the features' BPR is left out: MMRec computes it times 0, whose gradient of 0 moves no
        weight under Adam either."""
        sand_terms = self.cfg.align != "none" or self.cfg.dist != "none"
        users, items, aux = self(parts=sand_terms or self.cfg.reg_weight > 0)
        u = F.embedding(user, users)  # [B, d]
        bpr = lambda rows: bpr_loss((u * F.embedding(pos, rows)).sum(1), (u * F.embedding(neg, rows)).sum(1), base=math.e)
        terms = {"bpr": bpr(items)}
        if self.cfg.reg_weight:
            terms["reg"] = bpr(aux["text"]["x"]) + bpr(aux["image"]["x"])
        return sand_loss(self.cfg, terms, aux, club, perms, self.fast)


def build_model(cfg, n_users, features, train=None, fast=True):
    """-> (the model of a configuration, its CLUB estimator), initialised from torch's global generator. features
    {modality: [I, d_m]}: the item-item graph is built on their device; train [E, 2]: the train interactions, from
    which the backbone's graphs are built (None: no graphs, for counting parameters on the meta device)."""
    pair_dim = cfg.dist_dim if cfg.backbone == "dragon" else cfg.embed_dim // 2  # the distancing pairs' width
    if cfg.backbone == "vbpr":
        model = VBPRSAND(cfg, n_users, features, fast)
    else:
        graphs = (None, None)
        if train is not None:
            graphs = (lightgcn_adjacency(train, n_users, len(features["text"])),
                      item_graph(features["image"], features["text"], cfg.knn_k, cfg.image_weight))
        model = (FREEDOMSAND(cfg, n_users, features, train, *graphs, fast) if cfg.backbone == "freedom"
                 else SAND(cfg, n_users, features, *graphs, fast))
    return model, CLUB(pair_dim, pair_dim, cfg.club_hidden)

# =============================================================================================
# 5. Fast paths, private to the models above. Each replaces one plain piece with the same mathematics in fewer
# operations (so the same numbers up to float rounding, not bit for bit: the estimator's 3,000 Adam steps per
# epoch amplify the difference, which is why its nll drifts between the tiers), and is handed only what these
# models build. Measured side by side with the plain piece at Baby's shapes (synthetic-baby) on 2 CPU cores,
# torch 2.13, forward and backward of one batch, best of 3 (an epoch is 60 batches); tier_mismatch() at the end
# checks each against its plain piece.

# Largest temporary [rows, n_items] block of _solo_sim_loss_fast and of evaluation scores, in float32
# elements, per device type. CPU: 4 MiB (blocks of 64 MiB were 1.5x to 1.7x slower, of 2 MiB or less
# slower too). GPU: 64 MiB, so that a product is a few large kernels rather than dozens of small ones.
CHUNK_ELEMENTS = {"cpu": 2 ** 20, "cuda": 2 ** 24}


def chunk_rows(n, device):
    """Rows per temporary [rows, n] block on `device` (see CHUNK_ELEMENTS)."""
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"]) // n)


def _composed_modality(model, m, parts):
    """SAND.modality without forming X_m [I, d]: every consumer of X_m = f_m W^T + c is linear, so, stacked into
    one weight V [k, d] (k = 256 + 64 + 32 + 32), the consumers read X_m V^T + e = f_m (V W)^T + (V c + e), which
    costs k d^2 + I d k multiply-adds instead of I d^2 + I d k: for Baby's 4096-d images, 7x fewer. Saves 2.6 s
    of 3.0 s per batch, both modalities forward and backward (155 s of a CPU epoch)."""
    W, c = model.transform[m].weight, model.transform[m].bias  # [d, d], [d]
    d, h = W.shape[0], W.shape[0] // 2  # g_m = X_m[:, :h], u_m = X_m[:, h:]
    consumers = {"item": (model.mlp_in[m], 0, d)}  # name: (Linear, first and last column of X_m it reads)
    if parts and model.cfg.align != "none":
        consumers["z"] = (model.head[m][0], 0, d if model.cfg.align == "complete" else h)
    if parts and model.cfg.dist != "none":
        consumers["a"] = (model.to_a[m], 0, h)
        consumers["b"] = (model.to_b[m], h, d)
    # all consumers as one [k, d] weight on X_m (zero outside the columns each reads)
    V = torch.cat([F.pad(lin.weight, (lo, d - hi)) for lin, lo, hi in consumers.values()])  # [k, d]
    e = torch.cat([lin.bias for lin, _, _ in consumers.values()])  # [k]
    y = torch.addmm(V @ c + e, getattr(model, f"feat_{m}"), (V @ W).T)  # [I, k] = X_m V^T + e
    out = dict(zip(consumers, y.split([lin.out_features for lin, _, _ in consumers.values()], dim=1)))
    item = model.mlp_out[m](F.leaky_relu(out.pop("item")))  # [I, 64]
    if "z" in out:
        out["z"] = F.normalize(model.head[m][1:](out["z"]), dim=1)  # [I, 32]: the head after its first Linear
    return item, out


class _SymmetricSparseMM(torch.autograd.Function):
    """A @ x for a constant symmetric sparse A: the gradient is A^T g = A g, one more sparse product
    (autograd's sparse backward transposes A on every call)."""

    @staticmethod
    def forward(ctx, a, x):
        ctx.a = a
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return None, _SymmetricSparseMM.apply(ctx.a, grad)


def _lightgcn_fast(adj, h0, n_layers):
    """lightgcn, for the symmetric A that a LightGCN adjacency D^-1/2 (R + R^T) D^-1/2 is: each hop's backward is
    a product with A itself. Saves 0.049 s of 0.063 s per propagation, of which a batch has one per modality (6 s
    of a CPU epoch)."""
    out, h = h0, h0
    for _ in range(n_layers):
        h = _SymmetricSparseMM.apply(adj, h)  # [N, D]
        out = out + h
    return out


def _solo_sim_loss_fast(anchor, other, tau):
    """solo_sim_loss with its gradient computed in the same pass as the loss, over row blocks of the logits: no
    N x N matrix is kept (at Clothing's 26,071 items, autograd holds several of 2.7 GB each). Saves 0.62 s of
    0.71 s per batch (37 s of a CPU epoch). tau is a number (the models' setting)."""
    return _InfoNCE.apply(anchor, other, tau)


class _InfoNCE(torch.autograd.Function):
    """With the logits l = (anchor/tau) other^T and P = softmax_rows(l), over row blocks of l:
        L = mean_i (logsumexp_j l_ij - l_ii)
        dL/danchor = (P other - other) / (N tau),  dL/dother = (P^T anchor/tau - anchor/tau) / N
    Each [chunk, N] block of logits is made once, in one reused buffer: one exp, three matmuls."""

    @staticmethod
    def forward(ctx, anchor, other, tau):
        a = anchor / tau  # [N, D]
        n = a.shape[0]
        chunk = chunk_rows(n, a.device)  # rows per [chunk, N] block of logits
        grads = any(ctx.needs_input_grad[:2])
        lse = torch.empty(n, dtype=a.dtype, device=a.device)  # [N] logsumexp of each row of l
        p_other, p_t_a = torch.empty_like(a), torch.zeros_like(other)  # P other, P^T a: [N, D]
        block = a.new_empty(min(chunk, n), n)  # one buffer for every block: no new memory per chunk
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            e = torch.mm(a[lo:hi], other.T, out=block[:hi - lo])  # [c, N] logits
            top = e.amax(1, keepdim=True)  # [c, 1]
            total = e.sub_(top).exp_().sum(1, keepdim=True)  # [c, 1]; e is now exp(l - top)
            lse[lo:hi] = (total.log() + top)[:, 0]
            if grads:  # P = e / total, the division moved onto the [c, D] sides of the products
                p_other[lo:hi] = e @ other / total
                p_t_a.addmm_(e.T, a[lo:hi] / total)
        if grads:
            ctx.save_for_backward((p_other - other) / (n * tau), (p_t_a - a) / n)
        return (lse - (a * other).sum(1)).mean()

    @staticmethod
    def backward(ctx, grad):
        d_anchor, d_other = ctx.saved_tensors
        return d_anchor * grad, d_other * grad, None


def _fit_club_fast(club, optimizer, x, y, steps):
    """fit_club for the models' CLUB, with the nll's gradient written out, both first layers in one matmul: a third
    of autograd's kernels. Saves 0.15 s of 0.32 s per batch's 50 steps (9 s of a CPU epoch). Per step, with
    r = mu - y, e = exp(-logvar) and N pairs per set,
        nll = 1/N sum (r^2 e + logvar) / 2,  dnll/dmu = r e / N,  dnll/dlogvar = (1 - r^2 e) / (2N),
    then back through tanh, Linear, ReLU, Linear."""
    if steps == 0:
        return fit_club(club, optimizer, x, y, steps)
    n = x.shape[-2]  # pairs per set: the nll is a sum over the sets of their means
    x, y = x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])  # [S N, D]: sets stacked
    weights = [p for lin in (club.mu[0], club.mu[2], club.logvar[0], club.logvar[2]) for p in (lin.weight, lin.bias)]
    w1, b1, w2, b2, w3, b3, w4, b4 = weights
    hid = w1.shape[0]
    one, half = x.new_ones(()), x.new_full((), 0.5)
    for _ in range(steps):
        with torch.no_grad():
            h = torch.addmm(torch.cat([b1, b3]), x, torch.cat([w1, w3]).T).relu_()  # [M, 2 hid]: both hidden layers
            h_mu, h_lv = h[:, :hid], h[:, hid:]
            r = torch.addmm(b2, h_mu, w2.T).sub_(y)  # [M, D]: mu - y
            logvar = torch.addmm(b4, h_lv, w4.T).tanh_()  # [M, D]
            re = logvar.neg().exp_().mul_(r)  # [M, D]: r e = N dnll/dmu
            g_lv = torch.addcmul(one, r, re, value=-1)  # [M, D]: 1 - r^2 e
            g_lv.mul_(torch.addcmul(half, logvar, logvar, value=-0.5))  # times (1 - logvar^2) / 2: N dnll/d(pre-tanh)
            g_h = torch.cat([re @ w2, g_lv @ w4], dim=1).mul_(h > 0)  # [M, 2 hid]
            # weight gradients as (b^T a)^T rather than a^T b: the same sums, several times faster on CPU here
            g_w13 = (x.T @ g_h).T / n  # [2 hid, D]
            grads = (g_w13[:hid], g_h[:, :hid].sum(0) / n, (h_mu.T @ re).T / n, re.sum(0) / n,
                     g_w13[hid:], g_h[:, hid:].sum(0) / n, (h_lv.T @ g_lv).T / n, g_lv.sum(0) / n)
        for p, g in zip(weights, grads):
            p.grad = g.contiguous()  # the parameter's layout, as autograd gives it
        optimizer.step()
    club.zero_grad(set_to_none=True)
    return (r * re + logvar).sum() / (2 * n)  # the last step's nll (before its update)


def tier_mismatch(cfg, widths, run_items=40, n_users=30, n_items=40):
    """Does each fast path compute what the plain piece it replaces computes, as they stand now? In float64, on a
    random instance of configuration `cfg`: the pieces that it runs, each plain against fast on the same inputs
    (outputs and every gradient): the estimator's fit (its --club-steps steps) and SoloSimLoss, each on as
    many pairs as the run's `run_items` items give, up to 2,048, and the propagation (--n-layers hops); then, on a
    model of the run's feature widths {modality: d_m} with n_users users and n_items items, the whole loss and every
    gradient, and the scores at evaluation, with either tier. -> None if all agree to within float64 rounding, else
    one line that names the first piece that differs. An edit that acts only on more items than these is not seen.
    train.py runs it before it trains on the fast tier, so that an edit to a plain piece never goes silently unused;
    the tests run it on every variant."""
    cfg = dataclasses.replace(cfg, knn_k=min(cfg.knn_k, n_items))  # the graphs are built alike in either tier
    with torch.random.fork_rng(devices=[]):  # torch's global generator is left as it was
        torch.manual_seed(0)
        features = {m: torch.randn(n_items, widths[m], dtype=torch.float64) for m in MODALITIES}
        train = torch.stack([torch.arange(n_users).repeat(3), torch.randint(n_items, (3 * n_users,))], 1)  # [3U, 2]
        model, club = build_model(cfg, n_users, features, train, fast=False)
        model, club = model.double(), club.double()
        with torch.no_grad():  # q off its trivial start, so that the bound is not clamped at 0
            for p in club.parameters():
                p.add_(0.3 * torch.randn_like(p))
        user, pos, neg = train[:, 0], train[:, 1], torch.randint(n_items, (len(train),))
        perms = torch.stack([torch.randperm(n_items) for _ in MODALITIES])  # [2, I]
        params, state = [p for p in model.parameters()], copy.deepcopy(model.state_dict())
        h0 = torch.randn(n_users + n_items, 8, dtype=torch.float64, requires_grad=True)
        views = [F.normalize(torch.randn(min(run_items, 2048), 8, dtype=torch.float64), dim=1).requires_grad_()
                 for _ in range(2)]
        pairs = [torch.randn(2, min(run_items, 2048), club.mu[0].in_features, dtype=torch.float64) for _ in range(2)]
        pairs[1] = pairs[1] + pairs[0]  # dependent, so that the fit moves

        def grads(out, inputs):  # the outputs, and the gradients of a fixed random mix of them
            mix = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(k), dtype=o.dtype)).sum()
                      for k, o in enumerate(out))
            return list(out) + list(torch.autograd.grad(mix, inputs, allow_unused=True))

        def fit(f):
            q = copy.deepcopy(club)
            nll = f(q, torch.optim.Adam(q.parameters(), lr=1e-2), *pairs, cfg.club_steps)
            return [nll] + [p.detach() for p in q.parameters()]

        def whole(fast):
            model.fast = fast
            model.load_state_dict(state)  # the same BatchNorm statistics, which a training forward moves
            torch.manual_seed(1)  # the same dropout masks (VBPR) in either tier
            model.train()
            loss, terms, _ = model.loss(user, pos, neg, club, perms)
            out = grads([loss, *terms.values()], params)
            model.eval()
            with torch.no_grad():
                out.append(model.score(*model(parts=False)[:2], torch.arange(n_users)))  # evaluation's scores
            return out

        def modality(fast):  # with and without the parts that training reads
            out = [_composed_modality(model, m, parts) if fast else model.modality(m, parts)
                   for m in MODALITIES for parts in (True, False)]
            return grads([t for item, aux in out for t in (item, *aux.values())], params)
        name = type(model).__name__
        checks = []  # (plain piece, its fast path, the outputs of either), in the order the model runs them
        if cfg.backbone != "vbpr":
            checks.append(("lightgcn", "_lightgcn_fast", lambda fast: grads(
                [(_lightgcn_fast if fast else lightgcn)(model.adj, h0, cfg.n_layers)], [h0])))
        if cfg.align != "none":
            checks.append(("solo_sim_loss", "_solo_sim_loss_fast",
                           lambda fast: grads([(_solo_sim_loss_fast if fast else solo_sim_loss)(*views, cfg.tau)], views)))
        if cfg.dist == "mi":
            checks.append(("fit_club", "_fit_club_fast", lambda fast: fit(_fit_club_fast if fast else fit_club)))
        checks.append((name, f"{name}'s `if self.fast` branches (its loss, gradients and scores)", whole))
        for plain, fast, run in checks:
            why = _differ(plain, fast, run)
            if why and cfg.backbone == "dragon" and run is whole:  # name the piece if it is the feature transform's
                why = _differ("SAND.modality", "_composed_modality", modality) or why
            if why:
                return why
    return None


def _differ(plain, fast, run):
    """None if run(False) and run(True) give the same tensors to within float64 rounding, else why not, in a line."""
    out = []
    for tier, name in ((False, plain), (True, fast)):
        try:
            out.append(run(tier))
        except Exception as e:
            return (f"sand.py's {name} fails on a random instance of this "
                    f"configuration ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}): "
                    f"fix it" + (", or run train.py with --plain" if tier else ""))
    out = [[t if t is None else t.detach() for t in ts] for ts in out]
    scale = max([float(b.abs().max()) for b in out[0] if b is not None and b.numel()] + [1e-300])
    for a, b in zip(*out):
        if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or
                                                             float((a - b).abs().max()) > 1e-9 * scale)):
            off = "" if a is None or b is None or a.shape != b.shape else f" by {float((a - b).abs().max()) / scale:.1e} of its scale"
            return (f"sand.py's {plain} and its fast path {fast} no longer compute the same on a random instance of "
                    f"this configuration (an output or gradient differs{off}): run train.py with --plain, or bring "
                    f"the fast path in line with {plain}")
    return None
