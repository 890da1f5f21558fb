"""GL-MAE: global and local masked reconstruction with global-guided consistency (seeds 000/001).

This is the reference implementation of METHODS.md, section GL-MAE. Per volume and step:

1. Views (`sample_views`, in DataLoader workers): `n_global` global views, side fraction
   s ~ U(global_scale) of the volume's extent on every axis, resized trilinearly to `global_size`;
   `n_local` local views, s ~ U(local_scale), resized to `local_size`. With `nested_locals`
   (default) local view j is cut from inside global view j mod N_g, as the paper has the global
   view cover the local ones. One random flip per volume is shared by all its views.
2. Masking: every view is masked independently at `mask_ratio` (per-view random masks).
3. Reconstruction: the student encoder sees the visible tokens of every view (all global views
   of the batch in one encoder call, all local views in another); the MAE decoder predicts their
   masked patches. L_rec = MSE(global views) + MSE(local views), each over masked patches.
4. Consistency: the momentum teacher (encoder + head) sees the unmasked global views without
   autograd. A student view's representation is the mean of its visible output tokens; a target
   is the mean of teacher tokens of a global view (below), projected by the head. p_s =
   softmax(h(f(v)) / tau_s), p_t = softmax((h_m(pool(f_m(g))) - c) / tau_t). L_cons = mean over
   the teaching pairs (global g_i, masked view v) of H(p_t, p_s(v)): global-to-global pairs
   (g_i, g_k^m) and local-to-global pairs (g_i, l_j^m).
5. Teacher update after each optimiser step: theta_m <- m theta_m + (1 - m) theta with
   m(t) = 1 - (1 - m_0)(cos(pi t / T) + 1) / 2 (t = 0-based update index, T = total steps).
6. L = L_rec + lambda L_cons.

Which pairs teach, and what a target averages. The paper's formulas were lost in the text we
have; read literally, every masked view learns the mean over all tokens of every unmasked global
view. Measured on phantoms that cannot work: mean-pooled features carry no identity of the volume
(the centred cosine of two views of one volume is no higher than of two volumes: -0.12 vs +0.06
for an encoder after 1000 steps), a masked view cannot predict another crop's representation, and
a masked copy's mean over its 25% visible tokens differs from its full view's mean by which
positions it shows (18-36% of its variance). The student hedged toward the average target and
the teacher followed it to uniform (entropy at log K after ~1500 steps of the first version).
So by default:
- `g2g_pairs` same: a masked global view learns from its own unmasked copy ("all": from every
  global view of its volume);
- `l2g_pairs` containing: a local view learns from the global views that contain it ("all");
- `target_pool` matched: a target averages the teacher's tokens of what the student's view shows:
  for a masked copy, the teacher's tokens at its visible positions (seen by the teacher with the
  whole view as context); for a local view, the teacher's tokens of the global view inside the
  local view's box (`region_weights`). "view": the mean over the whole global view.
With these, targets are predictable and still differ between volumes: the teacher entropy falls
instead of rising and the consistency loss with it (benchmarks/glmae_consistency.py).

The head (models/heads.py, DINO's for ViTs): MLP width -> 2048 -> 2048 -> 256 with GELU and no
normalisation (`head_norm` none; running: standardised by running statistics; batch: BatchNorm,
the paper's, whose targets depend on the 3 other views of a 2-volume batch), the L2-normalised
bottleneck, and a last layer of `head_out` = 512 cosine outputs (`head_norm_last`: weight-normalised
with its norm frozen, so neither weight decay nor the teacher's moving average shrinks the logits
toward uniform). It runs in fp32 under autocast, once over all student views. `freeze_last_steps`:
no gradient to the last layer for the first steps (DINO freezes it for an epoch). `head_lr_scale`
0.3: the head's lr as a fraction of the encoder's; with the encoder's lr (5e-4 at batch 2 in the
tiny configs, ~100x DINO's per-sample rate) the head's targets swung from sharp to flat within 100
steps, at 0.1 the student could no longer follow the teacher. The tiny configs clip gradients at
norm 3, as the paper configs and DINO do. Teacher temperature `tau_t` (DINO's 0.04), with an
optional schedule: `tau_t_start` for the first `tau_t_hold` of the run, then a linear rise to
`tau_t` over the next `tau_t_warmup` (0 by default: no schedule). The tiny configs hold 0.02 for
half the run and rise to 0.04 over the second half (DINO's also rises, from 0.04 to 0.07).

Measured on phantom CT and brain MRI (glmae_phantom, glmae_brats_tiny; 1500-3000 steps, one
seed; teacher entropy after step 300, log K = 6.24): with the running normalisation the targets jumped (teacher
entropy 0.9-5.7 nats) and the student lost them (KL(p_t || p_s) median 2.1-2.4, up to 9; student
near uniform); without it the student follows (KL 0.05-0.6), but on CT phantoms, whose pooled
features differ little between views, the centred targets stay near uniform at tau_t 0.04 (6.1
nats). At 0.02 they settle at 1-3 nats (uniform from step ~50 to ~250, then 5.5 -> 1.0 by step
3000), but kept sharpening as the features grew apart: below 0.05·log K after ~4000 steps of a
6000-step run (benchmarks/results/glmae_consistency_notes.md). A sharper start (0.01 rising to 0.02)
made them one-hot, then uniform for good. Hence the tiny configs' rise from 0.02 to 0.04, late:
rising over the whole run, the targets left the uniform start later (5.69 nats at step 330 of 3000),
and a faster teacher (m_0 0.99 or 0.98) made them swing between one-hot and uniform.

Other choices beyond the paper (each a config option):
- `center` (default on): the teacher outputs are centred by a running mean c (momentum
  `center_momentum`, mean over all ranks) as in DINO; the paper names no centre.
- `flip_prob`: per-volume random flips shared by its views.
- `export`: which encoder becomes `encoder.safetensors`, the student (default, as MAE) or the
  momentum teacher.
- Ablation switches `rec_global`, `rec_local`, `cons_g2g`, `cons_l2g`. With both consistency terms
  off there is no head and no teacher and the loss is exactly multi-view MAE3D.

Diagnostics, logged at every logging step: `teacher_entropy` (mean entropy of the targets),
`teacher_mean_entropy` (entropy of their batch mean) and `teacher_spread` (the difference: 0 when
every view of the batch gets the same target; logged for batches of 2 or more volumes per rank),
`student_entropy_global` / `_local`, `kl_g2g` / `kl_l2g` (KL(p_t || p_s) over each kind's pairs:
what the student still has to learn), `loss_cons`, `tau_t` and `head_last_norm` (the norm of the
head's last-layer weight). The collapse alarm (`watch`): when for `collapse_patience` logged steps
the teacher entropy has stayed above 0.95·log K (uniform: no gradient) or below 0.05·log K
(one-hot), or the spread below 0.02·log K (one target for all), a `glmae: warning:` line, and
`collapse` is 1 in log.jsonl for as long as it lasts.
"""


from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmae.config import OptimConfig, register_method
from glmae.data import sampling
from glmae.engine import distributed
from glmae.engine.optim import param_groups
from glmae.errors import warn
from glmae.methods.mae3d import MAEConfig
from glmae.models.heads import ProjectionHead
from glmae.models.mae import MaskedAutoencoder, reconstruction_loss
from glmae.models.patches import random_masking, token_grid
from glmae.models.vit import ViTConfig


@register_method("glmae")
@dataclass
class GLMAEConfig(MAEConfig):
    name: str = "glmae"
    n_global: int = 2
    n_local: int = 4
    global_size: tuple[int, int, int] = (160, 160, 160)
    local_size: tuple[int, int, int] = (96, 96, 96)
    global_scale: tuple[float, float] = (0.5, 1.0)  # side fraction of the volume's extent
    local_scale: tuple[float, float] = (0.25, 0.5)
    nested_locals: bool = True  # local view j is cut from inside global view j mod N_g
    g2g_pairs: str = "same"  # a masked global view learns from its own unmasked copy, or "all" global views
    l2g_pairs: str = "containing"  # a local view learns from the global views that contain it, or "all"
    target_pool: str = "matched"  # a target averages the teacher's tokens the student's view shows, or its "view"
    head_hidden: int = 2048
    head_bottleneck: int = 256  # L2-normalised bottleneck before the last layer; 0: none (first version)
    head_out: int = 512
    head_norm_last: bool = True  # weight-normalised last layer, its norm frozen at 1
    head_norm: str = "none"  # before each GELU of the head's MLP: running | batch | none (models/heads.py)
    freeze_last_steps: int = 0  # the last layer gets no gradient for this many first steps
    head_lr_scale: float = 0.3  # the head's learning rate, as a fraction of the encoder's
    tau_s: float = 0.1
    tau_t: float = 0.04
    tau_t_start: float = 0.04  # teacher temperature at step 0, rising linearly to tau_t ...
    tau_t_warmup: float = 0.0  # ... over this fraction of the run ...
    tau_t_hold: float = 0.0  # ... after holding tau_t_start for this fraction
    center: bool = True
    center_momentum: float = 0.9
    momentum: float = 0.996  # m_0 of the teacher's cosine schedule to 1
    lambda_cons: float = 1.0
    rec_global: bool = True
    rec_local: bool = True
    cons_g2g: bool = True
    cons_l2g: bool = True
    export: str = "student"  # student | teacher
    collapse_patience: int = 10  # logged steps of teacher entropy near 0 or log K before the alarm; 0: off

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The size of what the encoder sees (the online probe's crops): a global view's."""
        return self.global_size


def uses_locals(cfg: GLMAEConfig) -> bool:
    return cfg.n_local > 0 and (cfg.rec_local or cfg.cons_l2g)


def sample_views(volume, rng: np.random.Generator, *, cfg: GLMAEConfig, patch) -> dict:
    """Views of one volume with their masks:
    {"global": (N_g, C, *global_size), "global_keep": (N_g, K_g), "global_masked": (N_g, M_g),
     the same for "local" (N_l views) when local views are used, and "l2g_pairs": (N_g, N_l) float
     32, 1 where global view i may teach local view j (`l2g_pairs`: it contains it, or every pair)}.
    With `nested_locals`, local view j is cut from inside global view j mod N_g."""
    image = volume.image  # (C, X, Y, Z), possibly memory-mapped
    flips = sampling.flip_axes(rng, cfg.flip_prob)
    boxes = {"global": [sampling.view_box(image.shape[1:], cfg.global_scale, rng) for _ in range(cfg.n_global)]}
    kinds = [("global", cfg.global_size)]
    if uses_locals(cfg):
        parents = [boxes["global"][j % cfg.n_global] if cfg.nested_locals else None for j in range(cfg.n_local)]
        boxes["local"] = [sampling.view_box(image.shape[1:], cfg.local_scale, rng, inside) for inside in parents]
        kinds.append(("local", cfg.local_size))
    out = {}
    for kind, size in kinds:
        length = math.prod(token_grid(size, patch))
        views, keeps, maskeds = [], [], []
        for box in boxes[kind]:
            views.append(sampling.flip(sampling.resize(sampling.crop(image, box), size), flips))
            keep, masked = random_masking(length, cfg.mask_ratio, rng)
            keeps.append(keep)
            maskeds.append(masked)
        out[kind] = np.stack(views)
        out[f"{kind}_keep"] = np.stack(keeps)
        out[f"{kind}_masked"] = np.stack(maskeds)
    if uses_locals(cfg):
        out["l2g_pairs"] = local_to_global_pairs(boxes["global"], boxes["local"], cfg.l2g_pairs)
        grid = token_grid(cfg.global_size, patch)
        out["l2g_pool"] = np.stack([np.stack([region_weights(g, loc, grid, flips) for loc in boxes["local"]])
                                    for g in boxes["global"]])
    return out


def region_weights(view: sampling.Box, region: sampling.Box, grid: tuple[int, int, int],
                   flips: tuple[int, ...] = ()) -> np.ndarray:
    """(L,) float32 weights over the tokens of a view (box `view` of the volume resized to a token
    `grid`, flipped on `flips`): equal on the tokens whose centres lie in the box `region`, summing
    to 1; the token nearest the region's centre if none does."""
    inside, nearest = [], []
    for axis, (start, size, r_start, r_size, n) in enumerate(zip(*view, *region, grid)):
        centres = start + (np.arange(n) + 0.5) * size / n  # volume coordinates of the token centres
        if axis in flips:
            centres = centres[::-1]
        inside.append((centres >= r_start) & (centres < r_start + r_size))
        nearest.append(np.abs(centres - (r_start + r_size / 2)) == np.abs(centres - (r_start + r_size / 2)).min())
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    if not mask.any():
        mask = nearest[0][:, None, None] & nearest[1][None, :, None] & nearest[2][None, None, :]
    weights = mask.astype(np.float32).ravel()
    return weights / weights.sum()


def local_to_global_pairs(global_boxes: list, local_boxes: list, mode: str = "containing") -> np.ndarray:
    """(N_g, N_l) float32: 1 where global view i teaches local view j, i.e. contains its box
    (`mode` containing) or always (`mode` all)."""
    return np.array([[mode == "all" or sampling.contains(g, loc) for loc in local_boxes] for g in global_boxes],
                    dtype=np.float32)


def momentum_at(t: int, total: int, m0: float) -> float:
    """Teacher momentum: m_0 at t = 0 rising along a half cosine to 1 at t = total."""
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * t / total) + 1.0) / 2.0


def teacher_probs(teacher_out: torch.Tensor, center: torch.Tensor | None, tau_t: float) -> torch.Tensor:
    """p_t = softmax((teacher_out - c) / tau_t) over the last axis (no centring if c is None)."""
    if center is not None:
        teacher_out = teacher_out - center
    return (teacher_out / tau_t).softmax(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the distributions p (..., K)."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


COLLAPSE_BAND = (0.05, 0.95)  # fractions of log K: below, targets are one-hot; above, uniform
SHARED_BELOW = 0.02  # fraction of log K: a teacher spread below it gives every view the same target


def collapse(entropies: list[float], log_k: float, patience: int, spreads: list[float] | None = None) -> str | None:
    """'uniform' or 'one-hot' when each of the last `patience` logged teacher entropies lies above
    0.95·log K or below 0.05·log K; 'shared' when each of the last `patience` teacher spreads (the
    entropy of the batch's mean target minus the mean entropy of its targets: 0 when every view of
    the batch gets the same target) lies below 0.02·log K; else None. Each way the consistency term
    stops teaching: uniform targets give it no gradient, one-hot or shared ones one answer for
    every view."""
    if patience == 0 or len(entropies) < patience:
        return None
    low, high = (f * log_k for f in COLLAPSE_BAND)
    recent = entropies[-patience:]
    if all(e > high for e in recent):
        return "uniform"
    if all(e < low for e in recent):
        return "one-hot"
    if spreads is not None and len(spreads) >= patience and all(s < SHARED_BELOW * log_k for s in spreads[-patience:]):
        return "shared"
    return None


def pair_cross_entropy(p_t: torch.Tensor, student_out: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Teacher probabilities p_t (B, I, J, K) for each (teacher view i, student view j) pair, or
    (B, I, K) for every j alike, and student head outputs (B, J, K) -> (B, I, J) cross-entropies
    H(p_t[b, i, j], p_s[b, j]) = -sum_k p_t log p_s, p_s = softmax(student / tau_s)."""
    logp_s = F.log_softmax(student_out.to(p_t.dtype) / tau_s, dim=-1)
    if p_t.dim() == 3:
        p_t = p_t[:, :, None].expand(-1, -1, student_out.shape[1], -1)
    return -torch.einsum("bijk,bjk->bij", p_t, logp_s)


def consistency_loss(p_t: torch.Tensor, student_out: torch.Tensor, tau_s: float,
                     pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the (teacher view i, student view j) pairs of each sample: all of
    them, or those where `pairs` (B, I, J) is 1."""
    ce = pair_cross_entropy(p_t, student_out, tau_s)
    if pairs is None:
        return ce.mean()
    return (ce * pairs).sum() / pairs.sum().clamp_min(1)


class GLMAE(MaskedAutoencoder):
    def __init__(self, encoder: ViTConfig, cfg: GLMAEConfig):
        super().__init__(encoder, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, cfg.norm_pix)
        if cfg.export not in ("student", "teacher"):
            raise ValueError(f"method.export must be student or teacher, not {cfg.export!r}")
        if cfg.g2g_pairs not in ("same", "all"):
            raise ValueError(f"method.g2g_pairs must be same or all, not {cfg.g2g_pairs!r}")
        if cfg.target_pool not in ("matched", "view"):
            raise ValueError(f"method.target_pool must be matched or view, not {cfg.target_pool!r}")
        if cfg.l2g_pairs not in ("containing", "all"):
            raise ValueError(f"method.l2g_pairs must be containing or all, not {cfg.l2g_pairs!r}")
        self.cfg = cfg
        self.consistency = cfg.cons_g2g or (cfg.cons_l2g and uses_locals(cfg))
        if not (cfg.rec_global or (cfg.rec_local and uses_locals(cfg))):
            self.decoder = None  # unused parameters would stall data-parallel training
        if self.consistency:
            self.head = ProjectionHead(encoder.width, cfg.head_hidden, cfg.head_out, cfg.head_bottleneck,
                                       cfg.head_norm, cfg.head_norm_last)
            self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "head": copy.deepcopy(self.head)})
            self.teacher.requires_grad_(False)
            self.register_buffer("center", torch.zeros(cfg.head_out))
            # optimiser steps done and the run's total: the teacher temperature and the last
            # layer's freeze follow them on the device, and they are saved with the weights
            self.register_buffer("steps_done", torch.zeros(()))
            self.register_buffer("steps_total", torch.zeros(()))
        self.momentum = cfg.momentum
        self.entropies: list[float] = []  # logged teacher entropies and spreads, for the collapse alarm
        self.spreads: list[float] = []

    def sampler(self):
        return functools.partial(sample_views, cfg=self.cfg, patch=self.patch)

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """AdamW groups: the head at `head_lr_scale` times the learning rate of the rest."""
        return param_groups(self, optim.weight_decay, self.cfg.head_lr_scale,
                            lambda name: 0 if name.startswith("head.") else 1, num_layers=1)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.consistency:
            self.teacher["encoder"].eval()  # the teacher never drops paths; its head's BatchNorm
            # uses batch statistics in training like the student's
        return self

    @property
    def export_encoder(self) -> nn.Module:
        return self.teacher["encoder"] if self.cfg.export == "teacher" and self.consistency else self.encoder

    def _views(self, batch: dict, kind: str):
        """(B, N, C, ...) views and masks -> flattened (B·N, ...) tensors."""
        return tuple(batch[key].flatten(0, 1) for key in (kind, f"{kind}_keep", f"{kind}_masked"))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        n_batch = batch["global"].shape[0]
        logs = {}
        loss = 0.0
        features = {}
        kinds = ["global"] + (["local"] if uses_locals(cfg) else [])
        for kind in kinds:
            images, keep, masked = self._views(batch, kind)
            latent, _ = self.encoder(images, keep)  # (B·N, K, D): shared by both objectives
            features[kind] = latent
            if cfg.rec_global if kind == "global" else cfg.rec_local:
                pred = self.decoder(latent, keep, masked, token_grid(images.shape[2:], self.patch))
                rec = reconstruction_loss(pred, images, masked, self.patch, cfg.norm_pix)
                logs[f"loss_rec_{kind}"] = rec.detach()
                loss = loss + rec
        if self.consistency:
            cons, cons_logs = self._consistency(batch, features, n_batch)
            logs.update(cons_logs)
            loss = loss + cfg.lambda_cons * cons
        return loss, logs

    def teacher_temperature(self) -> torch.Tensor:
        """tau_t: tau_t_start for the first tau_t_hold of the run, then rising linearly to tau_t over
        the next tau_t_warmup (tau_t throughout if tau_t_warmup is 0)."""
        cfg = self.cfg
        progress = self.steps_done / self.steps_total.clamp_min(1.0)
        if cfg.tau_t_warmup > 0:
            ramp = ((progress - cfg.tau_t_hold) / cfg.tau_t_warmup).clamp(0.0, 1.0)
        else:
            ramp = torch.ones_like(progress)
        return cfg.tau_t_start + (cfg.tau_t - cfg.tau_t_start) * ramp

    def _targets(self, batch: dict, n_batch: int) -> tuple[dict, dict]:
        """The teacher's pooled features and the pairs they teach, per kind of student view:
        ({kind: (B, N_g, J, D)}, {kind: (B, N_g, J) 0/1}). Global view i's tokens averaged over
        the whole view (`target_pool` view, the paper's), or over what the student's view shows
        (matched): its own visible positions for its masked copy, the tokens inside a local view's
        box for that local view."""
        cfg, n_g = self.cfg, self.cfg.n_global
        images = batch["global"].flatten(0, 1)
        tokens, _ = self.teacher["encoder"](images)
        tokens = tokens.view(n_batch, n_g, *tokens.shape[1:]).float()  # (B, N_g, L, D)
        length = tokens.shape[2]
        whole = torch.full((n_batch, n_g, 1, length), 1.0 / length, device=tokens.device)
        weights, pairs = {}, {}
        if cfg.cons_g2g:
            eye = torch.eye(n_g, device=tokens.device)
            pairs["global"] = (eye if cfg.g2g_pairs == "same" else torch.ones_like(eye)).expand(n_batch, -1, -1)
            if cfg.target_pool == "matched":  # each global view's visible positions, for its masked copy
                keep = batch["global_keep"]  # (B, N_g, K)
                seen = torch.zeros(n_batch, n_g, length, device=tokens.device).scatter_(2, keep, 1.0 / keep.shape[2])
                weights["global"] = torch.where(eye[None, :, :, None].bool(), seen[:, None], whole)
            else:
                weights["global"] = whole.expand(-1, -1, n_g, -1)
        if cfg.cons_l2g and uses_locals(cfg):
            pairs["local"] = batch["l2g_pairs"].float()
            n_l = pairs["local"].shape[2]
            weights["local"] = batch["l2g_pool"].float() if cfg.target_pool == "matched" else whole.expand(
                -1, -1, n_l, -1)
        pooled = {kind: torch.einsum("bijl,bild->bijd", w, tokens) for kind, w in weights.items()}
        return pooled, pairs

    def _consistency(self, batch: dict, features: dict, n_batch: int):
        cfg = self.cfg
        kinds = [kind for kind, on in (("global", cfg.cons_g2g), ("local", cfg.cons_l2g and uses_locals(cfg))) if on]
        with torch.no_grad():
            pooled, pairs = self._targets(batch, n_batch)
            shapes = [pooled[kind].shape[:3] for kind in kinds]
            teacher_out = self.teacher["head"](torch.cat([pooled[kind].flatten(0, 2) for kind in kinds]))  # fp32
            used = torch.cat([pairs[kind].flatten() for kind in kinds])  # (P,) 1 for the pairs that teach
            p_t = teacher_probs(teacher_out, self.center if cfg.center else None, self.teacher_temperature())
            if cfg.center and self.training:
                self._update_center(teacher_out, used)
            h = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1)  # (P,) each target's entropy
            # the number of teaching pairs varies with the views, so means (the loss's, the logged
            # ones) divide by the count over every rank, as one process with the whole batch would
            counts = distributed.mean_denominator(torch.stack([pairs[kind].sum() for kind in kinds])).clamp_min(1)
            h_t = (h * used).sum() / counts.sum()
            mean_entropy = entropy((p_t * used[:, None]).sum(0) / used.sum().clamp_min(1))
        train_last = (self.steps_done >= cfg.freeze_last_steps).float()
        views = [features[kind].mean(1) for kind in kinds]  # (B·J, D): the student's views, pooled
        if cfg.head_norm == "batch":  # one BatchNorm batch per kind, as the teacher's holds the global views
            student = [self.head(x, train_last) for x in views]
        else:  # the head once over every student view
            student = self.head(torch.cat(views), train_last).split([len(x) for x in views])
        # the diagnostics of a collapse: uniform (teacher entropy at log K), one-hot, the same target
        # for every view (spread 0), or a student that stopped following (KL)
        logs = {"teacher_entropy": h_t, "teacher_mean_entropy": mean_entropy,
                "head_last_norm": self.head.last_weight().detach().norm(), "tau_t": self.teacher_temperature()}
        if n_batch > 1:  # the views of one volume may rightly share a target, those of several should not
            logs["teacher_spread"] = mean_entropy - (h * used).sum() / used.sum().clamp_min(1)
        total = 0.0
        sizes = [math.prod(x) for x in shapes]
        for kind, out, shape, p, hk, n in zip(kinds, student, shapes, p_t.split(sizes), h.split(sizes), counts):
            out = out.view(n_batch, -1, cfg.head_out)  # (B, J, K)
            ce = pair_cross_entropy(p.view(*shape, -1), out, cfg.tau_s) * pairs[kind]  # (B, N_g, J)
            pair = "g2g" if kind == "global" else "l2g"
            logs[f"loss_cons_{pair}"] = ce.detach().sum() / n
            logs[f"kl_{pair}"] = (ce.detach() - hk.view(shape) * pairs[kind]).sum() / n
            with torch.no_grad():
                logs[f"student_entropy_{kind}"] = entropy(F.softmax(out / cfg.tau_s, -1))
            total = total + ce.sum()
        loss = total / counts.sum()
        logs["loss_cons"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor, used: torch.Tensor) -> None:
        """c <- m c + (1 - m) the mean of the teaching targets' outputs (P, K) over every rank."""
        batch_center = distributed.all_reduce_sum_((teacher_out * used[:, None]).sum(0))
        count = distributed.all_reduce_sum_(used.sum().reshape(1))
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_center / count, alpha=1 - m)

    @torch.no_grad()
    def after_step(self, step: int, total: int, applied: torch.Tensor) -> dict:
        """EMA update of the teacher after optimiser step `step` (1-based); none when the step was
        skipped (`applied` 0, the fp16 loss scaler's overflow), without reading `applied` on the host."""
        if not self.consistency:
            return {}
        self.steps_done.fill_(step)
        self.steps_total.fill_(total)
        m = momentum_at(step - 1, total, self.cfg.momentum)
        student = list(self.encoder.parameters()) + list(self.head.parameters())
        teacher = list(self.teacher["encoder"].parameters()) + list(self.teacher["head"].parameters())
        torch._foreach_lerp_(teacher, student, applied * (1.0 - m))
        self.momentum = m
        return {"momentum": m}

    def watch(self, step: int, logged: dict, say: bool) -> dict:
        """The collapse alarm, on each logged step's values (means over micro-steps and ranks):
        `collapse` 1 in the log while the targets have stayed collapsed (`collapse`) for
        `collapse_patience` logged steps, with a warning line (if `say`) when it starts."""
        if not self.consistency or self.cfg.collapse_patience == 0 or "teacher_entropy" not in logged:
            return {}
        log_k, patience = math.log(self.cfg.head_out), self.cfg.collapse_patience
        was = collapse(self.entropies, log_k, patience, self.spreads if self.spreads else None)
        self.entropies = [*self.entropies, logged["teacher_entropy"]][-patience:]
        if "teacher_spread" in logged:
            self.spreads = [*self.spreads, logged["teacher_spread"]][-patience:]
        state = collapse(self.entropies, log_k, patience, self.spreads if self.spreads else None)
        if state and state != was and say:
            why = {"uniform": f"the teacher entropy {logged['teacher_entropy']:.2f} nats (log K = {log_k:.2f}) has "
                              f"stayed above 0.95·log K",
                   "one-hot": f"the teacher entropy {logged['teacher_entropy']:.2f} nats (log K = {log_k:.2f}) has "
                              f"stayed below 0.05·log K",
                   "shared": f"every view of a batch has got the same target (teacher spread "
                             f"{logged.get('teacher_spread', 0.0):.3f} nats, below {SHARED_BELOW}·log K)"}[state]
            warn(f"step {step}: GL-MAE's consistency targets collapsed ({state}): {why} for {patience} logged "
                 f"steps; the consistency term no longer teaches")
        return {"collapse": float(state is not None)}

    def figure(self, batch: dict, path) -> None:
        from glmae.figures import recon_figure

        rows = []
        for kind in ["global"] + (["local"] if uses_locals(self.cfg) else []):
            images, keep, masked = (t[:1] for t in self._views(batch, kind))
            original = images[0, 0].float().cpu().numpy()
            if self.decoder is None:
                rows.append((f"{kind} view", [("original", original)]))
                continue
            _, pred, _ = self.reconstruct(images, keep, masked)
            shown, recon = self.reconstruction_volumes(images, keep, masked, pred)
            rows.append((f"{kind} view", [("original", original), ("masked input", shown), ("reconstruction", recon)]))
        recon_figure(rows, path)
