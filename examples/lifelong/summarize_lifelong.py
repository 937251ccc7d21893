"""Print the markdown table of several ``run_lifelong.py`` runs (one row per results.json).

python examples/lifelong/summarize_lifelong.py out/lifelong_cpu/*/results.json
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lifelong_metrics import format_table, load_results


def main(argv: Sequence[str] | None = None) -> str:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        raise SystemExit("usage: summarize_lifelong.py RESULTS.json [RESULTS.json ...]")
    table = format_table(load_results(paths))
    print(table)
    return table


if __name__ == "__main__":
    main()
