#!/usr/bin/env python
"""The F-Principle spectral probe over the saved checkpoints of a run (docs/analysis.md).

    python tools/analyze_fprinciple.py --run runs/quickstart [--probes 512] [--context 3] \\
        [--per-iteration] [--jacobi 0,1,2,3] [--out DIR]

Same as ``megaponder fprinciple lm``: probes N distinct training contexts with every
checkpoint (and the step-0 model), prints e_low / e_high per kernel width beside the unigram
and bigram baselines, optionally per pondering iteration or per Jacobi pass count of the
last checkpoint. Train with --set train.save_every=N to have several checkpoints.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megaponder.analysis.fprinciple_cli import add_lm_arguments, cmd_lm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lm_arguments(p)
    return cmd_lm(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
