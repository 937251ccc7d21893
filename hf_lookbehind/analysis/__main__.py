"""``python -m hf_lookbehind.analysis TOOL [options]``, TOOL one of sharpness, noise, curves,
tradeoff, sweep, compute."""

import sys

from . import cli

TOOLS = {
    "sharpness": cli.sharpness_main,
    "noise": cli.noise_main,
    "curves": cli.curves_main,
    "tradeoff": cli.tradeoff_main,
    "sweep": cli.sweep_main,
    "compute": cli.compute_main,
}

if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
    sys.exit(f"usage: python -m hf_lookbehind.analysis {{{','.join(TOOLS)}}} [options]")
TOOLS[sys.argv[1]](sys.argv[2:])
