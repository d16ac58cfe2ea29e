"""Report figures (pgasr.figures): the zoomed window follows the error, figures are written."""

import numpy as np

from pgasr.figures import histogram_figure, panel_figure, zoom_window


def test_zoom_window_is_where_the_error_is():
    err = np.zeros((90, 60), np.float32)
    err[70:76, 8:14] = 1.0
    ys, xs = zoom_window(err, frac=0.3)
    assert ys.stop - ys.start == xs.stop - xs.start == 18
    assert ys.start <= 70 and ys.stop >= 76 and xs.start <= 8 and xs.stop >= 14
    ys, xs = zoom_window(np.ones((20, 20), np.float32))  # flat: a valid window inside
    assert 0 <= ys.start < ys.stop <= 20 and 0 <= xs.start < xs.stop <= 20


def test_panel_and_histogram_figures(tmp_path):
    rng = np.random.default_rng(0)
    hr = rng.random((32, 24)).astype(np.float32)
    rows = [{"lr": hr[::2, ::2], "sr": hr + 0.1, "hr": hr}]
    for zoom in (True, False):
        png = panel_figure(rows, tmp_path / f"p{zoom}.png", error_of="sr", zoom=zoom)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h = histogram_figure({"HR": rng.dirichlet(np.ones(16)), "LR": np.zeros(16)},
                         tmp_path / "h.png")
    assert h.stat().st_size > 5000
