"""SAND: Separate Alignment aNd Distancing, for multimodal recommendation.

"Boosting Multimedia Recommendation via Separate Generic and Unique Awareness",
arXiv 2406.08270 (v2: "It is Never Too Late to Mend: Separate Learning for Multimedia
Recommendation"). Each item's modality representation is split into a generic half and a unique
half; the generic halves are aligned across modalities (SoloSimLoss) and each unique half is pushed
away from its generic half (a CLUB bound of their mutual information, or a negative L2 distance).

Read top to bottom:
  1. SANDConfig: every hyper-parameter and its default (the authors' released code).
  2. The graphs: the user-item LightGCN adjacency, the frozen item-item kNN graph.
  3. The losses, each standalone: bpr_loss, solo_sim_loss, CLUB (+ fit_club), neg_l2.
  4. The model: feature transforms, generic/unique split, modality graph encoders, fusion.
"""
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
MODALITIES = ("image", "text")  # fusion order, as released: [image | text]
# Largest temporary [rows, n_items] block of SoloSimLoss and of evaluation scores, in float32
# elements, per device type. CPU: 4 MiB; blocks of 64 MiB made SoloSimLoss 1.5x to 1.7x slower at
# Baby's and Clothing's sizes, blocks of 2 MiB or less were slower too. GPU: 64 MiB, so that a
# product is a few large kernels rather than dozens of small ones.
CHUNK_ELEMENTS = {"cpu": 2 ** 20, "cuda": 2 ** 24}


def chunk_rows(n, device):
    """Rows per temporary [rows, n] block on `device` (see CHUNK_ELEMENTS)."""
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"]) // n)


def option(default, help, **kw):
    """A dataclass field with its command-line help (train.py makes a flag of every field) and, for
    numbers, its range: min / max (inclusive) or above (exclusive), which train.py checks."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SANDConfig:
    """SAND's hyper-parameters. Defaults reproduce the authors' released code; train.py turns every
    field into a command-line flag (--club-fit for club_fit, ...)."""
    dist: str = option("mi", "distancing: mi (CLUB bound), l2 (negative L2) or none", choices=("mi", "l2", "none"))
    align: str = option("solo", "alignment of the generic parts: solo (SoloSimLoss) or none", choices=("solo", "none"))
    club_fit: str = option("cross", "pairs the CLUB estimator is fitted on: cross = (a_text->a_image, "
                           "b_text->b_image) as released; intra = (a_m->b_m) as the paper describes",
                           choices=("cross", "intra"))
    alpha: float = option(0.012, "weight of SoloSimLoss", min=0)
    ureg: float = option(0.006, "weight of the CLUB distancing term (--dist mi)", min=0)
    w_l2: float = option(0.01, "weight of the negative-L2 distancing term (--dist l2)", min=0)
    tau: float = option(0.2, "SoloSimLoss temperature", above=0)
    club_steps: int = option(50, "estimator steps per training batch (--dist mi)", min=0)
    embed_dim: int = option(64, "per-modality graph embedding size", min=1)
    mlp_dim: int = option(256, "hidden size of the item feature MLP", min=1)
    head_dim: int = option(64, "hidden size of the alignment projection head", min=1)
    align_dim: int = option(32, "output size of the alignment projection head", min=1)
    dist_dim: int = option(32, "size of the projected generic/unique parts used for distancing", min=1)
    club_hidden: int = option(8, "hidden size of the CLUB estimator's mu and logvar networks", min=1)
    n_layers: int = option(2, "LightGCN hops on the user-item graph", min=0)
    knn_k: int = option(10, "neighbours per item in the item-item graph", min=1)
    image_weight: float = option(0.1, "image share of the item-item graph (text gets the rest)", min=0, max=1)


# ---------------------------------------------------------------------------------------------
# Graphs

def lightgcn_adjacency(train, n_users, n_items):
    """A = D^-1/2 (R + R^T) D^-1/2 on the user-item graph (users first, then items), sparse CSR
    [U+I, U+I]. R holds the train interactions; degrees count them (a repeated pair counts as two
    edges, as in the released message passing); no self loops; a node without edges gets a zero row.
    """
    u, i = train[:, 0], train[:, 1] + n_users  # [E], [E]
    rows, cols = torch.cat([u, i]), torch.cat([i, u])  # [2E]: both directions
    n = n_users + n_items
    deg = torch.bincount(rows, minlength=n).float()  # [U+I]
    d_inv_sqrt = torch.where(deg > 0, deg.clamp_min(1).rsqrt(), torch.zeros_like(deg))
    values = d_inv_sqrt[rows] * d_inv_sqrt[cols]
    adj = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=False).coalesce()
    return adj.to_sparse_csr()


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
    return s.coalesce().to_sparse_csr()


class _SparseMM(torch.autograd.Function):
    """A @ x for a constant sparse A, with A^T given: the gradient is A^T g, one more sparse product
    (torch's generic sparse backward transposes A on every call, several times slower)."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.a_t @ grad


def lightgcn(adj, h0, n_layers):
    """LightGCN propagation, layers summed as released: H0 + A H0 + A^2 H0 + ... [N, D]."""
    out, h = h0, h0
    for _ in range(n_layers):
        h = _SparseMM.apply(adj, adj, h)  # [N, D]; A is symmetric: A^T = A
        out = out + h
    return out


# ---------------------------------------------------------------------------------------------
# Losses: each one standalone, to lift into another model

def bpr_loss(pos, neg):
    """BPR with log base 2, as released: -mean log2 sigmoid(s(u, i+) - s(u, i-))."""
    return -F.logsigmoid(pos - neg).mean() / math.log(2)


def solo_sim_loss(anchor, other, tau):
    """SoloSimLoss (paper v1, Eq. 10): InfoNCE in one direction over all N items, on L2-normalised
    projections of the generic parts; the text view anchors, as released:
        L = -1/N sum_i log( exp(t_i . v_i / tau) / sum_j exp(t_i . v_j / tau) )
    anchor, other: [N, D], rows L2-normalised. In plain torch this is
        logits = anchor @ other.T / tau;  (logits.logsumexp(1) - logits.diagonal()).mean()
    computed here by _InfoNCE in row chunks, so that no N x N matrix is ever kept."""
    return _InfoNCE.apply(anchor, other, tau)


class _InfoNCE(torch.autograd.Function):
    """solo_sim_loss with its gradient written out and computed in the same pass over row chunks of
    the logits l = (anchor/tau) other^T as the loss:
        dL/dl = (P - I) / N,  P = softmax_rows(l)
        dL/danchor = (P other - other) / (N tau),  dL/dother = (P^T anchor/tau - anchor/tau) / N
    Each [chunk, N] block of logits is made once: one exp and three matmuls per chunk, where
    autograd keeps several N x N buffers and a separate backward would make every block again."""

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


def neg_l2(a, b):
    """Negative-L2 distancing (paper v1, Eq. 14): -mean (a - b)^2. Minimising it pushes a and b apart;
    it is unbounded below, so keep its weight small (w_l2)."""
    return -F.mse_loss(a, b)


class CLUB(nn.Module):
    """CLUB, a sampled upper bound of the mutual information I(x; y) (Cheng et al., ICML 2020),
    SAND's distancing term (paper v1, Eq. 13). A variational q(y|x) = N(mu(x), exp(logvar(x))):
        bound = max(0, 1/(2N) sum_k [log q(y_k | x_k) - log q(y_pi(k) | x_k)]),  pi a permutation.
    The model minimises the bound; q is fitted separately by maximum likelihood (fit_club), so the
    bound's gradient reaches x and y only, never q's parameters."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.logvar = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Tanh())

    def weights(self):
        """[w1, b1, w2, b2] of mu's Linears, then [w3, b3, w4, b4] of logvar's."""
        return [p for lin in (self.mu[0], self.mu[2], self.logvar[0], self.logvar[2]) for p in (lin.weight, lin.bias)]

    @staticmethod
    def log_q(mu, logvar, y):
        """log N(y; mu, exp(logvar)) up to its constant, per row: [N, D] -> [N]."""
        return (-(mu - y) ** 2 / logvar.exp() / 2 - logvar / 2).sum(dim=1)

    def forward(self, x, y, perm):
        """x, y [..., N, D], perm [..., N] -> the bound of each set of N pairs [...]. A leading dimension
        runs independent sets (SAND: one per modality) through one pass. In plain torch, per set:
            mu, logvar = self.mu(x), self.logvar(x)
            clamp((log_q(mu, logvar, y) - log_q(mu, logvar, y[perm])).mean() / 2, min=0)
        computed by _CLUBBound, with its gradient written out."""
        return _CLUBBound.apply(x, y, perm, *[w.detach() for w in self.weights()])

    def nll(self, x, y):
        """The estimator's own training loss: -mean log q(y|x)."""
        return -self.log_q(self.mu(x), self.logvar(x), y).mean()


def _club_networks(x, w1, b1, w2, b2, w3, b3, w4, b4):
    """CLUB's mu and logvar networks on x [M, D], both first layers in one matmul
    -> h [M, 2 hid] (the hidden layers after ReLU: mu's, then logvar's), mu [M, D], logvar [M, D]."""
    hid = w1.shape[0]
    h = torch.addmm(torch.cat([b1, b3]), x, torch.cat([w1, w3]).T).relu_()  # [M, 2 hid]
    mu = torch.addmm(b2, h[:, :hid], w2.T)  # [M, D]
    logvar = torch.addmm(b4, h[:, hid:], w4.T).tanh_()  # [M, D]
    return h, mu, logvar


class _CLUBBound(torch.autograd.Function):
    """CLUB.forward with its gradient written out, for x and y (q's weights are constants here). The
    log-variances of the two log-likelihoods cancel, so with r = mu - y, r' = mu - y_pi, e = exp(-logvar),
    per set:  S = sum_k,d (r'^2 - r^2) e,  bound = max(0, S / (4N)), and where S >= 0:
        dbound/dmu = (r' - r) e / (2N),  dbound/dy = r e / (2N),  dbound/dy_pi = -r' e / (2N),
        dbound/dlogvar = -(r'^2 - r^2) e / (4N),  then back through tanh, Linear, ReLU, Linear to x.
    A third of the operators that autograd runs for the plain formula (CLUB.forward's docstring)."""

    @staticmethod
    def forward(ctx, x, y, perm, *weights):
        n, d = y.shape[-2:]
        h, mu, logvar = _club_networks(x.reshape(-1, d), *weights)  # [S N, 2 hid], [S N, D] x 2
        mu, logvar = mu.view(y.shape), logvar.view(y.shape)  # [..., N, D]
        e = logvar.neg().exp_()  # [..., N, D]
        index = perm[..., None].expand(y.shape)  # [..., N, D]
        r, r_pi = mu - y, mu - y.gather(-2, index)  # [..., N, D]
        q = (r_pi * r_pi - r * r).mul_(e)  # [..., N, D]
        total = q.sum((-2, -1))  # [...]: S
        ctx.save_for_backward(h, logvar, e, r, r_pi, q, index, total, *weights[::2])  # weights, not biases
        return total.clamp(min=0) / (4 * n)

    @staticmethod
    def backward(ctx, grad):
        h, logvar, e, r, r_pi, q, index, total, w1, w2, w3, w4 = ctx.saved_tensors
        n, d = r.shape[-2:]
        c = (grad * (total >= 0) / (2 * n))[..., None, None]  # [..., 1, 1]; clamp's gradient passes at 0
        re, re_pi = r * e * c, r_pi * e * c  # [..., N, D]
        g_y = re.scatter_add(-2, index, -re_pi)  # [..., N, D]: r e, and -r' e at row pi(k)
        g_pre = q.mul(c).mul_(torch.addcmul(logvar.new_full((), -0.5), logvar, logvar, value=0.5))  # before tanh
        g_h = torch.cat([(re_pi - re).view(-1, d) @ w2, g_pre.view(-1, d) @ w4], dim=1).mul_(h > 0)  # [S N, 2 hid]
        g_x = (g_h @ torch.cat([w1, w3])).view(r.shape)  # [..., N, D]
        return g_x, g_y, None, *[None] * 8


def fit_club(club, optimizer, x, y, steps):
    """`steps` optimizer steps of CLUB.nll(x, y) on detached pairs; returns the last step's loss (for no
    steps, the loss as it stands).
    The same as `loss = club.nll(x, y); loss.backward(); optimizer.step()` per step (test_sand.py
    checks it), with the gradient written out, which needs a third of autograd's kernels:
        r = mu - y,  e = exp(-logvar),  nll = 1/N sum (r^2 e + logvar) / 2
        dnll/dmu = r e / N,  dnll/dlogvar = (1 - r^2 e) / (2N),  then back through tanh, Linear, ReLU, Linear."""
    x, y = x.detach(), y.detach()
    if steps == 0:  # no step: the estimator's nll as it stands
        with torch.no_grad():
            return club.nll(x, y)
    weights = club.weights()
    w2, w4 = weights[2], weights[6]  # the second layers' weights [D, hid], for the backward
    n, hid = x.shape[0], w2.shape[1]
    one, half = x.new_ones(()), x.new_full((), 0.5)
    for _ in range(steps):
        with torch.no_grad():
            h, mu, logvar = _club_networks(x, *weights)  # [N, 2 hid], [N, D], [N, D]
            h_mu, h_lv = h[:, :hid], h[:, hid:]
            r = mu.sub_(y)  # [N, D]: mu - y
            re = logvar.neg().exp_().mul_(r)  # [N, D]: r e = N dnll/dmu
            g_lv = torch.addcmul(one, r, re, value=-1)  # [N, D]: 1 - r^2 e
            g_lv.mul_(torch.addcmul(half, logvar, logvar, value=-0.5))  # times (1 - logvar^2) / 2: N dnll/d(pre-tanh)
            g_h = torch.cat([re @ w2, g_lv @ w4], dim=1).mul_(h > 0)  # [N, 2 hid]
            # weight gradients as (b^T a)^T rather than a^T b: the same sums, several times faster on CPU here
            g_w13 = (x.T @ g_h).T / n  # [2 hid, D]
            grads = (g_w13[:hid], g_h[:, :hid].sum(0) / n, (h_mu.T @ re).T / n, re.sum(0) / n,
                     g_w13[hid:], g_h[:, hid:].sum(0) / n, (h_lv.T @ g_lv).T / n, g_lv.sum(0) / n)
        for p, g in zip(weights, grads):
            p.grad = g.contiguous()  # the parameter's layout, as autograd gives it
        optimizer.step()
    return ((r * re + logvar).sum(1) / 2).mean()  # the last step's nll (before its update)


# ---------------------------------------------------------------------------------------------
# The model

class ProjectionHead(nn.Module):
    """The alignment head, as released: Linear BN ReLU Linear BN ReLU Linear, then L2-normalise.
    Its first Linear is kept apart so that SAND can compose it with the feature transform."""

    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.first = nn.Linear(d_in, hidden)
        self.rest = nn.Sequential(nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.after_first(self.first(x))

    def after_first(self, pre):
        return F.normalize(self.rest(pre), dim=1)


class SAND(nn.Module):
    """SAND on a LightGCN backbone, as released. Per modality m with item features f_m [I, d_m]:
        X_m = Linear(d_m -> d_m)(f_m)                  feature transform (all items)
        g_m, u_m = X_m[:, :d_m/2], X_m[:, d_m/2:]      generic and unique halves (auxiliary losses only)
        item_m = Linear(256 -> 64)(LeakyReLU(Linear(d_m -> 256)(X_m)))
        R_m = LightGCN(normalise([P_m; item_m]))        P_m: learnable user preferences [U, 64]
    user = [w_u,image R_image[u] | w_u,text R_text[u]],  item = I0 + S I0 with I0 = [R_image[i] | R_text[i]],
    score = user . item. Alignment: SoloSim(head_text(g_text), head_image(g_image)). Distancing on
    a_m = Linear(g_m), b_m = Linear(u_m): CLUB(a_m, b_m) or -MSE(a_m, b_m)."""

    def __init__(self, cfg, n_users, features, adjacency, item_item):
        super().__init__()
        self.cfg, self.n_users = cfg, n_users
        for m in MODALITIES:  # frozen raw features [I, d_m]; constants, not saved in checkpoints
            self.register_buffer(f"feat_{m}", features[m], persistent=False)
        self.register_buffer("adj", adjacency, persistent=False)  # sparse CSR [U+I, U+I]
        self.register_buffer("item_item", item_item, persistent=False)  # sparse CSR [I, I]
        self.register_buffer("item_item_t", item_item.t().to_sparse_csr(), persistent=False)  # its transpose
        self.transform, self.mlp_in, self.mlp_out = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.head, self.to_a, self.to_b = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.pref = nn.ParameterDict()
        for m in MODALITIES:
            d = features[m].shape[1]
            self.transform[m] = nn.Linear(d, d)
            self.mlp_in[m] = nn.Linear(d, cfg.mlp_dim)
            self.mlp_out[m] = nn.Linear(cfg.mlp_dim, cfg.embed_dim)
            self.pref[m] = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, cfg.embed_dim)))
            self.head[m] = ProjectionHead(d // 2, cfg.head_dim, cfg.align_dim)
            self.to_a[m] = nn.Linear(d // 2, cfg.dist_dim)
            self.to_b[m] = nn.Linear(d - d // 2, cfg.dist_dim)
        w = nn.init.xavier_normal_(torch.empty(n_users, len(MODALITIES), 1))  # as released
        self.user_weight = nn.Parameter(F.softmax(w, dim=1).squeeze(2))  # [U, 2], free after init

    def modality(self, m, parts):
        """One modality's item side: the graph input item_m [I, 64] and, if `parts`, what the
        auxiliary losses use: {"z": head_m(g_m) [I, 32] (alignment), "a": a_m, "b": b_m [I, 32] (distancing)}.

        Every consumer of X_m = f_m W^T + c is linear, so X_m [I, d] is never formed: stacked into
        one weight V [k, d] (k = 256 + 64 + 32 + 32), the consumers read X_m V^T + e = f_m (V W)^T + (V c + e),
        which costs k d^2 + I d k multiply-adds instead of I d^2 + I d k (7x fewer for Baby's images).
        Exact up to float rounding (test_sand.py checks loss and gradients against the plain formula)."""
        W, c = self.transform[m].weight, self.transform[m].bias  # [d, d], [d]
        d, h = W.shape[0], W.shape[0] // 2  # g_m = X_m[:, :h], u_m = X_m[:, h:]
        consumers = {"item": (self.mlp_in[m], 0, d)}  # name: (Linear, first and last column of X_m it reads)
        if parts and self.cfg.align != "none":
            consumers["z"] = (self.head[m].first, 0, h)
        if parts and self.cfg.dist != "none":
            consumers["a"] = (self.to_a[m], 0, h)
            consumers["b"] = (self.to_b[m], h, d)
        # all consumers as one [k, d] weight on X_m (zero outside the columns each reads)
        V = torch.cat([F.pad(lin.weight, (lo, d - hi)) for lin, lo, hi in consumers.values()])  # [k, d]
        e = torch.cat([lin.bias for lin, _, _ in consumers.values()])  # [k]
        y = torch.addmm(V @ c + e, getattr(self, f"feat_{m}"), (V @ W).T)  # [I, k] = X_m V^T + e
        out = dict(zip(consumers, y.split([lin.out_features for lin, _, _ in consumers.values()], dim=1)))
        item = self.mlp_out[m](F.leaky_relu(out.pop("item")))  # [I, 64]
        if "z" in out:
            out["z"] = self.head[m].after_first(out["z"])  # [I, 32], rows L2-normalised
        return item, out

    @torch.no_grad()
    def split_parts(self, m):
        """The plain formula, for inspection: X_m = transform(f_m) and its parts
        {"generic": g_m [I, d/2], "unique": u_m [I, d/2], "a": a_m [I, 32], "b": b_m [I, 32]}."""
        x = self.transform[m](getattr(self, f"feat_{m}"))  # [I, d]
        g, u = x.split([x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
        return {"generic": g, "unique": u, "a": self.to_a[m](g), "b": self.to_b[m](u)}

    def forward(self, parts=True):
        """-> users [U, 128], items [I, 128], and per modality the parts of `modality` (if `parts`)."""
        h0, aux = [], {}
        for m in MODALITIES:
            item, aux[m] = self.modality(m, parts)
            h0.append(F.normalize(torch.cat([self.pref[m], item]), dim=1))  # [U+I, 64]
        # both modalities in one sparse product: A [H_image | H_text] = [A H_image | A H_text]
        r = lightgcn(self.adj, torch.cat(h0, dim=1), self.cfg.n_layers)  # [U+I, 128]
        d = self.cfg.embed_dim
        users = (r[:self.n_users].view(-1, len(MODALITIES), d) * self.user_weight[:, :, None]).flatten(1)  # [U, 128]
        items = r[self.n_users:]  # [I, 128]
        items = items + _SparseMM.apply(self.item_item, self.item_item_t, items)  # [I, 128]; S is constant
        return users, items, aux

    def loss(self, user, pos, neg, club, perms=None):
        """Training loss for one BPR batch, the paper's total objective as released:
            L = BPR + alpha * SoloSim + (ureg * CLUB  or  w_l2 * negL2), distancing averaged over modalities.
        Returns (loss, {term: value}, pairs the CLUB estimator is fitted on or None).
        perms [2, I]: the CLUB bound's random permutations of the items, text's then image's (--dist mi;
        drawn from torch's global generator if not given; train.py's sampler draws them)."""
        cfg = self.cfg
        users, items, aux = self(parts=True)
        # rows by F.embedding, not users[user]: a gather's backward adds with atomics on CPU (not repeatable)
        u, i, j = F.embedding(user, users), F.embedding(pos, items), F.embedding(neg, items)  # [B, 128] each
        terms = {"bpr": bpr_loss((u * i).sum(1), (u * j).sum(1))}
        pairs = None
        t, v = aux["text"], aux["image"]
        if cfg.align == "solo":
            terms["solo"] = solo_sim_loss(t["z"], v["z"], cfg.tau)
        if cfg.dist == "mi":  # text first, then image, as released
            if perms is None:
                perms = torch.stack([torch.randperm(items.shape[0], device=user.device) for _ in (t, v)])  # [2, I]
            a, b = torch.stack([t["a"], v["a"]]), torch.stack([t["b"], v["b"]])  # [2, I, 32] each
            terms["club"] = club(a, b, perms).mean()  # both modalities in one pass: [2] -> mean
            if cfg.club_fit == "cross":  # q(a_image | a_text) and q(b_image | b_text), as released
                pairs = (torch.cat([t["a"], t["b"]]), torch.cat([v["a"], v["b"]]))
            else:  # q(b_m | a_m), the pairs the bound is applied to (the paper)
                pairs = (a.flatten(0, 1), b.flatten(0, 1))  # [2 I, 32] each: text rows, then image
        elif cfg.dist == "l2":
            terms["neg_l2"] = sum(neg_l2(p["a"], p["b"]) for p in (t, v)) / 2
        weight = {"bpr": 1.0, "solo": cfg.alpha, "club": cfg.ureg, "neg_l2": cfg.w_l2}
        loss = sum(weight[k] * v for k, v in terms.items())
        return loss, {k: v.detach() for k, v in terms.items()}, pairs
