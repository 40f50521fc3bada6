"""The `fqhw` command: a thin layer over the Python API in fqhw.flow."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path

from fqhw.errors import FqhwError


def _parse_tuple(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")

    return parse


def _edge_bits(text: str):
    if text == "none":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width (2..8) or 'none', got {text!r}")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """One flag per knob of the built-in data set: --data-<field>."""
    from fqhw.data.synthetic import SyntheticDermConfig

    g = p.add_argument_group("built-in data set (synthetic dermatology)")
    hints = typing.get_type_hints(SyntheticDermConfig)
    for f in dataclasses.fields(SyntheticDermConfig):
        hint = hints[f.name]
        args_ = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args_) == 1:
            hint = args_[0]  # an optional knob: the flag sets it
        origin = typing.get_origin(hint)
        if origin is tuple:
            inner = typing.get_args(hint)[0]
            kind, metavar = _parse_tuple(inner), "V1,V2,..."
        elif hint in (int, float, str):
            kind, metavar = hint, hint.__name__.upper()
        elif hint is bool:
            kind, metavar = (lambda s: s.lower() in ("1", "true", "yes")), "BOOL"
        else:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        g.add_argument(f"--data-{f.name.replace('_', '-')}", dest=f"data_{f.name}", type=kind, metavar=metavar,
                       default=None, help=f"default {default}")


def _data_config(args):
    from fqhw.data.synthetic import SyntheticDermConfig

    overrides = {
        f.name: getattr(args, f"data_{f.name}")
        for f in dataclasses.fields(SyntheticDermConfig)
        if getattr(args, f"data_{f.name}", None) is not None
    }
    return SyntheticDermConfig(**overrides)


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. depth=1)")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    if "," in value:
        try:
            return key, tuple(int(v) for v in value.split(","))
        except ValueError:
            pass
    return key, value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", dest="data_spec", default="builtin", metavar="SPEC",
                   help="builtin | fitzpatrick17k:PATH | isic2019:PATH | csv:CSV[,IMAGE_DIR]; loader options as ;key=value "
                        "(e.g. fitzpatrick17k:/data/f17k;groups=light-dark)")
    p.add_argument("--seed", type=int, default=0, help="seed for training, QAT and the solver")
    p.add_argument("--cache-dir", type=Path, default=None, help="where trained float models are kept (default $FQHW_CACHE_DIR or ~/.cache/fqhw)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="model from the registry: fqcnn (default), cnv (FINN's CNV; --model-arg width=0.25), resnet18, resnet50, deit_tiny_patch16_224, tiny_vit_5m_224")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the model (repeatable), e.g. depth=1 or embed_dim=64; integers, floats, "
                        "comma-separated integer tuples")
    p.add_argument("--channels", type=_parse_tuple(int), default=None,
                   help="channels of the default CNN's blocks (e.g. 16,32,64) or a ResNet's stages (e.g. 64,16,16,16)")
    p.add_argument("--epochs", type=int, default=None, help="float training epochs")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                   help="load the float model's weights from this file (torch.save(model.state_dict(), PATH)) instead of training")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step lines")
    p.add_argument("--verbose", action="store_true", help="print each step's result")
    _add_data_flags(p)


def _compile_config(args):
    from fqhw.flow import CompileConfig

    cfg = CompileConfig(data=_data_config(args), data_spec=args.data_spec, seed=args.seed, progress=not args.quiet, verbose=args.verbose and not args.quiet)
    updates = {}
    if getattr(args, "target", None) is not None:
        updates["target"] = args.target
    if getattr(args, "budget", None) is not None:
        updates["budget"] = args.budget
    if getattr(args, "out", None) is not None:
        updates["out_dir"] = args.out
    if args.cache_dir is not None:
        updates["cache_dir"] = args.cache_dir
    if args.channels is not None:
        updates["channels"] = args.channels
    if args.model is not None:
        updates["model"] = args.model
    if args.model_args:
        updates["model_kwargs"] = dict(args.model_args)
    if args.epochs is not None:
        updates["float_epochs"] = args.epochs
    if args.checkpoint is not None:
        updates["checkpoint"] = args.checkpoint
    for flag, field_name in (
        ("qat_epochs", "qat_epochs"),
        ("fairness_lambda", "fairness_lambda"),
        ("min_fps", "min_fps"),
        ("verify_images", "verify_images"),
        ("time_limit", "solver_time_limit_s"),
        ("baq_epochs", "baq_epochs"),
        ("channel_groups", "channel_groups"),
    ):
        if getattr(args, flag, None) is not None:
            updates[field_name] = getattr(args, flag)
    if getattr(args, "backend", None) is not None:
        updates["backend"] = args.backend
    if getattr(args, "synth", False):
        updates["synth"] = True
    if getattr(args, "tune", False):
        from fqhw.quant.qat import DEFAULT_GRID

        updates["qat_grid"] = DEFAULT_GRID
    if getattr(args, "edge_bits", None) is not None:
        updates["edge_bits"] = None if args.edge_bits == "none" else args.edge_bits
    return dataclasses.replace(cfg, **updates)


def cmd_compile(args) -> int:
    from fqhw.flow import compile as run_compile

    res = run_compile(_compile_config(args))
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
        + (f"{r['hardware']['finn'].get('fps', float('nan')):.0f} images/s on {r['target']}, " if r["hardware"]["finn"] is not None
           else f"hls4ml project for {r['target']}, " if "hls4ml" in r["hardware"] else f"priced by the {r['target']} cost model, ")
        + f"bit-exact {'yes' if r['bit_exact']['ok'] else 'NO'}"
    )
    return 0


def cmd_train(args) -> int:
    from fqhw.flow import step_data, step_float_model
    from fqhw.quant.qat import evaluate_groups

    cfg = _compile_config(args)
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

    print(json.dumps(describe(generate(_data_config(args))), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fqhw.flow import CompileConfig

    d = CompileConfig()
    parser = argparse.ArgumentParser(prog="fqhw", description="Hardware-aware compiler for fair quantized medical image classifiers")
    sub = parser.add_subparsers(dest="command", required=True)

    pc = sub.add_parser("compile", help="allocate bits and folding, fine-tune, export and build for a target")
    pc.add_argument("--target", default=None, help=f"hardware target (default {d.target})")
    pc.add_argument("--budget", type=float, default=None, help=f"average weight bits, parameter-weighted, in [2, 8] (default {d.budget:g})")
    pc.add_argument("--out", type=Path, default=None, help=f"output folder (default {d.out_dir})")
    pc.add_argument("--qat-epochs", type=int, default=None, help=f"fine-tuning epochs (default {d.qat_epochs})")
    pc.add_argument("--fairness-lambda", type=float, default=None, help=f"weight of max-min group loss (default {d.fairness_lambda})")
    pc.add_argument("--edge-bits", default=None, type=_edge_bits, metavar="BITS|none", help=f"pin first/last layer weight bits; 'none' to let the solver choose (default {d.edge_bits})")
    pc.add_argument("--min-fps", type=float, default=None, help="require at least this many images/s")
    pc.add_argument("--verify-images", type=int, default=None, help=f"test images in the bit-exact check (default {d.verify_images})")
    pc.add_argument("--json", action="store_true", help="print the result object (report.json) on stdout")
    pc.add_argument("--baq-epochs", type=int, default=None, help="learn the widths with BAQ for this many epochs from the solver's allocation, then project them back with the solver (default 0: off)")
    pc.add_argument("--backend", choices=("finn", "hls4ml"), default=None,
                    help="finn (default): FINN dataflow build; hls4ml: an hls4ml project for the PYNQ-Z2 with power-of-two scales, checked by its C simulation")
    pc.add_argument("--channel-groups", type=int, default=None, metavar="N",
                    help="allocate each conv of the default CNN in N output-channel groups, each its own width (default 1: whole layers)")
    pc.add_argument("--tune", action="store_true",
                    help="choose QAT's fairness weight and learning rate on the validation split (4 runs per QAT: lambda 0.5/1, lr 5e-4/1e-3)")
    pc.add_argument("--synth", action="store_true", help="also run FINN's remaining steps to a bitfile (needs Vivado and Vitis HLS)")
    pc.add_argument("--time-limit", type=float, default=None, help=f"solver time limit in s (default {d.solver_time_limit_s:g})")
    _add_common(pc)
    pc.set_defaults(func=cmd_compile)

    pt = sub.add_parser("train", help="train (or load from cache) the float model on the built-in data")
    _add_common(pt)
    pt.set_defaults(func=cmd_train)

    pd = sub.add_parser("data", help="generate the built-in data set and print its group and class counts")
    _add_data_flags(pd)
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
        from fqhw.flow import default_cache_dir

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
