"""Baseline weights-as-data analyses of a zoo: probes on fixed seed splits, figures, analysis.json.

    python scripts/analyze.py outputs/zoo --out outputs/analysis/report
    python scripts/analyze.py outputs/releases/MLDS-DS1-100 --out report --features raw,stats --no-tsne

Writes <out>/analysis.json and PNG figures and prints a summary table (see mlds/analysis/report.py
for the JSON layout). Exit status 0, or 2 when the zoo cannot be read (no networks, conflicting keys).
"""
import sys

from mlds.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
