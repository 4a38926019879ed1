"""``python -m surgery_kernels build``: build the C++/CUDA extension now and print what was built
and where (a CUDA build that failed in an earlier process is tried again). ``python -m
surgery_kernels info``: print ``available_backends()`` for each device type."""

from __future__ import annotations

import argparse
import sys

import torch


def _build(args) -> int:
    from . import _build as build
    from .backends import extension

    # asked for by hand: try a CUDA build that an earlier process recorded as failed
    result = build.load(verbose=args.verbose, retry_cuda=True)
    if not result.ok:
        print(f"build failed: {result.reason}", file=sys.stderr)
        return 1
    extension.load()
    print(f"built {'CPU + CUDA' if result.cuda else 'CPU only'} extension: {result.library}")
    if not result.cuda:
        print(f"CUDA left out: {result.cuda_reason}", file=sys.stderr)
    print(f"build directory: {result.directory}")
    print("sources:")
    for s in result.sources:
        print(f"  {s}")
    print("ops: " + ", ".join(f"torch.ops.surgery.{n}" for n in ("ce_forward", "ce_backward", "kl_forward",
                                                                 "kl_backward")))
    # a CUDA build that was tried and failed is a failed build (a torch without CUDA, ROCm's
    # included, or a machine without a toolkit builds the CPU part as asked)
    return 1 if result.cuda_failed else 0


def _info(args) -> int:
    from . import __version__
    from .backends import available_backends

    print(f"surgery_kernels {__version__}, torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"{dev}:")
        for name, state in available_backends(dev).items():
            print(f"  {name:7s} {state}")
    return 0


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m surgery_kernels")
    parser.add_argument("--version", action="version", version=f"surgery_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the C++/CUDA extension and print what was built and where")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    b.set_defaults(func=_build)
    i = sub.add_parser("info", help="print which backends are available and why the others are not")
    i.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
