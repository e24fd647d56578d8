import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from lightning_modules.components.anomaly_map import gaussian_blur_maps


@pytest.mark.parametrize(("sigma", "size"), [(4.0, (40, 37)), (1.5, (16, 16)), (0.6, (9, 12))])
def test_separable_blur_is_the_2d_gaussian_blur(sigma, size):
    """Row pass then column pass = torchvision's 2-D Gaussian blur (same kernel side, reflected borders)."""
    maps = torch.rand(3, 1, *size, generator=torch.Generator().manual_seed(0)) * 50
    side = 2 * int(4 * sigma + 0.5) + 1
    expected = gaussian_blur(maps, [side, side], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur_maps(maps, sigma), expected, rtol=1e-5, atol=1e-5 * 50)


def test_separable_blur_keeps_a_constant_map():
    maps = torch.full((2, 1, 40, 40), 3.25)
    torch.testing.assert_close(gaussian_blur_maps(maps, 4.0), maps)
