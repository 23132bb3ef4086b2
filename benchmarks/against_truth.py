"""A calibrate run beside the synthetic patient's truth: relative errors of γ, ρ, κ and max|u|.

    python benchmarks/against_truth.py OUT/report.json PATIENT/ground_truth.json [--name P1]

prints one markdown row per atlas and one for the mean over the atlases kept (the README's
*Accuracy* rows), with the truth's values, the recovered ones and eγ, eρ, eκ, eu in %
(signed: + over, − under) and the parameters S.3 left on a bound. Several pairs may be
given (REPORT TRUTH REPORT TRUTH ...); the table header is printed once.
"""
from __future__ import annotations

import argparse
import json
import pathlib

KEYS = (("gamma", "γ", "{:.3f}"), ("rho", "ρ", "{:.2f}"), ("kappa", "κ", "{:.4f}"), ("max_u_mm", "max\\|u\\| mm", "{:.2f}"))
SYMBOL = {k: label for k, label, _ in KEYS}


def relative_error(value, truth) -> str:
    """(value − truth)/truth in %, signed; 'abs' difference when the truth is 0 (TC(a))."""
    if value is None:
        return "—"
    if truth == 0:
        return f"{value - truth:+.3f} abs"
    return f"{100.0 * (value - truth) / truth:+.1f}%"


def rows(report: dict, truth: dict, name: str) -> list[str]:
    """Markdown rows: each atlas of the report, then the mean over the atlases kept."""
    out = []
    entries = [(e["name"] + (" (dropped)" if e.get("dropped") else ""), e, e.get("at_bounds") or {})
               for e in report["atlases"]]
    entries.append(("mean", report["mean"], (report.get("summary") or {}).get("at_bounds") or {}))
    for atlas, values, bounds in entries:
        got = " / ".join(fmt.format(values[k]) if values.get(k) is not None else "—" for k, _, fmt in KEYS)
        errs = " | ".join(relative_error(values.get(k), truth[k]) for k, _, _ in KEYS)
        # an atlas: {name: side}; the summary: {name: {side: {value, atlases}}}
        b = ", ".join(f"{SYMBOL[k]} {side if isinstance(side, str) else '/'.join(side)}" for k, side in bounds.items())
        out.append(f"| {name} | {atlas} | {got} | {errs} | {b or '—'} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="+", type=pathlib.Path, help="REPORT TRUTH [REPORT TRUTH ...]")
    ap.add_argument("--name", action="append", default=None, help="row label per pair (default the patient's folder)")
    a = ap.parse_intermixed_args(argv)  # --name may come between the pairs
    if len(a.pairs) % 2:
        ap.error("give report.json and ground_truth.json in pairs")
    pairs = list(zip(a.pairs[0::2], a.pairs[1::2]))
    # the patient folder (simulate's --out), or the job folder above demo_patient.py's patient/
    names = a.name or [(t.resolve().parent.parent if t.resolve().parent.name == "patient" else t.resolve().parent).name
                       for _, t in pairs]
    if len(names) != len(pairs):
        ap.error("one --name per pair")
    print("| patient | atlas | " + " / ".join(lbl for _, lbl, _ in KEYS) + " recovered | eγ | eρ | eκ | eu | on a bound |")
    print("|---|---|---|---|---|---|---|---|")
    for (report_path, truth_path), name in zip(pairs, names):
        report = json.loads(report_path.read_text(encoding="utf-8"))
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        t = " / ".join(fmt.format(truth[k]) for k, _, fmt in KEYS)
        print(f"| {name} | truth | {t} | | | | | |")
        print("\n".join(rows(report, truth, name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
