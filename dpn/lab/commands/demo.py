"""``dpn demo``: the synthetic benchmark, fine-tuned with and without DPN and static pooling, in one table."""

from __future__ import annotations

import argparse

NAME = "demo"


def add_to(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(NAME, help="benchmark, fine-tune with/without DPN and static, evaluate, compare")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--from-scratch", action="store_true", help="train the base model here instead of the shipped one")
    demo.add_argument("--train-samples", type=int, default=4000)
    demo.add_argument("--test-samples", type=int, default=500)
    demo.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.demo import DemoOptions, run_demo

    run_demo(DemoOptions(
        out_dir=args.out, from_scratch=args.from_scratch, train_samples=args.train_samples,
        test_samples=args.test_samples, finetune_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
    ))
    return 0
