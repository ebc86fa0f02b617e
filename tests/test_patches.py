import pytest
import torch

from maediff.config import GeometryConfig
from maediff.diffusion.patches import PatchGrid


def test_paper_geometry_counts():
    g = PatchGrid(GeometryConfig())
    assert g.num_patches == 16 and g.num_cells == 36
    assert g.positions[:5].tolist() == [[0, 0], [0, 16], [0, 32], [0, 48], [16, 0]]
    cells = g.masked_cells()
    assert cells.shape == (16, 36) and (cells.sum(1) == 9).all()
    # patch 5 at (16, 16) covers cell rows 1-3 and cols 1-3
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:4, 1:4] = True
    assert torch.equal(cells[5].view(6, 6), expected)


def test_patch_masks():
    g = PatchGrid(GeometryConfig(image_size=32, patch_size=16, stride=8, grid_size=8))
    m = g.patch_masks()
    assert m.shape == (9, 1, 32, 32) and (m.sum(dim=(1, 2, 3)) == 256).all()
    assert m[4, 0, 8:24, 8:24].all() and m[4].sum() == 256
    cov = g.coverage()[0]
    assert cov[0, 0] == 1 and cov[8, 8] == 4 and cov[16, 0] == 2


def test_stitch_of_split_gives_image_back():
    g = PatchGrid(GeometryConfig())
    x = torch.randn(2, 1, 96, 96)
    torch.testing.assert_close(g.stitch(g.extract(x)), x)


def test_stitch_averages_overlaps_by_hand():
    g = PatchGrid(GeometryConfig(image_size=32, patch_size=16, stride=8, grid_size=8))
    # patch k filled with the value k: a pixel covered by patches {0, 1} averages to 0.5
    patches = torch.arange(9.0).view(1, 9, 1, 1, 1).expand(1, 9, 1, 16, 16)
    out = g.stitch(patches)[0, 0]
    assert out[0, 0] == 0
    assert out[0, 8] == pytest.approx(0.5)
    assert out[8, 8] == pytest.approx((0 + 1 + 3 + 4) / 4)
    assert out[31, 31] == 8


def test_crop_matches_extract():
    g = PatchGrid(GeometryConfig(image_size=32, patch_size=16, stride=8, grid_size=8))
    x = torch.randn(5, 1, 32, 32)
    k = torch.tensor([0, 4, 8, 2, 6])
    ext = g.extract(x)
    torch.testing.assert_close(g.crop(x, k), ext[torch.arange(5), k])


def test_wrong_sizes():
    g = PatchGrid(GeometryConfig(image_size=32, patch_size=16, stride=8, grid_size=8))
    with pytest.raises(ValueError, match="32x32"):
        g.extract(torch.zeros(1, 1, 48, 48))
    with pytest.raises(ValueError, match="patches"):
        g.stitch(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="stride s=12"):
        PatchGrid(GeometryConfig(stride=12))
