"""The options of ``regtool train``, kept apart from the training code so that building the command line (and
``regtool --help``) does not import torch."""
from __future__ import annotations

import argparse

__all__ = ["add_train_arguments", "LABEL_SIGMA", "MAX_REFINE_STEPS"]

#: the most iterations a refinement takes (``regtool register --refine`` and the plugin's steps box): well past
#: convergence (a 2D pair converges within ~200 iterations, a 3D pair ~300)
MAX_REFINE_STEPS = 2000
#: Gaussian blur (voxels) of the one-hot label maps in the Dice loss
LABEL_SIGMA = 1.0


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``regtool train`` options to ``parser`` (an ``argparse`` parser or sub-parser)."""
    parser.add_argument("--ndim", type=int, choices=(2, 3), default=2, help="2D or 3D model (default 2)")
    parser.add_argument("--steps", type=int, default=10000, help="optimiser steps (default 10000)")
    parser.add_argument("--size", type=int, default=None,
                        help="working grid side, a multiple of 16 (default 128 in 2D, 64 in 3D)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default 4 in 2D, 1 in 3D)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed to lr/10")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data and the initial weights")
    parser.add_argument("--out", default=None, help="output weight file (default ./hypermorph<ndim>d.pt)")
    parser.add_argument("--images", default=None, help="optional folder of real images mixed into training")
    parser.add_argument("--real-fraction", type=float, default=0.5,
                        help="share of steps drawn from --images (default 0.5)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.ckpt if it exists")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (and save) after this many minutes of this run (a resumed run trains this much "
                             "longer); the learning-rate schedule follows it")
    parser.add_argument("--warmup", type=float, default=0.2,
                        help="fraction of the run with a decaying supervised term on the synthetic truth (0 = off)")
    parser.add_argument("--distil-swap", type=float, default=0.0,
                        help="3D: weight of a term that teaches the network's own z output the z it gives with "
                             "z_from_swap, from a frozen copy of the model as the run starts (default 0)")
    parser.add_argument("--label-sigma", type=float, default=LABEL_SIGMA,
                        help="Gaussian blur (voxels) of the label maps in the Dice loss (default 1; 0 = sharp)")
    parser.add_argument("--p-identical", type=float, default=0.05,
                        help="share of pairs showing the same anatomy twice (true displacement 0; default 0.05)")
    parser.add_argument("--init-from", default=None,
                        help="weight file to start from; a 2D file initialises a 3D model by kernel inflation")
    parser.add_argument("--no-variance", action="store_true", help="train without the uncertainty head")
    parser.add_argument("--passes", type=int, default=None,
                        help="network runs of the recursive cascade (default 3 in 2D, 2 in 3D)")
    parser.add_argument("--synth-device", default=None,
                        help="device that makes the synthetic pairs (default: the training device)")
    parser.add_argument("--intensity", choices=("range", "equalised"), default=None,
                        help="how the model maps its input images: equalised (contrast-limited histogram "
                             "equalisation, the default) or range (as given); a resumed checkpoint keeps its own")
    return parser
