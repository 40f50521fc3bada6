"""The command line's shared arguments: what `fqhw compile`, `train`, `compare` and
`sidebyside` all take (data, model, seed, cache, output), and how they become a
fqhw.flow.CompileConfig. Below cli.py and the commands that add their own parsers, so that
each imports it without importing the others."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path



def parse_tuple(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")

    return parse


def edge_bits(text: str):
    if text == "none":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width (2..8) or 'none', got {text!r}")


def add_data_flags(p: argparse.ArgumentParser) -> None:
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
            kind, metavar = parse_tuple(inner), "V1,V2,..."
        elif hint in (int, float, str):
            kind, metavar = hint, hint.__name__.upper()
        elif hint is bool:
            kind, metavar = (lambda s: s.lower() in ("1", "true", "yes")), "BOOL"
        else:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        g.add_argument(f"--data-{f.name.replace('_', '-')}", dest=f"data_{f.name}", type=kind, metavar=metavar,
                       default=None, help=f"default {default}")


def data_config(args):
    from fqhw.data.synthetic import SyntheticDermConfig

    overrides = {
        f.name: getattr(args, f"data_{f.name}")
        for f in dataclasses.fields(SyntheticDermConfig)
        if getattr(args, f"data_{f.name}", None) is not None
    }
    return SyntheticDermConfig(**overrides)


def model_arg(text: str) -> tuple[str, object]:
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


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", dest="data_spec", default="builtin", metavar="SPEC",
                   help="builtin | fitzpatrick17k:PATH | isic2019:PATH | csv:CSV[,IMAGE_DIR]; loader options as ;key=value "
                        "(e.g. fitzpatrick17k:/data/f17k;groups=light-dark)")
    p.add_argument("--seed", type=int, default=0, help="seed for training, QAT and the solver")
    p.add_argument("--cache-dir", type=Path, default=None, help="where trained float models are kept (default $FQHW_CACHE_DIR or ~/.cache/fqhw)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="model from the registry: fqcnn (default), cnv (FINN's CNV; --model-arg width=0.25), resnet18, resnet50, deit_tiny_patch16_224, tiny_vit_5m_224")
    p.add_argument("--model-arg", dest="model_args", action="append", type=model_arg, default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the model (repeatable), e.g. depth=1 or embed_dim=64; integers, floats, "
                        "comma-separated integer tuples")
    p.add_argument("--channels", type=parse_tuple(int), default=None,
                   help="channels of the default CNN's blocks (e.g. 16,32,64) or a ResNet's stages (e.g. 64,16,16,16)")
    p.add_argument("--epochs", type=int, default=None, help="float training epochs")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                   help="load the float model's weights from this file (torch.save(model.state_dict(), PATH)) instead of training")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step lines")
    p.add_argument("--verbose", action="store_true", help="print each step's result")
    add_data_flags(p)


def compile_config(args):
    from fqhw.config import CompileConfig

    cfg = CompileConfig(data=data_config(args), data_spec=args.data_spec, seed=args.seed, progress=not args.quiet, verbose=args.verbose and not args.quiet)
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


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """--jobs, --threads-per-job, --executor, --ray-address: how a sweep runs its jobs (fqhw.executor)."""
    from fqhw.executor import KINDS

    g = p.add_argument_group("running the sweep's jobs (fqhw.executor)")
    g.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="jobs run at once: worker processes of the local executor, or the CPUs of a local Ray (default 1: in this process)")
    g.add_argument("--threads-per-job", type=int, default=1, metavar="T",
                   help="torch threads of every job whatever --jobs is, so that results do not depend on --jobs (default 1); keep N x T <= cores")
    g.add_argument("--executor", choices=KINDS, default="local", help="local processes (default) or Ray tasks (pip install -e '.[ray]')")
    g.add_argument("--ray-address", default=None, metavar="ADDR", help="a running Ray cluster to join (--executor ray; default: start a local Ray)")
