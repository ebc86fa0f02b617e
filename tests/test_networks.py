import math
from dataclasses import replace

import pytest
import torch

from maediff.config import get_preset
from maediff.models.base import count_parameters
from maediff.models.mae import MAE, decoder_to_encoder_map, sincos_pos_embed_2d
from maediff.models.maediff import MAEDiff
from maediff.models.unet import AttentionBlock, UNet, timestep_embedding


def test_paper_unet_parameter_count_matches_reference():
    cfg = get_preset("pddpm-s16")
    n = count_parameters(UNet(cfg.unet, cfg.geometry))
    assert abs(n - 37.5e6) < 0.1e6, n  # pDDPM reference: about 37.5 M


def test_unet_shapes_and_attention_levels():
    cfg = get_preset("tiny")
    cfg = replace(
        cfg, unet=replace(cfg.unet, attention_levels=(2, 4)), mae=replace(cfg.mae, enabled=False)
    )
    net = UNet(cfg.unet, cfg.geometry)
    n_att = sum(isinstance(m, AttentionBlock) for m in net.modules())
    # encoder: 1 per res block at H/2 and H/4; decoder: 2 each; middle: 1
    assert n_att == 1 + 1 + 2 + 2 + 1
    out = net(torch.randn(3, 1, 32, 32), torch.tensor([1, 5, 20]))
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.float32


def test_condition_channels_required_when_configured():
    cfg = get_preset("tiny")
    cfg = replace(cfg, unet=replace(cfg.unet, condition_channels=True))
    net = UNet(cfg.unet, cfg.geometry, cfg.mae)
    vis = torch.ones(2, 16, dtype=torch.bool)
    vis[:, :4] = False
    assert net(
        torch.randn(2, 1, 32, 32), torch.tensor([1, 2]), vis, torch.randn(2, 2, 32, 32)
    ).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="cond"):
        net(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]), vis)


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs]
    torch.testing.assert_close(e[1], torch.tensor(expected))
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_sincos_position_embedding_by_hand():
    pe = sincos_pos_embed_2d(8, 3)
    assert pe.shape == (9, 8)
    # token (row 1, col 2): omega = [1, 1e-2]; row part [sin 1, sin .01, cos 1, cos .01], col part likewise for 2
    row = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    col = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    torch.testing.assert_close(pe[1 * 3 + 2], torch.tensor(row + col))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(6, 3)


def test_decoder_attends_in_u_shape():
    assert decoder_to_encoder_map(12, 8) == [11, 9, 8, 6, 5, 3, 2, 0]
    assert decoder_to_encoder_map(4, 1) == [3]


def test_mae_encoder_sees_only_visible_cells():
    cfg = get_preset("tiny")
    mae = MAE(cfg.mae, 32, cfg.geometry, 64)
    f = torch.randn(2, 32, 8, 8)
    vis = torch.ones(2, 16, dtype=torch.bool)
    vis[0, :4] = False
    vis[1, -4:] = False
    emb = torch.randn(2, 64)
    lat = mae.forward_encoder(mae.patchify(f), vis)
    assert len(lat) == cfg.mae.enc_depth and lat[0].shape == (2, 12, cfg.mae.enc_dim)
    out = mae(f, vis, emb)
    # changing a masked cell's features must not change the encoder latents
    f2 = f.clone()
    f2[0, :, 0:2, 0:2] += 10.0  # cell 0 of sample 0 is masked
    lat2 = mae.forward_encoder(mae.patchify(f2), vis)
    torch.testing.assert_close(lat2[-1], lat[-1])
    assert out.shape == f.shape
    with pytest.raises(ValueError, match="same, non-zero number"):
        mae.forward_encoder(mae.patchify(f), torch.tensor([[True] * 16, [True] * 15 + [False]]))


@pytest.mark.parametrize("mae_on, timestep", [(True, False), (True, True), (False, False)])
def test_every_parameter_gets_a_finite_gradient(mae_on, timestep):
    cfg = get_preset("tiny")
    cfg = replace(
        cfg,
        mae=replace(cfg.mae, enabled=mae_on, timestep=timestep),
        unet=replace(cfg.unet, attention_levels=(4,)),
    )
    torch.manual_seed(0)
    model = MAEDiff(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    # a few steps first: zero-initialised output convs (ADM style) pass gradient
    # upstream only once they are non-zero, one layer of zeros per step
    for _ in range(3):
        opt.zero_grad()
        model.loss(x, g).backward()
        opt.step()
    opt.zero_grad()
    model.loss(x, g).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert (model.net.mae is not None) == mae_on


def test_zero_initialised_mae_branch_starts_as_the_plain_unet():
    from dataclasses import replace as _replace

    from maediff.config import get_preset as _get
    from maediff.models.unet import UNet as _UNet

    cfg = _get("tiny")
    torch.manual_seed(0)
    with_mae = _UNet(cfg.unet, cfg.geometry, _replace(cfg.mae, zero_init=True))
    torch.nn.init.normal_(with_mae.out[-1].weight)  # the U-Net's own output conv starts at 0 too
    plain = _UNet(cfg.unet, cfg.geometry, None)
    plain.load_state_dict(
        {k: v for k, v in with_mae.state_dict().items() if not k.startswith("mae.")}
    )
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 400])
    visible = torch.ones(2, 16, dtype=torch.bool)
    visible[:, :4] = False
    assert torch.equal(with_mae(x, t, visible), plain(x, t))
    torch.manual_seed(0)
    random_init = _UNet(cfg.unet, cfg.geometry, cfg.mae)
    random_init.load_state_dict({**random_init.state_dict(), **plain.state_dict()})
    assert not torch.allclose(random_init(x, t, visible), plain(x, t))  # the paper's init perturbs


def test_up_sampling_blocks_take_the_finer_width_with_up_width_next():
    from maediff.models.unet import ResBlock

    cfg = get_preset("tiny")
    wide, narrow = (
        UNet(replace(cfg.unet, channel_mult=(1, 2, 4), up_width=w), cfg.geometry)
        for w in ("same", "next")
    )
    widths = {
        w: [m.in_conv.out_channels for m in net.modules() if isinstance(m, ResBlock) and m.up]
        for w, net in (("same", wide), ("next", narrow))
    }
    mc = cfg.unet.model_channels
    assert widths == {"same": [4 * mc, 2 * mc], "next": [2 * mc, mc]}
    assert count_parameters(narrow) < count_parameters(wide)
    t = torch.tensor([3, 700])
    assert narrow(torch.randn(2, 1, 32, 32), t).shape == (2, 1, 32, 32)


def test_head_width_is_checked_only_where_attention_runs():
    from maediff.models.unet import UNetConfig

    # 16 channels at full resolution, no attention there: 32-channel heads are fine
    UNetConfig(model_channels=16, channel_mult=(1, 2, 4), num_head_channels=32, norm_groups=8)
    with pytest.raises(ValueError, match="attention at level 1"):
        UNetConfig(
            model_channels=16,
            channel_mult=(1, 2, 4),
            num_head_channels=32,
            norm_groups=8,
            attention_levels=(1, 2),
        )
    with pytest.raises(ValueError, match="up_width"):
        UNetConfig(up_width="half")
