"""Draws each Grafana dashboard's panels from real Prometheus data.

Input: the JSON files `tests/dashboards.rs` writes when KEYWAY_DASHBOARD_DATA
is set (per panel: title, type, grid position, unit, and the series its
queries returned from a real Prometheus that scraped a running operator and
gateway). Output: one PNG per dashboard, panels laid out on Grafana's
24-column grid. Grafana itself is not available here, so this is a drawing of
the same queries and layout, not a Grafana screenshot.

    python3 scripts/dashboard-pictures.py DATA_DIR OUT_DIR
"""

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]
ROW_UNIT = 0.5  # inches per grid row
WIDTH = 20.0  # inches for 24 columns


def scale(unit: str | None, top: float) -> tuple[float, str]:
    """The factor that brings values up to `top` into a readable unit, and its name."""
    if unit == "Bps":
        for div, name in [(1 << 30, "GiB/s"), (1 << 20, "MiB/s"), (1 << 10, "KiB/s")]:
            if top >= div:
                return 1 / div, name
        return 1, "B/s"
    if unit == "s" and 0 < top < 1:
        return 1000, "ms"
    if unit == "percentunit":
        return 100, "%"
    names = {"cps": "conn/s", "reqps": "req/s", "ops": "ops/s", "short": "", "s": "s"}
    return 1, names.get(unit or "", unit or "")


def right_axis_units(panel: dict) -> dict[str, str]:
    """Series names that an override (Grafana's byName matcher) moves to a
    right-hand axis, with the unit it gives them."""
    out = {}
    for o in panel.get("overrides") or []:
        props = {x["id"]: x["value"] for x in o.get("properties", [])}
        if o.get("matcher", {}).get("id") == "byName" and props.get("custom.axisPlacement") == "right":
            out[o["matcher"]["options"]] = props.get("unit", panel["unit"])
    return out


def plot_series(ax, panel: dict, series: list[dict], start: float) -> None:
    """Lines on `ax`, and on a right-hand axis for the series an override puts there."""
    right = right_axis_units(panel)
    groups = [(ax, panel["unit"], [s for s in series if s["legend"] not in right], "")]
    if any(s["legend"] in right for s in series):
        r = ax.get_position()
        ax.set_position([r.x0, r.y0, r.width - 0.02, r.height])  # room for the right-hand ticks
        twin = ax.twinx()
        twin.tick_params(colors="#8e8e8e", labelsize=7)
        groups.append((twin, next(iter(right.values())), [s for s in series if s["legend"] in right], " (right)"))
    lines = []
    for a, unit, group, suffix in groups:
        # One unit per axis, chosen by its largest value.
        finite = [abs(float(v)) for s in group for _, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
        factor, unit_name = scale(unit, max(finite, default=0))
        for s in group:
            xs = [(float(t) - start) / 60 for t, _ in s["values"]]
            ys = [float(v) * factor for _, v in s["values"]]
            lines += a.plot(xs, ys, color=COLORS[len(lines) % len(COLORS)], linewidth=1.3,
                            label=(s["legend"] or panel["title"]) + suffix)
        if unit_name:
            a.set_ylabel(unit_name, color="#8e8e8e", fontsize=7)
    ax.legend(lines, [x.get_label() for x in lines], loc="upper left", fontsize=7, facecolor=PANEL,
              edgecolor=GRID, labelcolor=TEXT, ncol=2 if len(lines) > 4 else 1)


def draw(data: dict, out: Path) -> None:
    panels = data["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows * ROW_UNIT + 0.8
    fig = plt.figure(figsize=(WIDTH, height), facecolor=BG)
    start = datetime.fromtimestamp(data["start"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    minutes = (data["end"] - data["start"]) / 60
    fig.text(0.01, 1 - 0.35 / height, f"{data['title']}", color=TEXT, fontsize=15, weight="bold", va="center")
    fig.text(0.99, 1 - 0.35 / height,
             f"real scrapes, {minutes:.1f} min from {start} (drawn from the panel queries; not a Grafana screenshot)",
             color="#8e8e8e", fontsize=9, ha="right", va="center")
    top = 1 - 0.7 / height
    gh = (top - 0.01) / rows
    for p in panels:
        g = p["gridPos"]
        left, w = g["x"] / 24 + 0.004, g["w"] / 24 - 0.008
        bottom = top - (g["y"] + g["h"]) * gh + 0.006
        h = g["h"] * gh - 0.012
        if p["type"] == "row":
            fig.text(left, top - g["y"] * gh - gh / 2, p["title"], color=TEXT, fontsize=12, weight="bold", va="center")
            continue
        # Room inside the grid cell for the title, tick labels and unit.
        pad_x, pad_b, pad_t = 0.032, 0.55 / height, 0.3 / height
        fig.patches.append(plt.Rectangle((left, bottom), w, h, transform=fig.transFigure,
                                         facecolor=PANEL, edgecolor=GRID, linewidth=0.6, zorder=-1))
        ax = fig.add_axes([left + pad_x, bottom + pad_b, w - pad_x - 0.006, h - pad_b - pad_t], facecolor=PANEL)
        for side in ax.spines.values():
            side.set_color(GRID)
        ax.set_title(p["title"], color=TEXT, fontsize=10, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        series = [s for s in p["series"] if s["values"]]
        if p["type"] == "stat":
            last = sum(float(s["values"][-1][1]) for s in series)
            ax.text(0.5, 0.45, f"{last:g}", color=COLORS[0], fontsize=34, weight="bold", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if series:
            plot_series(ax, p, series, data["start"])
        else:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
        ax.grid(color=GRID, linewidth=0.5)
        ax.set_xlim(0, minutes)
        ax.set_xlabel("minutes", color="#8e8e8e", fontsize=7)
    fig.savefig(out, dpi=80, facecolor=BG)
    plt.close(fig)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    files = sorted(src.glob("*.json"))
    if not files:
        print(f"no dashboard data in {src}; run `make dashboard-pictures`", file=sys.stderr)
        return 1
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = json.loads(f.read_text())
        out = dst / f"{data['uid']}.png"
        draw(data, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
