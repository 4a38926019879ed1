"""``surgery`` command line.

    surgery train CONFIG.yaml [--set key=value ...] [--resume]   train (torchrun for FSDP), write output_dir
    surgery eval CONFIG.yaml [--set key=value ...]               evaluate the configured model only
    surgery demo [ARGS ...]                                       the embedded benchmark (surgery.demo)

Errors in the config or the data are printed as one line (``surgery: error: ...``) with exit code 2.
Ctrl-C or SIGTERM while training stops at the end of the step after a checkpoint (``--resume``
continues), prints where it is and the command that continues, and ends the process by that signal
(``main(argv)`` called from Python returns 128 + its number instead); a second Ctrl-C stops at
once, and Ctrl-C outside the steps (loading, the reference cache, an evaluation, the final save)
too, with the same message and no traceback. A package of an optional extra that is not installed
(``pip install surgery-kernels`` alone has none) is named with the extra that brings it, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path


# The imports of the optional extras (pyproject's [project.optional-dependencies]) the commands need.
_EXTRA_OF = {"yaml": "hf", "transformers": "hf", "datasets": "hf", "tqdm": "hf", "safetensors": "hf",
             "peft": "hf", "matplotlib": "hf", "gguf": "demo", "accelerate": "demo"}


def _missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """The one-line error for a missing package of an extra, or None for any other import error."""
    top = (exc.name or "").partition(".")[0]
    extra = _EXTRA_OF.get(top)
    if extra is None or exc.name != top:
        # a missing submodule of an installed package is a version mismatch, not a missing extra
        return None
    extras = "hf,demo" if command == "demo" else extra
    return (f"surgery: error: surgery {command} needs the package {top!r}, which is not installed: pip install "
            f"'surgery-kernels[{extras}]' (or, in a checkout, pip install --no-build-isolation -e '.[{extras}]')")


def _parser() -> argparse.ArgumentParser:
    from surgery_kernels import __version__

    p = argparse.ArgumentParser(prog="surgery", description="LLM Surgery with fused linear losses")
    p.add_argument("--version", action="version", version=f"surgery (surgery-kernels) {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model on the config's streams")
    t.add_argument("config", help="YAML config (see examples/configs/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=10 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    e = sub.add_parser("eval", help="evaluate the configured model on the config's eval sets")
    e.add_argument("config", help="YAML config: its model and eval sets are used (stream files need not exist)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.path=runs/x/final (repeatable)")
    sub.add_parser("demo", help="the embedded end-to-end benchmark (surgery demo --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        try:
            import surgery.demo as demo
        except ImportError as exc:
            msg = _missing_extra(exc, "demo") if isinstance(exc, ModuleNotFoundError) else None
            print(msg or f"surgery: error: the demo module is not installed in this build ({exc})", file=sys.stderr)
            return 2
        try:
            return demo.main(argv[1:]) or 0
        except ModuleNotFoundError as exc:
            msg = _missing_extra(exc, "demo")
            if msg is None:
                raise
            print(msg, file=sys.stderr)
            return 2
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .distributed import shutdown

    try:
        rc = _run(args)
    except ModuleNotFoundError as exc:
        msg = _missing_extra(exc, args.command)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        rc = 2
    finally:
        shutdown()
    if as_command and rc - 128 in (signal.SIGINT, signal.SIGTERM):
        # Interrupted (the checkpoint is saved, the message printed): die of the signal, so that a
        # shell running us in a loop stops too, as it would for a process that did not catch it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(rc - 128, signal.SIG_DFL)
        os.kill(os.getpid(), rc - 128)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: on CPU runs of 2 gloo ranks it
        # aborted one rank in about 1 of 8 runs *after* a complete, saved run ('terminate called
        # without an active exception'), turning success into a failed job.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(args) -> int:
    from . import from_config, load_config
    from .trainer import NonFiniteLossError, TrainingInterrupted, check_output_dir

    resume_with = None
    try:
        cfg = load_config(args.config, args.overrides, evaluate_only=args.command == "eval")
        if args.command == "eval":
            if not cfg.eval:
                raise ValueError(f"{args.config} has no eval sets: nothing to evaluate (add a section "
                                 f"eval: [{{name: ..., data: FILE}}])")
            # The streams are not read: a trained model is evaluated without its training data.
            run = from_config(cfg)
            out = run.evaluate()
            if run.dist.main:
                print(json.dumps(out, indent=2))
            return 0
        if cfg.output_dir is None:
            # The Python API may train a model object in place without writing anything; a command
            # that trains would keep nothing (no metrics, checkpoint or final model).
            raise ValueError("output_dir is not set: surgery train would train and then save nothing; set "
                             "output_dir in the config or add --set output_dir=DIR")
        # before the model loads (minutes at 7B): an output_dir that this run may not write to
        check_output_dir(cfg.output_dir, args.resume)
        run = from_config(cfg)
        argv = ["surgery", "train", args.config] + [x for o in args.overrides for x in ("--set", o)]
        resume_with = shlex.join(argv + ["--resume"])
        run.command = {"command": shlex.join(argv + (["--resume"] if args.resume else [])),
                       "resume_with": resume_with, "cwd": os.getcwd(),
                       "config": str(Path(args.config).resolve()), "overrides": list(args.overrides),
                       "resolved": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None}
        summary = run.run(resume=args.resume)
    except (ValueError, FileNotFoundError) as exc:
        # Config and data errors (DataError is a ValueError) name the file and what is wrong.
        print(f"surgery: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"surgery: stopped: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        again = f"\nsurgery: continue with: {resume_with}" if resume_with and exc.checkpoint is not None else ""
        print(f"surgery: {exc}{again}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        # Ctrl-C outside the steps (loading, the reference cache's build, an evaluation, the final
        # save) or a second one within a step: no traceback. What is on disk is whole: the
        # checkpoint, the cache files, final/ and summary.json are each written aside, then renamed.
        if resume_with is None:
            print("surgery: interrupted (SIGINT)", file=sys.stderr)
        else:
            print(f"surgery: interrupted (SIGINT); continue with: {resume_with} (from the last checkpoint, if "
                  f"any, and the reference cache so far)", file=sys.stderr)
        return 128 + signal.SIGINT
    if run.dist.main:
        print(json.dumps({k: summary[k] for k in ("steps", "before", "after", "final")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
