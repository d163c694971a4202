"""``dpn compare``: every strategy at several budgets, a table and Pareto plots."""

from __future__ import annotations

import argparse

from dpn.lab.commands.arguments import command_line
from dpn.lab.compare import TRAINING_FREE
from dpn.lab.train import DEFAULT_ROUTER_FIT_SAMPLES
from dpn.strategies.dpn import DEFAULT_FIT_FLOPS_WEIGHT

NAME = "compare"


def add_to(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(NAME, help="every strategy at several budgets: table and Pareto plots")
    compare.add_argument("--base", required=True, help="model every variant is fine-tuned from")
    compare.add_argument("--train-data", required=True, help="LLaVA-format JSON for fine-tuning")
    compare.add_argument("--test-data", required=True, help="LLaVA-format JSON to evaluate on")
    compare.add_argument("--out", default="runs/compare", help="runs directory (an interrupted compare resumes)")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    compare.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant and seed")
    compare.add_argument("--batch-size", type=int, default=32)
    compare.add_argument("--lr", type=float, default=1e-4)
    compare.add_argument("--router-lr", type=float, default=1e-3)
    compare.add_argument("--train-limit", type=int, help="fine-tune on the first N samples")
    compare.add_argument("--test-limit", type=int, help="evaluate on the first N samples")
    compare.add_argument("--training-free", nargs="+", default=list(TRAINING_FREE), metavar="SPEC",
                         help="training-free strategies run on the vanilla fine-tune (any --pyramid spec); "
                              f"default: {' '.join(TRAINING_FREE)}")
    compare.add_argument("--static", nargs="+", default=["1x2", "2x2"], help="static strides")
    compare.add_argument("--projector", nargs="+", default=["2x2", "3x3"], help="projector-side pooling strides")
    compare.add_argument("--dpn-budget", type=float, nargs="+", default=[0.8, 0.6],
                         help="FLOPs targets for the calibrated router bias of DPN, the fitted DPN and the --routed presets")
    compare.add_argument("--fine-tuned", nargs="*", default=["fastv:0.5"], metavar="SPEC",
                         help="peers also fine-tuned with their own strategy (default: fastv:0.5)")
    compare.add_argument("--routed", nargs="*", default=[], metavar="SPEC",
                         help="other presets with fitted routers (e.g. select:0.2, a pyramid_config.json): fine-tuned, "
                              "then evaluated at their own routing and at each --dpn-budget, as DPN rows")
    compare.add_argument("--fit-flops-weight", type=float, default=DEFAULT_FIT_FLOPS_WEIGHT,
                         help="the fitted DPN's price of FLOPs in LM loss (higher: more compression)")
    compare.add_argument("--router-fit-samples", type=int, default=DEFAULT_ROUTER_FIT_SAMPLES,
                         help="training samples the fitted DPN's routers are fitted on")
    compare.add_argument("--positions", choices=["keep", "renumber", "own"], default="keep",
                         help="position mode of every row but the ablations (own: each strategy's default)")
    compare.add_argument("--no-ablations", action="store_true",
                         help="skip the ablations (the other position mode, unscaled tokens, temperature 1 or 10 to "
                              "1, distillation from the vanilla model)")
    compare.add_argument("--paper-ablations", action="store_true",
                         help="also the paper's ablations: no routing loss, avg pooling, early / late stages")
    compare.add_argument("--no-latency", action="store_true",
                         help="skip the prefill latency measurement (its column then reads -)")
    compare.add_argument("--oracle", action="store_true",
                         help="evaluate every routing path of the fitted DPN: the oracle frontier and the routers' regret")
    compare.add_argument("--markdown", help="write the results page here (default: OUT/RESULTS.md)")
    compare.add_argument("--image-dir", help="write the plots here (default: OUT)")
    compare.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.compare import CompareOptions, run_compare

    run_compare(CompareOptions(
        base=args.base, train_data=args.train_data, test_data=args.test_data, out_dir=args.out, seeds=args.seeds,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, router_learning_rate=args.router_lr,
        train_limit=args.train_limit, test_limit=args.test_limit, training_free=args.training_free,
        static_strides=args.static, projector_strides=args.projector, dpn_budgets=args.dpn_budget,
        fine_tuned=args.fine_tuned, routed=args.routed, fit_flops_weight=args.fit_flops_weight, router_fit_samples=args.router_fit_samples,
        positions=None if args.positions == "own" else args.positions, ablations=not args.no_ablations,
        paper_ablations=args.paper_ablations, oracle=args.oracle, measure_latency=not args.no_latency,
        markdown=args.markdown, image_dir=args.image_dir, command=command_line(NAME),
    ))
    return 0
