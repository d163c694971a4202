"""``dpn train``: train or fine-tune a model with or without a pyramid.

Its flags (dpn's TrainOptions and every TrainingArguments field) are parsed by
``dpn.lab.train.parse_train_args``, an HfArgumentParser: this subparser takes its words as they
are (no "-" prefix, so no flag of its own, not even --help) and hands them over.
"""

from __future__ import annotations

import argparse

NAME = "train"


def add_to(commands: argparse._SubParsersAction) -> None:
    trainer = commands.add_parser(
        NAME, help="train or fine-tune a model (LLaVA, LLaVA-NeXT / OneVision, Qwen2-VL / 2.5-VL), with or without a "
                   "pyramid (every Trainer option is a flag: dpn train --help)", add_help=False, prefix_chars="\0")
    trainer.add_argument("train_argv", nargs="*", metavar="FLAG", help="see dpn train --help")
    trainer.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.engine.checkpoints import is_finished
    from dpn.lab.train import parse_train_args, train

    options, training_args = parse_train_args(args.train_argv)  # exits 2 on a bad flag, prints --help
    already = is_finished(training_args.output_dir, training_args.max_steps, training_args.num_train_epochs)
    out = train(options, training_args)  # a finished run says so itself and writes nothing
    if not already:
        print(f"model written to {out}")
    return 0
