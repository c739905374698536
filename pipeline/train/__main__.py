"""``python -m pipeline.train node ...``: one node of a multi-node run (see :mod:`pipeline.train.nodes`).
The ranks themselves start as ``python -m pipeline.train.worker JOB`` (torchrun's entry)."""

import sys

from pipeline.train.nodes import node_main

if sys.argv[1:2] != ["node"]:
    sys.exit("usage: python -m pipeline.train node --help")
sys.exit(node_main(sys.argv[2:]))
