"""Reports of a run: the terminal table, the markdown table and the plots."""

from hessext.bench.methods import METHODS
from hessext.bench.problems import QUANTITIES


def format_table(report):
    lines = [
        f"{'quantity':14s} {'widths':22s} {'N':>6s} {'method':16s} {'median':>11s} {'iqr':>10s} "
        f"{'x hessext':>10s} {'x grad':>8s} {'peak MB':>9s}"
    ]
    for case in report["cases"]:
        for name, e in case["methods"].items():
            if "median_s" in e:
                cols = (
                    f"{e['median_s'] * 1e3:9.3f}ms {e['iqr_s'] * 1e3:8.3f}ms "
                    f"{(e['x_hessext'] or float('nan')):9.2f}x {e['x_gradient']:7.2f}x "
                    f"{(e.get('peak_mb') or float('nan')):9.1f}"
                )
            else:
                cols = f"{e['status']}: {e.get('note', '')}"[:60]
            lines.append(
                f"{case['quantity']:14s} {','.join(map(str, case['widths'])):22s} {case['batch']:6d} {name:16s} {cols}"
            )
    return "\n".join(lines + [""] + [f"note: {n}" for n in report["notes"]])


def _one_line(text, limit=160):
    """Text for one markdown table cell or list item: whitespace collapsed, pipes escaped, cut at limit."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown(report):
    """The report as a markdown table (one row per case and method)."""
    env = report["environment"]
    lines = [
        f"Measured {env['date']} on {env['device']} ({env['threads']} threads), torch {env['torch']}, "
        f"{report['dtype']}, commit {env['git_commit']}; hessext.bench, medians.",
        "",
        "| quantity | widths | N | method | median (ms) | x hessext | x gradient | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for name, e in case["methods"].items():
            if e["status"] == "skipped":
                continue
            timed = "median_s" in e
            note = (
                f"compile {e['compile_s']:.1f} s"
                if "compile_s" in e
                else e.get("note", e["status"] if not timed else "")
            )
            note = _one_line(note)
            lines.append(
                f"| {case['quantity']} | {','.join(map(str, case['widths']))} | {case['batch']} | {name} | "
                + (f"{e['median_s'] * 1e3:.3f} | {e['x_hessext']:.2f} | {e['x_gradient']:.2f}" if timed else "n/a | | ")
                + f" | {note} |"
            )
    return (
        "\n".join(lines + [""] + [f"- {_one_line(n, 240)}" for n in report["notes"] if "for this quantity" not in n])
        + "\n"
    )


def plot(report, path):
    """Time against width (at the largest batch) and against batch size (for the widest
    architecture), log scale, one line per method, one colour per method throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = sorted({c["quantity"] for c in report["cases"]}, key=QUANTITIES.index)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(len(quantities), 2, figsize=(11, 3.6 * len(quantities)), squeeze=False)
    for row, q in enumerate(quantities):
        cases = [c for c in report["cases"] if c["quantity"] == q]
        widest = max(cases, key=lambda c: c["P"])["widths"]
        largest = max(c["batch"] for c in cases)
        panels = (
            (lambda c: max(c["widths"]), f"largest width (N = {largest})", lambda c: c["batch"] == largest),
            (lambda c: c["batch"], f"batch size ({','.join(map(str, widest))})", lambda c: c["widths"] == widest),
        )
        for col, (xkey, xlabel, keep) in enumerate(panels):
            ax = axes[row][col]
            chosen = [c for c in cases if keep(c)]
            for m in METHODS + tuple(sorted({m for c in chosen for m in c["methods"]} - set(METHODS))):
                pts = sorted(
                    (xkey(c), c["methods"][m]["median_s"]) for c in chosen if "median_s" in c["methods"].get(m, {})
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=m, color=colors.get(m))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{q} ({report['dtype']}, {report['environment']['device']})", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
