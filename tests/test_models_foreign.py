"""Foreign state dicts -> our encoders, per format, on state dicts with the published key names and
shapes: MONAI's models are built here (their hidden states must equal ours); GL-MAE's and
SelfMedMAE's are written out below from their model definitions, with a reference forward pass."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from glmae.models.foreign import NotConvertible, channel_permutation, convert, permute_residual, state_dict_of
from glmae.models.swin import swin_encoder
from glmae.models.vit import ViT, ViTConfig, sincos_embedding


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The module with every trainable parameter (not fixed buffers such as a sin-cos table) moved off
    its initial value, so that a tensor loaded into the wrong place shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def ours_from(imported) -> torch.nn.Module:
    build = swin_encoder if imported.encoder.arch == "swin" else ViT
    model = build(imported.encoder).eval()
    model.load_state_dict(imported.weights, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# GL-MAE and SelfMedMAE: their key lists and shapes, written from their model definitions


def timm_blocks(prefix: str, width: int, depth: int, gen) -> dict[str, torch.Tensor]:
    """timm's `Block(dim, num_heads, mlp_ratio=4, qkv_bias=True)` (timm.models.vision_transformer), as
    both GL-MAE and SelfMedMAE build their encoders: norm1, attn.qkv (3D, D) with its bias,
    attn.proj (D, D), norm2, mlp.fc1 (4D, D), mlp.fc2 (D, 4D)."""
    shapes = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
              "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
              "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (4 * width, width),
              "mlp.fc1.bias": (4 * width,), "mlp.fc2.weight": (width, 4 * width), "mlp.fc2.bias": (width,)}
    out = {}
    for i in range(depth):
        for name, shape in shapes.items():
            base = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
            out[f"{prefix}blocks.{i}.{name}"] = base + 0.2 * torch.randn(shape, generator=gen)
    return out


def glmae_paper_state(width=48, depth=2, patch=8, channels=1, grid=(4, 4, 4), pos=None, decoder=True, seed=0):
    """GL-MAE's `VisionTransformer3D` (JiaxinZhuang/GL-MAE, Finetune/models_3dvit.py): `cls_token`
    (1, 1, D), `pos_embed` (1, 1 + L, D), `patch_embed.proj` = Conv3d(C, D, kernel = stride = p), the
    timm blocks, `norm`; with encoder_only=False also its MAE decoder: `decoder_embed` Linear(D, Dd),
    `mask_token` (1, 1, Dd), `decoder_pos_embed` (1, 1 + L, Dd), `decoder_blocks`, `decoder_norm`,
    `decoder_pred` Linear(Dd, p³C)."""
    gen = torch.Generator().manual_seed(seed)
    length = math.prod(grid)
    sd = {"cls_token": torch.randn(1, 1, width, generator=gen),
          "pos_embed": torch.randn(1, 1 + length, width, generator=gen) if pos is None else pos,
          "patch_embed.proj.weight": 0.2 * torch.randn(width, channels, patch, patch, patch, generator=gen),
          "patch_embed.proj.bias": 0.2 * torch.randn(width, generator=gen),
          **timm_blocks("", width, depth, gen),
          "norm.weight": 1 + 0.2 * torch.randn(width, generator=gen),
          "norm.bias": 0.2 * torch.randn(width, generator=gen)}
    if decoder:
        dd = 24
        sd |= {"decoder_embed.weight": torch.randn(dd, width, generator=gen), "decoder_embed.bias": torch.zeros(dd),
               "mask_token": torch.zeros(1, 1, dd), "decoder_pos_embed": torch.zeros(1, 1 + length, dd),
               **{k.replace("blocks.", "decoder_blocks.", 1): v for k, v in timm_blocks("", dd, 1, gen).items()},
               "decoder_norm.weight": torch.ones(dd), "decoder_norm.bias": torch.zeros(dd),
               "decoder_pred.weight": torch.randn(patch**3 * channels, dd, generator=gen),
               "decoder_pred.bias": torch.zeros(patch**3 * channels)}
    return sd


def selfmedmae_state(width=48, depth=2, patch=8, channels=1, grid=(4, 4, 4), seed=0):
    """SelfMedMAE's `MAE3D(MAEViTEncoder, MAEViTDecoder)` (cvlab-stonybrook/SelfMedMAE, lib/models/mae3d.py,
    lib/networks/mae_vit.py, lib/networks/patch_embed_layers.py), pos_embed_type 'sincos':
    `encoder_pos_embed` (1, L, D) and `decoder_pos_embed` (1, L, Dd) from build_3d_sincos_position_embedding
    (num_tokens=0), `encoder.cls_token` (1, 1, D), `encoder.patch_embed.proj` = Conv3d(C, D, p, p) on one
    patch, the timm blocks under `encoder.`, `encoder.norm` (head: Identity, num_classes=0), the decoder's
    blocks, norm and head Linear(Dd, p³C) under `decoder.`, `encoder_to_decoder` Linear(D, Dd),
    `mask_token` (1, 1, Dd) (patch_norm has no affine parameters)."""
    gen = torch.Generator().manual_seed(seed)
    dd, out_chans = 24, patch**3 * channels
    return {"encoder_pos_embed": selfmedmae_sincos(grid, width)[None],
            "decoder_pos_embed": selfmedmae_sincos(grid, dd)[None],
            "encoder.cls_token": torch.randn(1, 1, width, generator=gen),
            "encoder.patch_embed.proj.weight": 0.2 * torch.randn(width, channels, patch, patch, patch, generator=gen),
            "encoder.patch_embed.proj.bias": 0.2 * torch.randn(width, generator=gen),
            **timm_blocks("encoder.", width, depth, gen),
            "encoder.norm.weight": 1 + 0.2 * torch.randn(width, generator=gen),
            "encoder.norm.bias": 0.2 * torch.randn(width, generator=gen),
            **timm_blocks("decoder.", dd, 1, gen),
            "decoder.norm.weight": torch.ones(dd), "decoder.norm.bias": torch.zeros(dd),
            "decoder.head.weight": torch.randn(out_chans, dd, generator=gen),
            "decoder.head.bias": torch.zeros(out_chans),
            "encoder_to_decoder.weight": torch.randn(dd, width, generator=gen),
            "encoder_to_decoder.bias": torch.zeros(dd), "mask_token": torch.zeros(1, 1, dd)}


def selfmedmae_sincos(grid, width):
    """SelfMedMAE's build_3d_sincos_position_embedding as its definition reads: for token (h, w, d)
    (row-major), [sin(h·ω), cos(h·ω), sin(w·ω), cos(w·ω), sin(d·ω), cos(d·ω)], ω_k = 10000^(-k / (D/6))."""
    omega = 1.0 / 10000 ** (torch.arange(width // 6, dtype=torch.float32) / (width // 6))
    h, w, d = torch.meshgrid(*(torch.arange(g, dtype=torch.float32) for g in grid), indexing="ij")
    parts = []
    for axis in (h, w, d):
        angles = axis.flatten()[:, None] * omega
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def timm_encoder(sd: dict, prefix: str, tokens: torch.Tensor, pos: torch.Tensor, depth: int, heads: int):
    """Their encoders after the patch embedding, as their definitions read, without the cls token:
    x + pos, then per timm Block x + proj(attention(norm1(x))), x + fc2(gelu(fc1(norm2(x)))), then
    norm; LayerNorm eps 1e-6 (norm_layer=partial(nn.LayerNorm, eps=1e-6))."""
    n, length, width = tokens.shape
    x = tokens + pos

    def norm(t, name):
        return F.layer_norm(t, (width,), sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps=1e-6)

    for i in range(depth):
        b = f"blocks.{i}."
        qkv = F.linear(norm(x, b + "norm1"), sd[f"{prefix}{b}attn.qkv.weight"], sd[f"{prefix}{b}attn.qkv.bias"])
        q, k, v = qkv.reshape(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(n, length, width)
        x = x + F.linear(a, sd[f"{prefix}{b}attn.proj.weight"], sd[f"{prefix}{b}attn.proj.bias"])
        h = F.gelu(F.linear(norm(x, b + "norm2"), sd[f"{prefix}{b}mlp.fc1.weight"], sd[f"{prefix}{b}mlp.fc1.bias"]))
        x = x + F.linear(h, sd[f"{prefix}{b}mlp.fc2.weight"], sd[f"{prefix}{b}mlp.fc2.bias"])
    return norm(x, "norm")


def selfmedmae_patch_embed(sd: dict, x: torch.Tensor, patch: int) -> torch.Tensor:
    """SelfMedMAE's path to tokens: patchify_image orders each patch (ph, pw, pd, C); PatchEmbed3D
    (in_chan_last=True) reshapes it back to (C, ph, pw, pd) and applies its Conv3d to the one patch."""
    n, c, *sides = x.shape
    g = [s // patch for s in sides]
    p = x.reshape(n, c, g[0], patch, g[1], patch, g[2], patch).permute(0, 2, 4, 6, 3, 5, 7, 1)
    p = p.reshape(n * math.prod(g), patch, patch, patch, c).permute(0, 4, 1, 2, 3)
    out = F.conv3d(p, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"])
    return out.reshape(n, math.prod(g), -1)


def swapped_axes(width: int) -> torch.Tensor:
    """Our channel j is SelfMedMAE's channel perm[j]: MONAI's sin-cos (ours) lists the blocks of axes
    (1, 0, 2), SelfMedMAE's (0, 1, 2), each block 2·D/6 channels (sin, cos)."""
    b = width // 3
    return torch.cat([torch.arange(b, 2 * b), torch.arange(0, b), torch.arange(2 * b, width)])


def test_selfmedmae_sincos_encoder_computes_what_theirs_computes_without_its_cls_token():
    sd = selfmedmae_state()
    state = {"epoch": 1000, "arch": "vit_base", "state_dict": sd,
             "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
             "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12}}
    tensors, where = state_dict_of(state)
    assert "state_dict" in where
    imported = convert("selfmedmae", tensors, heads=4, img_size=(32, 32, 32))
    report = imported.report
    assert report.missing == [] and report.unexpected == []
    assert set(report.dropped) == set(sd) - {k for k in sd if k.startswith("encoder.") and "cls" not in k} - {
        "encoder_pos_embed"}
    assert "channels in another order" in report.adapted["patch_embedding.position_embeddings"]
    cfg = imported.encoder
    assert (cfg.width, cfg.depth, cfg.heads, cfg.patch_size, cfg.in_channels, cfg.mlp_ratio, cfg.learned_pos_grid) == (
        48, 2, 4, 8, 1, 4.0, None)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        theirs = timm_encoder(sd, "encoder.", selfmedmae_patch_embed(sd, x, 8), sd["encoder_pos_embed"], 2, 4)
        ours, _ = ours_from(imported)(x)
    torch.testing.assert_close(ours, theirs[..., swapped_axes(48)], rtol=1e-4, atol=2e-4)


def test_glmae_paper_release_with_a_sincos_or_a_learned_position_embedding():
    x = torch.randn(1, 1, 32, 32, 32)
    table = selfmedmae_sincos((4, 4, 4), 48)
    for pos, learned in [(torch.cat([torch.zeros(1, 48), table])[None], False), (None, True)]:
        sd = glmae_paper_state(pos=pos)
        release = {"student": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 1599}
        tensors, where = state_dict_of(release)
        assert "student" in where
        imported = convert("glmae-paper", tensors, heads=4)
        report = imported.report
        assert report.missing == [] and report.unexpected == []
        decoder = {f"module.backbone.{k}" for k in sd if k.startswith(("decoder_", "mask_token"))}
        assert set(report.dropped) == decoder | {"module.backbone.cls_token"}
        assert (imported.encoder.learned_pos_grid is not None) == learned
        with torch.no_grad():
            tokens = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8)
            theirs = timm_encoder(sd, "", tokens.flatten(2).transpose(1, 2), sd["pos_embed"][:, 1:], 2, 4)
            ours, _ = ours_from(imported)(x)
        expected = theirs if learned else theirs[..., swapped_axes(48)]
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=2e-4)


def test_vit_b_heads_default_to_the_published_ones_and_other_widths_need_them():
    sd = glmae_paper_state(width=768, depth=1, patch=16, grid=(2, 2, 2), decoder=False)
    assert convert("glmae-paper", sd).encoder.heads == 12
    with pytest.raises(NotConvertible, match="pass --heads"):
        convert("glmae-paper", glmae_paper_state(decoder=False))


# ----------------------------------------------------------------------------------------------
# MONAI's ViT, UNETR and ViTAutoEnc, built here


def monai_vit(**kw):
    from monai.networks.nets import ViT as MonaiViT

    args = dict(in_channels=2, img_size=(32, 32, 16), patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2,
                num_heads=4) | kw
    return randomised(MonaiViT(**args))


def split_qkv(vit) -> None:
    """MONAI's attention with separate to_q, to_k, to_v (SABlock(use_combined_linear=False)), holding
    the same weights."""
    from monai.networks.blocks.selfattention import SABlock

    for block in vit.blocks:
        old = block.attn
        new = SABlock(48, 4, qkv_bias=old.qkv.bias is not None, use_combined_linear=False)
        with torch.no_grad():
            for name, w in zip(("to_q", "to_k", "to_v"), old.qkv.weight.chunk(3)):
                getattr(new, name).weight.copy_(w)
            new.out_proj.load_state_dict(old.out_proj.state_dict())
        block.attn = new.eval()


@pytest.mark.parametrize("variant", ["learnable", "sincos", "perceptron", "separate qkv", "per-axis patch"])
def test_monai_vit_hidden_states_are_reproduced(variant):
    kw = {"learnable": {}, "sincos": {"pos_embed_type": "sincos"}, "perceptron": {"proj_type": "perceptron"},
          "separate qkv": {"qkv_bias": True}, "per-axis patch": {"patch_size": (8, 4, 8)}}[variant]
    theirs = monai_vit(**kw)
    if variant == "separate qkv":
        split_qkv(theirs)
    sd = theirs.state_dict()
    assert any(".attn.to_q.weight" in k for k in sd) == (variant == "separate qkv")
    imported = convert("monai-vit", sd, heads=4, img_size=(32, 32, 16))
    report = imported.report
    assert report.missing == [] and report.unexpected == []
    assert set(report.dropped) == {f"blocks.{i}.norm_cross_attn.{p}" for i in range(2) for p in ("weight", "bias")}
    assert (imported.encoder.learned_pos_grid is None) == (variant == "sincos")
    assert imported.encoder.patch_size == ((8, 4, 8) if variant == "per-axis patch" else 8)
    x = torch.randn(2, 2, 32, 32, 16)
    with torch.no_grad():
        tokens, hidden = theirs(x)
        ours, our_hidden = ours_from(imported)(x, out_blocks=(0, 1))
    torch.testing.assert_close(ours, tokens, rtol=1e-4, atol=1e-4)
    for a, b in zip(our_hidden, hidden):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_learned_table_is_resampled_trilinearly_to_the_roi():
    sd = monai_vit().state_dict()
    imported = convert("monai-vit", sd, heads=4, img_size=(32, 32, 16), roi=(64, 32, 16))
    assert imported.encoder.learned_pos_grid == (8, 4, 2)
    table = sd["patch_embedding.position_embeddings"][0].T.reshape(1, 48, 4, 4, 2)
    expected = F.interpolate(table, size=(8, 4, 2), mode="trilinear", align_corners=False).reshape(48, 64).T
    torch.testing.assert_close(imported.weights["patch_embedding.position_embeddings"][0], expected)
    assert "resampled trilinearly to 8x4x2" in imported.report.adapted["patch_embedding.position_embeddings"]


def test_unetr_vit_and_the_tutorials_vitautoenc():
    from monai.networks.nets import UNETR, ViTAutoEnc

    unetr = randomised(UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96,
                             num_heads=4))
    imported = convert("monai-vit", {f"module.{k}": v for k, v in unetr.state_dict().items()}, heads=4)
    assert imported.report.missing == [] and imported.report.unexpected == []
    assert "UNETR's convolutional decoder" in imported.report.dropped.values()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours_from(imported)(x)[0], unetr.vit(x)[0], rtol=1e-4, atol=1e-4)

    auto = randomised(ViTAutoEnc(in_channels=1, img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2,
                                 num_heads=4))
    imported = convert("monai-vit", {"state_dict": auto.state_dict()}["state_dict"], heads=4)
    assert imported.report.missing == [] and imported.report.unexpected == []
    assert sorted(k for k, why in imported.report.dropped.items() if why == "ViTAutoEnc's decoder") == [
        "conv3d_transpose.bias", "conv3d_transpose.weight", "conv3d_transpose_1.bias", "conv3d_transpose_1.weight"]
    with torch.no_grad():
        _, hidden = auto(x)
        _, ours = ours_from(imported)(x, out_blocks=(1,))
    torch.testing.assert_close(ours[0], hidden[1], rtol=1e-4, atol=1e-4)


def test_a_classification_vit_loses_its_cls_token_and_head():
    imported = convert("monai-vit", monai_vit(classification=True, num_classes=3).state_dict(), heads=4,
                       img_size=(32, 32, 16))
    dropped = imported.report.dropped
    assert dropped["cls_token"] == "cls token" and dropped["classification_head.0.weight"] == "classification head"
    assert imported.report.unexpected == []


# ----------------------------------------------------------------------------------------------
# MONAI's Swin-UNETR self-supervised weights


def release_layout(swin_vit_state: dict) -> dict:
    """`model_swinvit.pt`'s layout, as MONAI's SwinUNETR.load_from reads it: under `state_dict`, the
    swinViT keys with a `module.` prefix and the blocks' MLP as `mlp.fc1` / `mlp.fc2`."""
    return {"state_dict": {f"module.{k}".replace(".mlp.linear", ".mlp.fc"): v for k, v in swin_vit_state.items()}}


def test_monai_swinvit_release_layout_loads_what_load_from_loads_and_computes_the_same():
    from monai.networks.nets import SwinUNETR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomised(SwinUNETR(in_channels=1, out_channels=2, feature_size=12, window_size=7))
        reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, window_size=7)
    release = release_layout(theirs.swinViT.state_dict())
    reference.load_from(release)  # MONAI's own reader: fails on a key name it does not know
    imported = convert("monai-swinvit", state_dict_of(release)[0])
    report = imported.report
    assert report.missing == report.unexpected == [] and not report.dropped and not report.adapted
    cfg = imported.encoder
    assert (cfg.feature_size, cfg.depths, cfg.heads, cfg.window, cfg.patch_size) == (12, (2,) * 4, (3, 6, 12, 24), 7, 2)
    expected = reference.swinViT.state_dict()
    assert imported.weights.keys() == expected.keys()
    assert all(torch.equal(imported.weights[k], expected[k]) for k in expected)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours_from(imported)(x), theirs.swinViT(x)):
            torch.testing.assert_close(a, b)


def test_swin_from_research_contributions_sslhead_and_a_whole_swin_unetr():
    from monai.networks.nets import SwinUNETR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, window_size=4)
    encoder = net.swinViT.state_dict()
    ssl = {f"module.swin_vit.{k}": v for k, v in encoder.items()} | {
        "module.rotation_head.weight": torch.zeros(4, 192), "module.contrastive_head.bias": torch.zeros(512),
        "module.conv.0.weight": torch.zeros(96, 192, 3, 3, 3)}
    for state in (ssl, net.state_dict()):
        imported = convert("monai-swinvit", state)
        assert imported.report.missing == [] and imported.report.unexpected == []
        assert imported.report.dropped and len(imported.weights) == len(encoder)
        assert all(torch.equal(imported.weights[k], encoder[k]) for k in encoder)


# ----------------------------------------------------------------------------------------------
# The pieces


def test_permuting_the_residual_stream_permutes_the_output_channels_only():
    torch.manual_seed(0)
    vit = randomised(ViT(ViTConfig(patch_size=8, width=24, depth=2, heads=2)))
    perm = torch.randperm(24)
    moved = ViT(vit.cfg).eval()
    moved.load_state_dict(permute_residual(vit.state_dict(), perm))
    x = torch.randn(1, 1, 16, 16, 16)
    # the position embedding is added before the blocks: feed both the same tokens by reordering it
    with torch.no_grad():
        tokens = vit.patch_embedding.patch_embeddings(x).flatten(2).transpose(1, 2)
        pos = sincos_embedding((2, 2, 2), 24)
        a = vit.norm(_blocks(vit, tokens + pos))
        b = moved.norm(_blocks(moved, (tokens + pos)[..., perm]))
    torch.testing.assert_close(b, a[..., perm], rtol=1e-5, atol=1e-5)


def _blocks(vit, x):
    for block in vit.blocks:
        x = block(x)
    return x


def test_channel_permutation_finds_the_order_or_none():
    ours = sincos_embedding((3, 4, 2), 24)
    perm = torch.randperm(24)
    found = channel_permutation(ours[:, perm], ours)
    torch.testing.assert_close(ours[:, perm][:, found], ours)
    assert channel_permutation(ours + 0.01, ours) is None


@pytest.mark.parametrize("fmt, state, message", [
    ("monai-vit", {"module.layers1.0.blocks.0.mlp.fc1.weight": torch.zeros(4, 2)}, "looks like --format monai-swinvit"),
    ("monai-swinvit", {"patch_embed.proj.weight": torch.zeros(12, 1, 2, 2, 1)}, "cubic patches"),
    ("monai-vit", {"patch_embedding.patch_embeddings.weight": torch.zeros(48, 1, 8, 8, 8),
                   "patch_embedding.position_embeddings": torch.zeros(1, 10, 48),
                   "blocks.0.norm1.weight": torch.ones(48)}, "pass --img-size"),
    ("glmae-paper", {"patch_embed.proj.weight": torch.zeros(48, 1, 8, 8, 8)}, "no transformer blocks"),
    ("glmae-paper", {"patch_embed.proj.weight": torch.zeros(12, 1, 2, 2, 2), "patch_embed.proj.bias": torch.zeros(12),
                     "layers1.0.blocks.0.norm1.weight": torch.ones(12)},
     "only 2 of its 3 tensors are glmae-paper encoder keys, 3 are monai-swinvit ones"),
])
def test_what_cannot_be_read_is_refused_with_the_reason(fmt, state, message):
    with pytest.raises(NotConvertible, match=message):
        convert(fmt, state, heads=4)


def test_a_file_without_a_state_dict_is_refused():
    with pytest.raises(NotConvertible, match="no state dict"):
        state_dict_of({"epoch": 3, "args": None})
