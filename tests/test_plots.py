"""Figures: the mosaic an unlabelled grid or a row is drawn from."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vqvae import plots


def test_mosaic_places_each_image_with_white_gaps_and_padding():
    images = np.stack([np.full((20, 10), v, dtype=np.float32) for v in (0.1, 0.2, 0.3)])
    mosaic = plots._mosaic(images, columns=2)
    gap = 1  # round(0.06 * 20)
    assert mosaic.shape == (2 * 20 + gap, 2 * 10 + gap)
    assert (mosaic[:20, :10] == 0.1).all() and (mosaic[:20, 10 + gap:] == 0.2).all()
    assert (mosaic[20 + gap:, :10] == 0.3).all()
    assert (mosaic[:, 10:10 + gap] == 1.0).all() and (mosaic[20:20 + gap] == 1.0).all()
    assert (mosaic[20 + gap:, 10 + gap:] == 1.0).all()  # no fourth image: white
    colour = plots._mosaic(np.zeros((2, 4, 4, 3), dtype=np.float32), columns=2)
    assert colour.shape == (4, 9, 3) and (colour[:, 4] == 1.0).all()


def test_grid_and_rows_draw_dark_images_on_white(tmp_path):
    dark = np.zeros((6, 1, 28, 28), dtype=np.float32)
    for path in (plots.image_grid(dark, tmp_path / "grid.png", columns=4, title="t"),
                 plots.image_rows([dark, dark[:3]], ["a", "b"], tmp_path / "rows.png")):
        pixels = np.asarray(Image.open(path).convert("L"))
        assert (pixels < 30).mean() > 0.2 and (pixels > 225).mean() > 0.05
