"""N-channel images for a screen (mae_core/composite.py): grayscale, an RGB composite of the
chosen channels, a percentile stretch for a dim image, 8-bit RGB left as it is, and the display
channels field refused with the reason."""

from __future__ import annotations

import pytest
import torch

from mae_core.composite import View, fit, parse_view
from mae_core.config import ConfigError


def test_display_gray_composite_and_stretch():
    image = torch.rand(4, 8, 8) * 0.1 + 0.2  # a dim image: 0.2–0.3 of full scale
    gray = fit(image[:1], View(), bits=16)(image[:1])
    assert gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[2])
    assert gray.min() == 0 and gray.max() == 1  # stretched 1st–99th percentile to black–white
    composite = fit(image, parse_view("4,3,2", 4, "none"))(image)
    assert torch.equal(composite, image[[3, 2, 1]])
    rgb = torch.rand(3, 8, 8)
    assert torch.equal(fit(rgb, View(), bits=8)(rgb), rgb)  # 8-bit RGB: unchanged
    with pytest.raises(ConfigError, match="display channels: give one channel .* numbered 1 to 4"):
        parse_view("5", 4)
    with pytest.raises(ConfigError, match="display channels"):
        parse_view("1,2", 4)
