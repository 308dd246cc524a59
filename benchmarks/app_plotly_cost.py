"""Browser cost of the app's Plotly figures, each drawn alone in the harness's Chromium.

    python benchmarks/app_plotly_cost.py          # → medians of Plotly.newPlot per figure (ms)

A synthetic 28-layer × 9-head threshold table stands in for a calibration run.  Each figure is drawn
5 times after one warm-up round, in turn with the others, so machine noise hits all of them; the
report is the median of the 5.  Used to choose the θ grid's tick spacing (app_speed.md, point 3).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))  # the browser harness the tests use
sys.path.insert(0, str(HERE.parent))
import harness  # noqa: E402

from explorer_ui import figures  # noqa: E402

DRAW = """async ([spec, config]) => {
  const f = JSON.parse(spec), d = document.getElementById('d');
  Plotly.purge(d);
  const t0 = performance.now();
  await Plotly.newPlot(d, f.data, f.layout, config);
  await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  return performance.now() - t0;
}"""


def theta_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [dict(layer=lay, head=h, length=72 + 16 * b, length_lo=65 + 16 * b, length_hi=80 + 16 * b,
                 theta=rng.normal(), count=100, t_std=0.5, t_mean=0.1, extrapolated=False, sigma=0.1)
            for lay in range(2, 30) for h in range(9) for b in range(16)]
    return pd.DataFrame(rows)


def variants() -> dict:
    df = theta_table()
    cells = figures.theta_at_length(df, 180.0)
    grid = figures.theta_grid(cells, 180.0)
    every_layer = copy.deepcopy(grid)
    every_layer.update_layout(yaxis_dtick=1)
    return {"θ grid, a label per layer": every_layer, "θ grid (as drawn)": grid,
            "θ vs length, 4 heads": figures.theta_vs_length(df, 3, [0, 1, 2, 3])}


def main() -> None:
    from playwright.sync_api import sync_playwright

    js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    html = Path(os.environ.get("TMPDIR", "/tmp")) / "plotly_cost.html"
    html.write_text(f"<html><body><div id=d style='width:560px'></div><script>{js.read_text()}</script></body></html>")
    figs = variants()
    times: dict[str, list[float]] = {name: [] for name in figs}
    with sync_playwright() as p:
        browser = harness.launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(html.as_uri())
        for rep in range(6):
            for name, fig in figs.items():
                t = page.evaluate(DRAW, [fig.to_json(), {"responsive": True}])
                if rep:
                    times[name].append(t)
        browser.close()
    for name, ts in times.items():
        print(f"{name:28s} median {np.median(ts):6.1f} ms   {[round(t) for t in ts]}")


if __name__ == "__main__":
    main()
