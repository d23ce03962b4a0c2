"""The data command line: ``python -m mae_core.data optimize SRC OUT`` prepares a folder for
streaming (:mod:`mae_core.prepared`); ``python -m mae_core.data caches`` lists (and frees) the
automatic cache (:mod:`mae_core.caches`). Kept apart from :mod:`mae_core.data`, which is the data
sets themselves; ``mae_core.data`` runs this module's :func:`main` when run as a command."""

from __future__ import annotations

import argparse

from mae_core.checks import DataError
from mae_core.rundir import DEFAULT_RUNS_DIR


def main(argv: list[str] | None = None) -> int:
    """``optimize SRC OUT [--short-side N] [--workers K]``: prepare a folder for streaming
    (:mod:`mae_core.prepared`). Exit code 2 with a message for a folder that cannot be prepared.
    ``caches [--runs-dir D] [--remove-superseded]``: the automatic cache (:mod:`mae_core.caches`)."""
    from mae_core import prepared

    parser = argparse.ArgumentParser(prog="python -m mae_core.data",
                                     description="Prepare image folders for training at scale.")
    commands = parser.add_subparsers(dest="command", required=True)
    opt = commands.add_parser("optimize", help="re-encode a folder into LitData shards")
    opt.add_argument("src", help="folder of images (searched recursively)")
    opt.add_argument("out", help="the prepared data set's directory (new, or empty)")
    opt.add_argument("--short-side", type=int, default=prepared.DEFAULT_SHORT_SIDE,
                     help=f"bound on each image's short side (default {prepared.DEFAULT_SHORT_SIDE}, "
                          f"2 x the MAE paper's 224 px; at least {prepared.MIN_SHORT_SIDE})")
    opt.add_argument("--workers", type=int, default=None, help="encoding processes (default: cores)")
    caches = commands.add_parser("caches", help="list the automatically prepared sets and the runs "
                                                "that use them; remove superseded ones")
    caches.add_argument("--runs-dir", action="append", default=None,
                        help=f"where runs live (repeatable; default: {DEFAULT_RUNS_DIR})")
    caches.add_argument("--remove-superseded", action="store_true",
                        help="remove the sets a newer set of the same folder replaced and no run uses")
    args = parser.parse_args(argv)
    if args.command == "caches":
        from mae_core.caches import report

        print("\n".join(report(args.runs_dir or [DEFAULT_RUNS_DIR], args.remove_superseded)))
        return 0
    try:
        manifest = prepared.prepare(args.src, args.out, args.short_side, args.workers)
    except DataError as err:
        parser.exit(2, f"error: {err}\n")
    except OSError as err:  # the output is a file, under a file, or in /proc
        parser.exit(2, f"error: {args.out} cannot be written ({err.strerror or err})\n")
    except KeyboardInterrupt:  # the conventional exit status of a Ctrl+C, and no traceback
        parser.exit(130, f"interrupted: nothing was written to {args.out}\n")
    print(f"prepared {manifest['count']:,} images ({manifest['skipped']:,} skipped: unreadable) "
          f"into {args.out}: {manifest['bytes'] / 1e6:.1f} MB in {manifest['seconds']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":  # the same command as python -m mae_core.data
    from mae_core.process import exit_quickly

    exit_quickly(main())
