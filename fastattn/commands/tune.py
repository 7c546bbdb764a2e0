"""``fastattn tune``: measure the fused kernels' block sizes on this machine and store them."""

from __future__ import annotations

import json

HELP = "measure the fused attention's block sizes on this machine and store the winners"


def configure(parser):
    parser.add_argument("--seconds", type=_positive, default=60.0,
                        help="time budget for the measurements (default 60)")
    parser.add_argument("--dry-run", action="store_true",
                        help="measure and print, but write no tuning file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _positive(text):
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def run(args) -> int:
    from fastattn import tuning
    from fastattn.commands import info

    result = tuning.tune(args.seconds, write=not args.dry_run)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    key = result["key"]
    print(f"machine: {key['cpu']} ({key['isa']}), BLAS {key['blas']} {key['blas_version']} "
          f"({key['blas_kernel']} kernels)")
    if not result["measured"]:
        print("no candidate was measured within the time budget: the defaults stay")
    else:
        print("time relative to the defaults (below 1: faster):")
    width = max(map(len, result["measured"]), default=0) + 2
    for name, ratio in result["measured"].items():
        print(f"  {name:<{width}}{ratio:.3f}")
    st = result["setting"]
    print(f"chosen: blocks {st['block_q']}x{st['block_k']}, {info._kt(st['kt_rows'])}, "
          f"causal {st['causal_block_small']}/{st['causal_block']}, "
          f"tile products by {info._products(st['own_dim'])}")
    print(f"stored in {result['file']}" if result["file"] else "not stored (--dry-run)")
    return 0
