"""Argument helpers shared by the sub-commands (so every command spells a flag the same way)."""

from __future__ import annotations

import argparse


def add_device_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None,
                   help="output format (npz, imagefolder, idx, npy, cifar10, ...); default: the input's")
