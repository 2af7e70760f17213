"""The bench's outputs: the table, the plot and the JSON/CSV files."""
from __future__ import annotations

from pathlib import Path

from .settings import row_key, UNSTABLE_SPREAD


# ---------------------------------------------------------------------------------------- output

def format_table(report: dict) -> str:
    """The short table printed last: one line per backend and batch, then one per failed backend."""
    lines = [f"{'backend':<18} {'prec':<5} {'batch':>5} {'ms/fwd':>9} {'img/s@250':>10} {'img/s@50':>9} "
             f"{'img/s@dpm10':>11} {'%fp16':>6} {'x eager':>8} {'x ort32':>8} {'spread':>7}"]
    for r in report["results"]:
        pct = f"{r['pct_fp16_matmul_peak']:.1f}" if r["pct_fp16_matmul_peak"] is not None else "-"
        ratio = f"{r['speedup_vs_torch_eager']:.2f}" if r["speedup_vs_torch_eager"] is not None else "-"
        ort32 = r.get("speedup_vs_onnxruntime_fp32")
        ort32 = f"{ort32:.2f}" if ort32 is not None else "-"
        lines.append(f"{r['backend']:<18} {r['precision']:<5} {row_key(r['batch'], r['guided']):>5} "
                     f"{r['ms_per_forward']:>9.3f} {r['images_per_s_250']:>10.3g} {r['images_per_s_50']:>9.3g} "
                     f"{r['images_per_s_dpmpp_2m_10']:>11.3g} {pct:>6} {ratio:>8} {ort32:>8} "
                     f"{100 * r['spread']:>5.0f} %{'!' if r['spread'] > UNSTABLE_SPREAD else ''}")
    for failed in report.get("failed", []):
        lines.append(f"{failed['backend']:<18} FAILED: {failed['error']}")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> str | None:
    """ms per forward and images/s (250 steps) against batch, one line per backend; None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ditexport[plot]')"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["backend"] for r in report["results"]):
        rows = [r for r in report["results"] if r["backend"] == name and r["guided"]]
        if not rows:
            continue
        left.plot([r["batch"] for r in rows], [r["ms_per_forward"] for r in rows], marker="o", label=name)
        right.plot([r["images_per_forward"] for r in rows], [r["images_per_s_250"] for r in rows], marker="o",
                   label=name)
    from matplotlib.ticker import ScalarFormatter

    for ax, title, ylabel in ((left, "time per forward (guided batches)", "ms per forward"),
                              (right, "throughput, 250-step guided sampling", "images / s")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_xlabel("forward batch (2 rows per image)")
    right.set_xlabel("images per forward")
    where = report["machine"]["gpu"] or f"CPU, {report['machine']['cpu_threads']} threads"
    fig.suptitle(f"{report['model']['source']} on {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(report: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path | None, str | None]:
    """The JSON report and the PNG plot (when matplotlib exists) in `out_dir`."""
    from ..artifacts import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out_dir / f"{stem}.json", report)
    png_path = out_dir / f"{stem}.png"
    note = write_plot(report, png_path)
    return json_path, (None if note else png_path), note
