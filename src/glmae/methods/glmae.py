"""GL-MAE: global and local masked reconstruction with global-guided consistency (seeds 000/001).

This is the reference implementation of METHODS.md, section GL-MAE. Per volume and step:

1. Views (`sample_views`, in DataLoader workers): `n_global` global views, side fraction
   s ~ U(global_scale) of the volume's extent on every axis, resized trilinearly to `global_size`;
   `n_local` local views, s ~ U(local_scale), resized to `local_size`. One random flip per volume
   is shared by all its views, so views of one volume show the same anatomy the same way round.
2. Masking: every view is masked independently at `mask_ratio` (per-view random masks).
3. Reconstruction: the student encoder sees the visible tokens of every view (all global views
   of the batch in one encoder call, all local views in another); the MAE decoder predicts their
   masked patches. L_rec = MSE(global views) + MSE(local views), each over masked patches.
4. Consistency: the momentum teacher (encoder + head) sees the unmasked global views without
   autograd. A view's representation is the mean of its encoder output tokens (after the final
   norm; for masked views, its visible tokens), projected by the head (width -> 2048 -> 2048 ->
   512, GELU between layers). p_s = softmax(h(f(v)) / tau_s), p_t = softmax((h_m(f_m(g)) - c) / tau_t).
   L_cons = mean over every pair (unmasked global g_i, masked view v) of one volume of
   H(p_t(g_i), p_s(v)); the pairs (g_i, g_k^m) form the global-to-global term, (g_i, l_j^m) the
   local-to-global term. Pairs include i = k (a view against its own masked copy).
5. Teacher update after each optimiser step: theta_m <- m theta_m + (1 - m) theta with
   m(t) = 1 - (1 - m_0)(cos(pi t / T) + 1) / 2 (t = 0-based update index, T = total steps).
6. L = L_rec + lambda L_cons.

Choices beyond the paper (each a config option):
- `center` (default on): the teacher outputs are centred by a running mean c (momentum
  `center_momentum`, batch mean over all ranks) as in DINO; the paper names no centre. The
  teacher's output entropy is logged (`teacher_entropy`): collapse shows as 0 (one-hot) or
  log(head_out) (uniform).
- `head_batch_norm` (default on): BatchNorm before each GELU of the head, in student and teacher
  (which normalises with its own batch statistics in training), as the heads of MoCo v3 and
  BYOL. Mean-pooled features of similar volumes share a large common component (pairwise cosine
  0.9-0.998 on phantoms) which a plain MLP passes on: without BatchNorm the head outputs of
  different volumes had cosine 0.9999, the centred teacher was uniform from the first steps and
  the run collapsed (teacher entropy at log 512 throughout, consistency loss stuck at log 512).
  With it, the teacher entropy starts sharp (~0.4 nats) and settles in between (1.5-2.5 nats
  after 400 steps of `glmae_tiny`) while the consistency loss falls. A DINO-style cosine last
  layer did not help here: with a 2048-wide hidden layer its initial cosines are ~0.02, too small
  for the teacher temperature to sharpen.
- `flip_prob`: per-volume random flips shared by its views.
- `export`: which encoder becomes `encoder.safetensors`, the student (default, as MAE) or the
  momentum teacher.
- Ablation switches `rec_global`, `rec_local`, `cons_g2g`, `cons_l2g`. With both consistency terms
  off there is no head and no teacher and the loss is exactly multi-view MAE3D.

Diagnostics, logged at every logging step: `teacher_entropy` (mean entropy of p_t),
`teacher_mean_entropy` (entropy of the batch-mean p_t: low when every view gets the same sharp
target; under DDP each rank's batch, averaged over the ranks, so it depends on the per-rank
batch), `student_entropy_global` / `_local`, `kl_g2g` / `kl_l2g` (KL(p_t || p_s), the consistency
loss minus the teacher entropy: what the student still has to learn from the teacher) and
`head_last_norm` (the norm of the head's last layer). The collapse alarm (`watch`): when the
teacher entropy has stayed above 0.95·log K (uniform targets: no gradient) or below 0.05·log K
(one-hot) for `collapse_patience` logged steps, a `glmae: warning:` line, and `collapse` is 1 in
log.jsonl for as long as it lasts.
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

from glmae.config import register_method
from glmae.data import sampling
from glmae.engine import distributed
from glmae.errors import warn
from glmae.methods.mae3d import MAEConfig
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
    head_hidden: int = 2048
    head_out: int = 512
    head_batch_norm: bool = True  # BatchNorm in the head (see the module docstring)
    tau_s: float = 0.1
    tau_t: float = 0.04
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


def uses_locals(cfg: GLMAEConfig) -> bool:
    return cfg.n_local > 0 and (cfg.rec_local or cfg.cons_l2g)


def sample_views(volume, rng: np.random.Generator, *, cfg: GLMAEConfig, patch: int) -> dict:
    """Views of one volume with their masks:
    {"global": (N_g, C, *global_size), "global_keep": (N_g, K_g), "global_masked": (N_g, M_g),
     and the same for "local" (N_l views) when local views are used}."""
    image = volume.image  # (C, X, Y, Z), possibly memory-mapped
    flips = sampling.flip_axes(rng, cfg.flip_prob)
    kinds = [("global", cfg.n_global, cfg.global_size, cfg.global_scale)]
    if uses_locals(cfg):
        kinds.append(("local", cfg.n_local, cfg.local_size, cfg.local_scale))
    out = {}
    for kind, count, size, scale in kinds:
        length = math.prod(token_grid(size, patch))
        views, keeps, maskeds = [], [], []
        for _ in range(count):
            box = sampling.view_box(image.shape[1:], scale, rng)
            views.append(sampling.flip(sampling.resize(sampling.crop(image, box), size), flips))
            keep, masked = random_masking(length, cfg.mask_ratio, rng)
            keeps.append(keep)
            maskeds.append(masked)
        out[kind] = np.stack(views)
        out[f"{kind}_keep"] = np.stack(keeps)
        out[f"{kind}_masked"] = np.stack(maskeds)
    return out


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


def collapse(entropies: list[float], log_k: float, patience: int) -> str | None:
    """'uniform' or 'one-hot' when each of the last `patience` logged teacher entropies lies above
    0.95·log K or below 0.05·log K, else None. Either way the consistency term stops teaching:
    uniform targets give it no gradient, one-hot ones a single class for every view."""
    recent = entropies[-patience:] if patience > 0 else []
    if len(recent) < patience or patience == 0:
        return None
    low, high = (f * log_k for f in COLLAPSE_BAND)
    if all(e > high for e in recent):
        return "uniform"
    if all(e < low for e in recent):
        return "one-hot"
    return None


def consistency_loss(p_t: torch.Tensor, student_out: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Mean cross-entropy over all (teacher view i, student view j) pairs of each sample.

    p_t (B, I, K) teacher probabilities, student_out (B, J, K) student head outputs -> the mean
    over b, i, j of H(p_t[b, i], p_s[b, j]) = -sum_k p_t log p_s, p_s = softmax(student / tau_s).
    """
    logp_s = F.log_softmax(student_out.to(p_t.dtype) / tau_s, dim=-1)
    return -torch.einsum("bik,bjk->bij", p_t, logp_s).mean()


class ProjectionHead(nn.Sequential):
    """width -> hidden -> hidden -> out, GELU between layers; with `batch_norm`, BatchNorm before
    each GELU (as the heads of MoCo v3 and BYOL)."""

    def __init__(self, width: int, hidden: int, out: int, batch_norm: bool = True):
        norm = nn.BatchNorm1d if batch_norm else nn.Identity
        super().__init__(
            nn.Linear(width, hidden), norm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), norm(hidden), nn.GELU(),
            nn.Linear(hidden, out),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


class GLMAE(MaskedAutoencoder):
    def __init__(self, encoder: ViTConfig, cfg: GLMAEConfig):
        super().__init__(encoder, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, cfg.norm_pix)
        if cfg.export not in ("student", "teacher"):
            raise ValueError(f"method.export must be student or teacher, not {cfg.export!r}")
        self.cfg = cfg
        self.consistency = cfg.cons_g2g or (cfg.cons_l2g and uses_locals(cfg))
        if not (cfg.rec_global or (cfg.rec_local and uses_locals(cfg))):
            self.decoder = None  # unused parameters would stall data-parallel training
        if self.consistency:
            self.head = ProjectionHead(encoder.width, cfg.head_hidden, cfg.head_out, cfg.head_batch_norm)
            self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "head": copy.deepcopy(self.head)})
            self.teacher.requires_grad_(False)
            self.register_buffer("center", torch.zeros(cfg.head_out))
        self.momentum = cfg.momentum
        self.entropies: list[float] = []  # logged teacher entropies, for the collapse alarm

    def sampler(self):
        return functools.partial(sample_views, cfg=self.cfg, patch=self.patch)

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
            cons, cons_logs = self._consistency(batch["global"].flatten(0, 1), features, n_batch)
            logs.update(cons_logs)
            loss = loss + cfg.lambda_cons * cons
        return loss, logs

    def _consistency(self, globals_unmasked: torch.Tensor, features: dict, n_batch: int):
        cfg = self.cfg
        with torch.no_grad():
            tokens, _ = self.teacher["encoder"](globals_unmasked)
            teacher_out = self.teacher["head"](tokens.mean(1)).float()  # (B·N_g, K)
            p_t = teacher_probs(teacher_out, self.center if cfg.center else None, cfg.tau_t)
            p_t = p_t.view(n_batch, cfg.n_global, -1)
            h_t = entropy(p_t)
            if cfg.center and self.training:
                self._update_center(teacher_out)
        # the diagnostics of a collapse: sharp but all alike (batch-mean entropy low), uniform
        # (teacher entropy at log K), or a student that stopped following (KL)
        logs = {"teacher_entropy": h_t, "teacher_mean_entropy": entropy(p_t.mean((0, 1))),
                "head_last_norm": self.head[-1].weight.detach().norm()}
        terms = []
        for kind, on in (("global", cfg.cons_g2g), ("local", cfg.cons_l2g and uses_locals(cfg))):
            if not on:
                continue
            student = self.head(features[kind].mean(1)).view(n_batch, -1, cfg.head_out)
            term = consistency_loss(p_t, student, cfg.tau_s)
            pair = "g2g" if kind == "global" else "l2g"
            logs[f"loss_cons_{pair}"] = term.detach()
            # the cross-entropy over all pairs is H(p_t) + KL(p_t || p_s), averaged alike
            logs[f"kl_{pair}"] = term.detach() - h_t
            with torch.no_grad():
                logs[f"student_entropy_{kind}"] = entropy(F.softmax(student.float() / cfg.tau_s, -1))
            terms.append((term, student.shape[1]))
        # the mean over all pairs: each term is already a mean over N_g x N_views pairs
        n_views = sum(n for _, n in terms)
        return sum(term * n for term, n in terms) / n_views, logs

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = distributed.all_reduce_sum_(teacher_out.sum(0))
        count = distributed.all_reduce_sum_(torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device))
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_center / count, alpha=1 - m)

    @torch.no_grad()
    def after_step(self, step: int, total: int, applied: torch.Tensor) -> dict:
        """EMA update of the teacher after optimiser step `step` (1-based); none when the step was
        skipped (`applied` 0, the fp16 loss scaler's overflow), without reading `applied` on the host."""
        if not self.consistency:
            return {}
        m = momentum_at(step - 1, total, self.cfg.momentum)
        student = list(self.encoder.parameters()) + list(self.head.parameters())
        teacher = list(self.teacher["encoder"].parameters()) + list(self.teacher["head"].parameters())
        torch._foreach_lerp_(teacher, student, applied * (1.0 - m))
        self.momentum = m
        return {"momentum": m}

    def watch(self, step: int, logged: dict, say: bool) -> dict:
        """The collapse alarm, on each logged step's values (means over micro-steps and ranks):
        `collapse` 1 in the log while the teacher entropy has stayed outside the band for
        `collapse_patience` logged steps, with a warning line (if `say`) when it starts."""
        if not self.consistency or self.cfg.collapse_patience == 0 or "teacher_entropy" not in logged:
            return {}
        was = collapse(self.entropies, math.log(self.cfg.head_out), self.cfg.collapse_patience)
        self.entropies = [*self.entropies, logged["teacher_entropy"]][-self.cfg.collapse_patience:]
        state = collapse(self.entropies, math.log(self.cfg.head_out), self.cfg.collapse_patience)
        if state and state != was and say:
            warn(f"step {step}: GL-MAE's consistency targets collapsed ({state}): the teacher entropy "
                 f"{logged['teacher_entropy']:.2f} nats (log K = {math.log(self.cfg.head_out):.2f}) has stayed "
                 f"{'above 0.95' if state == 'uniform' else 'below 0.05'}·log K for {self.cfg.collapse_patience} "
                 f"logged steps; the consistency term no longer teaches")
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
