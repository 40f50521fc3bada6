"""The `fqhw` command: a thin layer over the Python API in fqhw.flow."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fqhw.backends.base import backend_names
from fqhw.cliargs import add_common, add_data_flags, compile_config, data_config, edge_bits
from fqhw.errors import FqhwError


def cmd_compile(args) -> int:
    from fqhw.flow import compile as run_compile

    res = run_compile(compile_config(args))
    if res is None:  # a torchrun rank other than 0: it trained, rank 0 reports
        return 0
    r = res.report
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    c = r["accuracy"]["compiled"]
    print(
        f"wrote {res.out_dir}: avg {r['allocation']['avg_weight_bits']:.2f} bits, "
        f"mean-group acc {100 * c['mean_group_acc']:.1f} %, worst-group acc {100 * c['worst_group_acc']:.1f} %, "
        + _hardware_phrase(r)
        + f"bit-exact {'yes' if r['bit_exact']['ok'] else 'NO'}"
    )
    return 0


def _hardware_phrase(report: dict) -> str:
    """What was built, for the one-line summary: the rate of a build that estimates one, the
    backend's project otherwise, the cost model alone for an ASIC target."""
    hw, target = report["hardware"], report["target"]
    built = next((k for k, v in hw.items() if k not in ("part", "predicted") and v is not None), None)
    if built is None:
        return f"priced by the {target} cost model, "
    if "fps" in hw[built]:
        return f"{hw[built]['fps']:.0f} images/s on {target}, "
    return f"{built} project for {target}, "


def cmd_train(args) -> int:
    from fqhw.flow import step_data, step_float_model
    from fqhw.quant.qat import evaluate_groups

    cfg = compile_config(args)
    splits = step_data(cfg)
    fm = step_float_model(cfg, splits)
    from fqhw.models import distributed as dist

    if not dist.is_main():
        return 0
    m = evaluate_groups(fm.model, splits.test)
    print(
        f"float model {f'loaded from {cfg.checkpoint}' if cfg.checkpoint else 'loaded from cache' if fm.cache_hit else 'trained'}: test acc {100 * m['overall_acc']:.1f} %, "
        f"mean-group {100 * m['mean_group_acc']:.1f} %, worst-group {100 * m['worst_group_acc']:.1f} % ({m['worst_group']})"
    )
    return 0


def cmd_data(args) -> int:
    from fqhw.data.synthetic import describe, generate

    print(json.dumps(describe(generate(data_config(args))), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fqhw.config import CompileConfig

    d = CompileConfig()
    parser = argparse.ArgumentParser(prog="fqhw", description="Hardware-aware compiler for fair quantized medical image classifiers")
    sub = parser.add_subparsers(dest="command", required=True)

    pc = sub.add_parser("compile", help="allocate bits and folding, fine-tune, export and build for a target")
    pc.add_argument("--target", default=None, help=f"hardware target (default {d.target})")
    pc.add_argument("--budget", type=float, default=None, help=f"average weight bits, parameter-weighted, in [2, 8] (default {d.budget:g})")
    pc.add_argument("--out", type=Path, default=None, help=f"output folder (default {d.out_dir})")
    pc.add_argument("--qat-epochs", type=int, default=None, help=f"fine-tuning epochs (default {d.qat_epochs})")
    pc.add_argument("--fairness-lambda", type=float, default=None, help=f"weight of max-min group loss (default {d.fairness_lambda})")
    pc.add_argument("--edge-bits", default=None, type=edge_bits, metavar="BITS|none", help=f"pin first/last layer weight bits; 'none' to let the solver choose (default {d.edge_bits})")
    pc.add_argument("--min-fps", type=float, default=None, help="require at least this many images/s")
    pc.add_argument("--verify-images", type=int, default=None, help=f"test images in the bit-exact check (default {d.verify_images})")
    pc.add_argument("--json", action="store_true", help="print the result object (report.json) on stdout")
    pc.add_argument("--baq-epochs", type=int, default=None, help="learn the widths with BAQ for this many epochs from the solver's allocation, then project them back with the solver (default 0: off)")
    pc.add_argument("--backend", choices=backend_names(), default=None,
                    help="finn (default): FINN dataflow build; hls4ml: an hls4ml project for the PYNQ-Z2 with power-of-two scales, checked by its C simulation")
    pc.add_argument("--channel-groups", type=int, default=None, metavar="N",
                    help="allocate each conv of the default CNN in N output-channel groups, each its own width (default 1: whole layers)")
    pc.add_argument("--tune", action="store_true",
                    help="choose QAT's fairness weight and learning rate on the validation split (4 runs per QAT: lambda 0.5/1, lr 5e-4/1e-3)")
    pc.add_argument("--synth", action="store_true", help="also run FINN's remaining steps to a bitfile (needs Vivado and Vitis HLS)")
    pc.add_argument("--time-limit", type=float, default=None, help=f"solver time limit in s (default {d.solver_time_limit_s:g})")
    add_common(pc)
    pc.set_defaults(func=cmd_compile)

    pt = sub.add_parser("train", help="train (or load from cache) the float model on the built-in data")
    add_common(pt)
    pt.set_defaults(func=cmd_train)

    pd = sub.add_parser("data", help="generate the built-in data set and print its group and class counts")
    add_data_flags(pd)
    pd.set_defaults(func=cmd_data)

    from fqhw.compare import add_compare_parser

    add_compare_parser(sub)

    from fqhw.simulate import add_simulate_parser

    add_simulate_parser(sub)

    from fqhw.sidebyside import add_sidebyside_parser

    add_sidebyside_parser(sub)
    return parser


_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C at any point, the imports included, is one line and exit code 130. So is any
    error raised after it: a library that swallows the KeyboardInterrupt in the middle of an
    import (torch's lazy submodules) leaves a half-imported module whose next use fails."""
    global _interrupted
    import signal
    import threading

    _interrupted = False
    here = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, _on_sigint) if here else None
    try:
        return _main(argv)
    except BaseException as e:
        if not (_interrupted or isinstance(e, KeyboardInterrupt)) or isinstance(e, SystemExit):
            raise
        print("fqhw: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        if here:
            signal.signal(signal.SIGINT, before)


def _main(argv: list[str] | None) -> int:
    import logging
    import warnings

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Library chatter (brevitas, torch, qonnx) is not the user's business on the console.
    warnings.filterwarnings("ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    if "matplotlib" not in sys.modules:
        # matplotlib's font cache goes with fqhw's own cache, not into HOME (unless the user chose)
        from fqhw.config import default_cache_dir

        os.environ.setdefault("MPLCONFIGDIR", str(Path(getattr(args, "cache_dir", None) or default_cache_dir()) / "matplotlib"))
    from fqhw.models import distributed as dist

    try:
        dist.init_from_env()  # under torchrun: join the other ranks (fqhw train / compile train with DDP)
        return args.func(args)
    except FqhwError as e:
        print(f"fqhw: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file the user named, or a folder that cannot be written
        if e.filename is None:
            raise
        print(f"fqhw: error: {e.strerror or e} ({e.filename}): check the path, or choose another --out / --cache-dir", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
