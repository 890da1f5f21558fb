"""Published encoders' weights -> our encoders' state dicts (`glmae import`): pure functions.

Each format's layout was learned by reading its public model definition; none of their code is
used or needed here.

- `glmae-paper`: GL-MAE's release (JiaxinZhuang/GL-MAE, `Finetune/models_3dvit.py`:
  `VisionTransformer3D` of timm `Block`s): `patch_embed.proj`, `cls_token`, `pos_embed` (1, 1 + L, D)
  whose first row is the cls token's, `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`,
  `norm`; under `student`, `state_dict` or `model` (the order their loader tries), with `module.`
  and `backbone.` prefixes; the MAE decoder (`decoder_*`, `mask_token`) if the file has the whole model.
- `selfmedmae`: SelfMedMAE's MAE3D (cvlab-stonybrook/SelfMedMAE, `lib/models/mae3d.py`,
  `lib/networks/mae_vit.py`: `MAEViTEncoder`) under `state_dict`: the same timm keys under
  `encoder.`, and the encoder's position embedding outside it, `encoder_pos_embed` (1, L, D), with no
  cls row (their cls token gets a zero one); the decoder, `encoder_to_decoder`, `mask_token`.
- `monai-vit`: `monai.networks.nets.ViT`, also as `UNETR.vit` (`vit.` prefix) and as the `ViTAutoEnc`
  of MONAI's pre-training tutorial: our own names plus `patch_embedding.position_embeddings`
  (1, L, D); the perceptron patch embedding (`patch_embeddings.1`, a Linear on patches flattened as
  (p1 p2 p3 c)), separate `attn.to_q/to_k/to_v` (MONAI's attention without `use_combined_linear`)
  and no qkv bias (MONAI's default) are adapted.
- `monai-swinvit`: `model_swinvit.pt`, MONAI's Swin-UNETR self-supervised weights: under
  `state_dict`, the keys of `SwinUNETR(...).swinViT` with a `module.` prefix and the blocks' MLP
  named `mlp.fc1` / `mlp.fc2`, which is what `SwinUNETR.load_from` reads; also the `swinViT.` (a
  Swin-UNETR) and `swin_vit.` (research-contributions' SSLHead) layouts.

Adaptations, each reported with the key it made:
- cls tokens are dropped (our encoders have none; the other tokens lose the one they attended to);
- a missing qkv bias becomes zeros (the same function, and our configs have one);
- position embeddings: a table equal to our fixed sin-cos for its token grid is dropped and
  recomputed. One equal to it up to the order of its channels (SelfMedMAE's formula, and so
  GL-MAE's if it is the same, lists the first two axes' blocks the other way round from MONAI's) is
  recomputed too, and the encoder's residual channels are permuted to match: the same function,
  with the channels of its output tokens in our order. Any other table is learned: it is kept at its
  grid (`ViTConfig.learned_pos_grid`) or resampled trilinearly to the token grid of `roi`.
- the architecture comes from the shapes (width, depth, patch, channels, MLP ratio; for Swin also
  the depths, heads and window). A ViT's number of heads is not in its weights: `heads`, by default
  that of the published ViT of that width (6, 12, 16, 16 heads at widths 384, 768, 1024, 1280).

Kept apart from the weights: keys a format knows but our encoder has no place for are `dropped`
(decoders, heads, cls tokens, MONAI's unused cross-attention norms), keys no rule knows are
`unexpected`, encoder tensors the file lacks are `missing`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from glmae.models.patches import token_grid
from glmae.models.swin import SwinConfig, swin_encoder
from glmae.models.vit import ViT, ViTConfig, resample_positions, sincos_embedding

FORMATS = ("glmae-paper", "selfmedmae", "monai-swinvit", "monai-vit")
# containers of the state dict, in the order GL-MAE's own loader tries them
CONTAINERS = ("student", "state_dict", "model", "net")
# heads of the published ViTs by width (ViT-S/B/L/H in GL-MAE's and SelfMedMAE's definitions, MONAI's default)
PUBLISHED_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}
POS = "patch_embedding.position_embeddings"  # where every format's position embedding is renamed to
SINCOS_TOL = 1e-4


class NotConvertible(ValueError):
    """The file cannot be read as the format says (the command line reports it as bad input)."""


# ----------------------------------------------------------------------------------------------
# Key rules: (pattern on their key, our key or None to drop it, reason for dropping)

_TIMM = [  # timm's ViT blocks: GL-MAE's and SelfMedMAE's encoders
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embedding.patch_embeddings.\1"),
    (r"blocks\.(\d+)\.(norm[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.linear\2.\3"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]


def _under(prefix: str, rules: list) -> list:
    return [(prefix + pattern, target) for pattern, target in rules]


@dataclass(frozen=True)
class Layout:
    prefix: str  # stripped from every key first (regex, anchored)
    rules: list  # (pattern, our key template)
    drops: list  # (pattern, reason)
    pos_extra_rows: int = 0  # rows of the position table before the patches' (a cls token's)


LAYOUTS = {
    "glmae-paper": Layout(
        prefix=r"(module\.)*(backbone\.)?",
        rules=[*_TIMM, (r"pos_embed", POS)],
        drops=[
            (r"cls_token", "cls token"),
            (r"mask_token|decoder_(embed|pos_embed|blocks|norm|pred)(\..*)?", "MAE decoder"),
            (r"head\..*", "head"),
        ],
        pos_extra_rows=1,
    ),
    "selfmedmae": Layout(
        prefix=r"(module\.)*",
        rules=[*_under(r"encoder\.", _TIMM), (r"encoder_pos_embed", POS)],
        drops=[
            (r"encoder\.cls_token", "cls token"),
            (r"encoder\.head\..*", "head"),
            (r"decoder\..*|decoder_pos_embed|encoder_to_decoder\..*|mask_token", "MAE decoder"),
        ],
    ),
    "monai-vit": Layout(
        prefix=r"(module\.)*(vit\.)?",
        rules=[
            (r"patch_embedding\.patch_embeddings\.(1\.)?(weight|bias)", r"patch_embedding.patch_embeddings.\2"),
            (r"blocks\.(\d+)\.(norm[12]|attn\.qkv|attn\.out_proj|attn\.to_[qkv]|mlp\.linear[12])\.(weight|bias)",
             r"blocks.\1.\2.\3"),
            (r"norm\.(weight|bias)", r"norm.\1"),
            (r"patch_embedding\.position_embeddings", POS),
        ],
        drops=[
            (r"cls_token", "cls token"),
            (r"classification_head\..*", "classification head"),
            (r"blocks\.\d+\.norm_cross_attn\.(weight|bias)", "cross-attention norm, unused without cross-attention"),
            (r"conv3d_transpose(_1)?\.(weight|bias)", "ViTAutoEnc's decoder"),
            (r"(encoder[1-4]|decoder[2-5]|out)\..*", "UNETR's convolutional decoder"),
        ],
    ),
    "monai-swinvit": Layout(
        prefix=r"(module\.)*(swinViT\.|swin_vit\.)?",
        rules=[
            (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
            (r"layers([1-4])\.0\.blocks\.(\d+)\.((norm[12]|attn\.qkv|attn\.proj)\.(weight|bias)|"
             r"attn\.relative_position_bias_table|attn\.relative_position_index)", r"layers\1.0.blocks.\2.\3"),
            (r"layers([1-4])\.0\.blocks\.(\d+)\.mlp\.(?:fc|linear)([12])\.(weight|bias)",
             r"layers\1.0.blocks.\2.mlp.linear\3.\4"),
            (r"layers([1-4])\.0\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", r"layers\1.0.downsample.\2"),
        ],
        drops=[
            (r"(rotation_head|contrastive_head|conv)\..*", "self-supervised heads (SSLHead)"),
            (r"(encoder\d+|decoder\d+|out)\..*", "Swin-UNETR's convolutional decoder"),
        ],
    ),
}


@dataclass
class Report:
    loaded: list[str] = field(default_factory=list)  # our keys, copied from theirs as they are
    adapted: dict[str, str] = field(default_factory=dict)  # our key -> how it was made
    dropped: dict[str, str] = field(default_factory=dict)  # their key -> why our encoder has no place for it
    missing: list[str] = field(default_factory=list)  # our keys the file does not provide
    unexpected: list[str] = field(default_factory=list)  # their keys no rule knows


@dataclass
class Imported:
    encoder: ViTConfig | SwinConfig
    weights: dict[str, torch.Tensor]
    report: Report
    notes: list[str]  # how the architecture was found (what was inferred, what was given)


def state_dict_of(contents) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a loaded file and where they were: the file itself if it is a state dict,
    else the first of `CONTAINERS` it has."""
    if isinstance(contents, dict):
        if contents and all(isinstance(v, torch.Tensor) for v in contents.values()):
            return dict(contents), "the file's top level"
        for key in CONTAINERS:
            inner = contents.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner), f"its {key!r} entry"
    keys = ", ".join(map(repr, list(contents)[:6])) if isinstance(contents, dict) else type(contents).__name__
    raise NotConvertible(f"no state dict in it: expected a dict of tensors or one under {', '.join(CONTAINERS)} "
                         f"(found {keys})")


def rename(state: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str],
                                                               dict[str, str]]:
    """Their state dict -> (tensors under our names, dropped {their key: reason}, unexpected keys,
    {our key: their key})."""
    layout = LAYOUTS[fmt]
    ours, dropped, unexpected, origin = {}, {}, [], {}
    for key, tensor in state.items():
        bare = re.sub("^" + layout.prefix, "", key, count=1)
        target = next((re.sub(p, t, bare) for p, t in layout.rules if re.fullmatch(p, bare)), None)
        if target is not None:
            if target in ours:
                raise NotConvertible(f"{origin[target]!r} and {key!r} both hold {target}")
            ours[target], origin[target] = tensor, key
            continue
        reason = next((r for p, r in layout.drops if re.fullmatch(p, bare)), None)
        if reason is not None:
            dropped[key] = reason
        else:
            unexpected.append(key)
    return ours, dropped, unexpected, origin


def known_keys(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """{format: how many of these keys its rules rename into our encoder}."""
    known = {}
    for fmt in FORMATS:
        try:
            known[fmt] = len(rename(state, fmt)[0])
        except NotConvertible:  # two keys for one of ours: not this format
            known[fmt] = 0
    return known


# ----------------------------------------------------------------------------------------------
# Position embeddings and the residual stream


def channel_permutation(table: torch.Tensor, reference: torch.Tensor, tol: float = SINCOS_TOL) -> torch.Tensor | None:
    """perm (D,) with reference[:, j] == table[:, perm[j]] for every channel j, or None if the
    columns of the (L, D) tables are not the same up to their order."""
    distance = torch.cdist(reference.T.double(), table.T.double()) / math.sqrt(table.shape[0])
    perm = []
    for j in range(reference.shape[1]):  # the nearest unused column: the exact one where columns nearly agree
        match = int(distance[j].argmin())
        if distance[j, match] >= tol:
            return None
        perm.append(match)
        distance[:, match] = math.inf
    return torch.tensor(perm)


def permute_residual(weights: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our ViT's state dict with its residual stream's channels reordered: channel j becomes the old
    channel perm[j]. What writes into the stream (patch embedding, attention output, second MLP
    layer) and the norms are permuted along their output, what reads from it (qkv, first MLP layer)
    along their input; LayerNorm does not depend on the order, so the encoder computes the same
    tokens with their channels reordered."""
    out = {}
    for name, tensor in weights.items():
        if name.endswith((".attn.qkv.weight", ".mlp.linear1.weight")):
            out[name] = tensor[:, perm]
        elif name.endswith((".attn.qkv.bias", ".mlp.linear1.bias")):
            out[name] = tensor
        else:
            out[name] = tensor[perm]
    return out


def cube_grid(length: int) -> tuple[int, int, int] | None:
    side = round(length ** (1 / 3))
    return (side,) * 3 if side**3 == length else None


# ----------------------------------------------------------------------------------------------
# ViT


def _vit(ours: dict[str, torch.Tensor], fmt: str, heads: int | None, img_size, roi, report: Report,
         notes: list[str]) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    key = "patch_embedding.patch_embeddings.weight"
    if key not in ours:
        raise NotConvertible("no patch embedding weight among its tensors")
    patch_w, width = ours[key], ours[key].shape[0]
    pos = ours.pop(POS, None)
    length = None if pos is None else pos.shape[1] - LAYOUTS[fmt].pos_extra_rows
    if pos is not None and (pos.ndim != 3 or pos.shape[2] != width or length < 1):
        raise NotConvertible(f"position embedding of shape {tuple(pos.shape)} for width {width}")

    if patch_w.ndim == 2:  # MONAI's perceptron: Linear(p1·p2·p3·C -> width) on (p1 p2 p3 c)-flattened patches
        if img_size is None or length is None:
            raise NotConvertible("a perceptron patch embedding does not show its patch size: pass --img-size")
        patch = round((math.prod(img_size) / length) ** (1 / 3))
        channels = patch_w.shape[1] // patch**3
        if channels * patch**3 != patch_w.shape[1] or any(s % patch for s in img_size):
            raise NotConvertible(f"--img-size {list(img_size)} with {length} tokens gives no cubic patch "
                                 f"for {patch_w.shape[1]} inputs per token")
        ours[key] = patch_w.reshape(width, patch, patch, patch, channels).permute(0, 4, 1, 2, 3).contiguous()
        report.adapted[key] = "perceptron (Linear on (p1 p2 p3 c) patches) as a Conv3d weight"
    elif patch_w.ndim == 5:  # Conv3d (width, C, px, py, pz): a cube or one side per axis
        channels, patch = patch_w.shape[1], tuple(patch_w.shape[2:])
    else:
        raise NotConvertible(f"{key} has shape {tuple(patch_w.shape)}")

    depth = len({int(m.group(1)) for k in ours if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise NotConvertible("no transformer blocks (blocks.N.*) among its tensors")
    for i in range(depth):  # separate q, k, v -> one qkv (the layout of MONAI's and our attention)
        for kind in ("weight", "bias"):
            parts = [ours.pop(f"blocks.{i}.attn.to_{q}.{kind}", None) for q in "qkv"]
            if all(p is not None for p in parts):
                ours[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
                report.adapted[f"blocks.{i}.attn.qkv.{kind}"] = "to_q, to_k, to_v concatenated"
        qkv = f"blocks.{i}.attn.qkv"
        if f"{qkv}.weight" in ours and f"{qkv}.bias" not in ours:
            ours[f"{qkv}.bias"] = torch.zeros(ours[f"{qkv}.weight"].shape[0], dtype=ours[f"{qkv}.weight"].dtype)
            report.adapted[f"{qkv}.bias"] = "zeros (the file has no qkv bias: the same function)"
    hidden = ours.get("blocks.0.mlp.linear1.weight")
    mlp_ratio = hidden.shape[0] / width if hidden is not None else 4.0

    if heads is None:
        heads = PUBLISHED_HEADS.get(width)
        if heads is None:
            raise NotConvertible(f"the number of attention heads is not in the weights (width {width}): pass --heads")
        notes.append(f"heads {heads}: the published ViT of width {width} (--heads to change)")
    else:
        notes.append(f"heads {heads}: given")

    learned_grid, perm = None, None
    if pos is None:
        report.missing.append(f"{POS} (none in the file: fixed sin-cos used)")
    else:
        table = pos[0, LAYOUTS[fmt].pos_extra_rows:].float()
        if img_size is not None:
            try:
                grid = token_grid(tuple(img_size), patch)
            except ValueError as err:
                raise NotConvertible(f"--img-size: {err}") from None
            if math.prod(grid) != length:
                raise NotConvertible(f"--img-size {list(img_size)} makes {math.prod(grid)} tokens of patch {patch}, "
                                     f"the position embedding has {length}")
        else:
            grid = cube_grid(length)
            if grid is None:
                raise NotConvertible(f"{length} position embeddings are not a cube of tokens: pass --img-size")
        sincos = sincos_embedding(grid, width) if width % 6 == 0 else None
        if sincos is not None and torch.allclose(table, sincos, atol=SINCOS_TOL):
            report.adapted[POS] = f"fixed sin-cos for {_grid(grid)} tokens: recomputed for every input (not stored)"
        elif sincos is not None and (perm := channel_permutation(table, sincos)) is not None:
            report.adapted[POS] = (f"fixed sin-cos for {_grid(grid)} tokens with its channels in another order: "
                                   f"recomputed, the residual channels permuted to match (the same function)")
        else:
            try:
                learned_grid = grid if roi is None else token_grid(tuple(roi), patch)
            except ValueError as err:
                raise NotConvertible(f"--roi: {err}") from None
            ours[POS] = resample_positions(table[None], grid, learned_grid).to(pos.dtype).contiguous()
            how = "kept" if grid == learned_grid else f"resampled trilinearly to {_grid(learned_grid)} (--roi)"
            report.adapted[POS] = f"learned for {_grid(grid)} tokens: {how}"
    cfg = ViTConfig(in_channels=channels, patch_size=patch, width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                    qkv_bias=True, learned_pos_grid=learned_grid)
    if perm is not None:
        permuted = permute_residual({k: v for k, v in ours.items() if k != POS}, perm)
        report.adapted.update({k: "residual channels permuted (see the position embedding)" for k in permuted})
        ours = permuted
    return cfg, ours


def _grid(grid) -> str:
    return "x".join(map(str, grid))


# ----------------------------------------------------------------------------------------------
# Swin


def _swin(ours: dict[str, torch.Tensor], report: Report, notes: list[str]) -> tuple[SwinConfig, dict]:
    key = "patch_embed.proj.weight"
    if key not in ours or ours[key].ndim != 5:
        raise NotConvertible("no Swin patch embedding weight (patch_embed.proj.weight) among its tensors")
    feature, channels, *sides = ours[key].shape
    if len(set(sides)) != 1:
        raise NotConvertible(f"patches of {'x'.join(map(str, sides))} voxels: glmae's Swin takes cubic patches")
    depths, heads, windows = [], [], set()
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in ours if (m := re.match(rf"layers{stage}\.0\.blocks\.(\d+)\.", k))}
        table = ours.get(f"layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            raise NotConvertible(f"no blocks (or no relative position bias table) in stage {stage} (layers{stage})")
        depths.append(len(blocks))
        heads.append(table.shape[1])
        windows.add((round(table.shape[0] ** (1 / 3)) + 1) // 2)  # (2w - 1)³ relative positions
    if len(windows) != 1 or (2 * min(windows) - 1) ** 3 != table.shape[0]:
        raise NotConvertible("the relative position bias tables do not come from one cubic window")
    for name in [k for k in ours if k.endswith(".attn.qkv.weight")]:
        bias = name.replace(".weight", ".bias")
        if bias not in ours:
            ours[bias] = torch.zeros(ours[name].shape[0], dtype=ours[name].dtype)
            report.adapted[bias] = "zeros (the file has no qkv bias: the same function)"
    hidden = ours.get("layers1.0.blocks.0.mlp.linear1.weight")
    cfg = SwinConfig(in_channels=channels, feature_size=feature, depths=tuple(depths), heads=tuple(heads),
                     window=windows.pop(), patch_size=sides[0], qkv_bias=True,
                     mlp_ratio=hidden.shape[0] / feature if hidden is not None else 4.0)
    notes.append("depths, heads and window from the relative position bias tables")
    return cfg, ours


# ----------------------------------------------------------------------------------------------


def convert(fmt: str, state: dict[str, torch.Tensor], heads: int | None = None, img_size=None,
            roi=None) -> Imported:
    """A foreign state dict (see `state_dict_of`) -> our encoder's config and state dict, and the
    report. `heads`: a ViT's attention heads; `img_size`: the input size the weights were trained at
    (default: a cube of tokens); `roi`: the input size whose token grid a learned position table is
    resampled to (default: kept at its own grid)."""
    if fmt not in FORMATS:
        raise NotConvertible(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    ours, dropped, unexpected, origin = rename(state, fmt)
    known = known_keys(state)
    guess = max(known, key=known.get)
    if not ours:
        hint = f" (it looks like --format {guess})" if known[guess] else ""
        raise NotConvertible(f"none of its {len(state)} tensors is a {fmt} encoder key{hint}")
    if known[guess] > known[fmt]:  # a few shared names (a patch embedding, norms) are not this format
        raise NotConvertible(f"only {known[fmt]} of its {len(state)} tensors are {fmt} encoder keys, {known[guess]} "
                             f"are {guess} ones: it looks like --format {guess}")
    report, notes = Report(dropped=dropped, unexpected=unexpected), []
    if fmt == "monai-swinvit":
        cfg, weights = _swin(ours, report, notes)
    else:
        cfg, weights = _vit(ours, fmt, heads, img_size, roi, report, notes)

    with torch.random.fork_rng(devices=[]):  # the encoder only gives names, shapes and computed buffers
        expected = (swin_encoder(cfg) if isinstance(cfg, SwinConfig) else ViT(cfg)).state_dict()
    for name, tensor in list(weights.items()):
        if name not in expected:
            report.unexpected.append(origin.get(name, name))
            del weights[name]
        elif tensor.shape != expected[name].shape:
            raise NotConvertible(f"{origin.get(name, name)} has shape {tuple(tensor.shape)}, the encoder inferred "
                                 f"from its other tensors needs {tuple(expected[name].shape)} for {name}")
    for name, tensor in expected.items():
        if name.endswith("relative_position_index"):  # a buffer the encoder computes from its window
            if name not in weights:
                weights[name] = tensor
                report.adapted[name] = "computed from the window (not in the file)"
            elif not torch.equal(weights[name], tensor):
                raise NotConvertible(f"{origin[name]} differs from the index of a {cfg.window}³ window")
        if name not in weights:
            report.missing.append(name)
    report.loaded = [k for k in weights if k not in report.adapted]
    return Imported(cfg, weights, report, notes)


def summary(report: Report, n: int = 3) -> list[str]:
    """The report as lines: a count per category, a few names, the reasons grouped."""

    def names(keys) -> str:
        keys = list(keys)
        return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")

    def grouped(reasons: dict[str, str]) -> str:
        return "; ".join(f"{reason} ({count})" for reason, count in Counter(reasons.values()).items())

    return [
        f"  loaded     {len(report.loaded):4d}  {names(report.loaded)}",
        f"  adapted    {len(report.adapted):4d}  {grouped(report.adapted)}",
        f"  dropped    {len(report.dropped):4d}  {grouped(report.dropped)}",
        f"  missing    {len(report.missing):4d}  {names(report.missing)}",
        f"  unexpected {len(report.unexpected):4d}  {names(report.unexpected)}",
    ]
