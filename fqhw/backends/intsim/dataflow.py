"""The integer simulator of a FINN dataflow graph: every HW node (MVAU, Thresholding,
pools, sliding windows, padding, forks and joins) as a numpy function on a whole batch
(`node_fn`, `join_fn`, a sliding window fused into the pool it feeds), in a topological
order of the graph (see fqhw.backends.intsim)."""
from __future__ import annotations

import numpy as np

from fqhw.backends.intsim.kernels import (
    THR_CLIP,
    ThresholdTable,
    by_rows,
    carrier,
    column_sums,
    exact_int_array,
    im2col,
    int_thresholds,
    window_reduce,
)
from fqhw.errors import FqhwError

JOIN_OPS = ("StreamingConcat", "ElementwiseAdd")


def base_op(op_type: str) -> str:
    """The generic FINN op of a specialised node type (MVAU_hls -> MVAU)."""
    for suffix in ("_hls", "_rtl"):
        if op_type.endswith(suffix):
            return op_type[: -len(suffix)]
    return op_type


def topological(df) -> list:
    """The graph's nodes in a topological order, the graph's own order wherever it already
    is one (FINN keeps its graphs sorted; a fork's branches may come in any order)."""
    produced = {o for n in df.graph.node for o in n.output}
    ready = {i.name for i in df.graph.input}
    todo, order = list(df.graph.node), []
    while todo:
        rest = []
        for n in todo:
            if all(t in ready or t not in produced for t in n.input if t):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(todo):
            raise FqhwError(f"the dataflow graph has a cycle through {', '.join(n.name for n in rest[:3])}")
        todo = rest
    return order


def join_fn(df, node, in_ivs: list, in_dtypes: list):
    """(fn of the stream inputs, output interval, output carrier) of a join node:

    StreamingConcat  the streams side by side on the channel (last) axis, in input order
    ElementwiseAdd   the integer sum of two streams of one shape (a residual join), or of a
                     stream and an integer constant broadcast against it

    FINN's Python execution of both is plain numpy (np.concatenate; lhs + rhs in int64), no
    wrap-around or saturation, so the output interval is the union / the sum of the
    inputs' and the carrier the narrowest that holds it."""
    from qonnx.custom_op.registry import getCustomOp

    op = base_op(node.op_type)
    what = f"FINN node {node.name} ({node.op_type})"
    g = getCustomOp(node).get_nodeattr
    if op == "StreamingConcat":
        chans = [int(c) for c in g("ChannelsPerStream")]
        if len(chans) != len(in_ivs) or len(in_ivs) != len(node.input):
            raise FqhwError(f"{what}: {len(node.input)} inputs ({len(in_ivs)} streams), ChannelsPerStream {chans}")
        iv = (min(int(v[0]) for v in in_ivs), max(int(v[1]) for v in in_ivs))
        dt = carrier(max(abs(iv[0]), abs(iv[1])))

        def concat(*xs):
            for x, c in zip(xs, chans):
                if x.shape[-1] != c:
                    raise FqhwError(f"{what}: a stream of {x.shape[-1]} channels, ChannelsPerStream says {c}")
            return np.concatenate([x if x.dtype == dt else x.astype(dt) for x in xs], axis=-1)

        return concat, iv, dt

    if op == "ElementwiseAdd":
        consts = [t for t in node.input if df.get_initializer(t) is not None]
        if len(node.input) != 2 or len(in_ivs) + len(consts) != 2 or not in_ivs:
            raise FqhwError(f"{what}: an add of {len(in_ivs)} streams and {len(consts)} constants is not supported")
        if consts:
            c = exact_int_array(df.get_initializer(consts[0]), f"{what} constant")
            lo = int(in_ivs[0][0]) + int(c.min(initial=0))
            hi = int(in_ivs[0][1]) + int(c.max(initial=0))
        else:
            c = None
            lo, hi = int(in_ivs[0][0]) + int(in_ivs[1][0]), int(in_ivs[0][1]) + int(in_ivs[1][1])
        bound = max(abs(lo), abs(hi))
        if bound >= THR_CLIP:
            raise FqhwError(f"{what}: the sum may exceed 2^62 in magnitude")
        dt = carrier(bound)
        cd = None if c is None else c.astype(dt)

        def add(*xs):
            if cd is not None:
                return np.add(xs[0], cd, dtype=dt, casting="unsafe")  # integers in range: exact
            if xs[0].shape != xs[1].shape:
                raise FqhwError(f"{what}: operands of shapes {xs[0].shape[1:]} and {xs[1].shape[1:]}")
            return np.add(xs[0], xs[1], dtype=dt, casting="unsafe")

        return add, (lo, hi), dt

    raise FqhwError(f"{what}: the integer simulator does not support this join")


def fusable_pool(df, node):
    """The Pool node a ConvolutionInputGenerator feeds, when it is that generator's only
    consumer (and the generator's output is not the graph's output); else None."""
    if node.op_type.replace("_hls", "").replace("_rtl", "") != "ConvolutionInputGenerator":
        return None
    cons = df.find_consumers(node.output[0]) or []
    if len(cons) != 1 or cons[0].op_type.replace("_hls", "").replace("_rtl", "") != "Pool":
        return None
    if node.output[0] in {o.name for o in df.graph.output}:
        return None
    return cons[0]


def _conv_geometry(g, what):
    k, s, d = list(g("ConvKernelDim")), list(g("Stride")), list(g("Dilation"))
    ifm, ofm = list(g("IFMDim")), list(g("OFMDim"))
    if len(k) != 2 or len(s) != 2 or len(d) != 2:
        raise FqhwError(f"{what}: kernel {k}, stride {s}, dilation {d}: 2-D expected")
    return k, s, d, ifm, ofm


def _check_geometry(x, r, ifm, ofm, what):
    if list(r.shape[1:3]) != ofm or list(x.shape[1:3]) != ifm:
        raise FqhwError(f"{what}: {x.shape[1:3]} -> {r.shape[1:3]}, attributes say {ifm} -> {ofm}")


def _pool_interval(fnx, kk, iv):
    lo, hi = iv
    return (lo, hi) if fnx == "MaxPool" else (kk * lo, kk * hi)


def fused_pool_fn(df, gen, pool, in_iv, in_dtype):
    """ConvolutionInputGenerator + Pool as one windowed max / sum."""
    from qonnx.custom_op.registry import getCustomOp

    what = f"FINN nodes {gen.name} + {pool.name}"
    gg, pg = getCustomOp(gen).get_nodeattr, getCustomOp(pool).get_nodeattr
    k, s, d, ifm, ofm = _conv_geometry(gg, what)
    fnx = pg("Function")
    if fnx not in ("MaxPool", "AccPool"):
        raise FqhwError(f"{what}: pooling function {fnx} is not supported")
    if list(pg("KernelSize")) != k:
        raise FqhwError(f"{what}: pool kernel {list(pg('KernelSize'))}, generator kernel {k}")
    iv = _pool_interval(fnx, k[0] * k[1], in_iv)
    dt = in_dtype if fnx == "MaxPool" else carrier(max(abs(iv[0]), abs(iv[1])))

    def pool_fn(x):
        r = window_reduce(x, k, s, d, fnx, dt)
        _check_geometry(x, r, ifm, ofm, what)
        return r

    return pool_fn, iv, dt


def node_fn(df, node, layer_of_mvau: dict[str, str], in_iv, in_dtype):
    """(numpy function of the node's input, trace key or None, static output interval,
    output carrier dtype) for one HW node, given its input's interval and carrier."""
    from qonnx.custom_op.registry import getCustomOp

    op = node.op_type.replace("_hls", "").replace("_rtl", "")
    inst = getCustomOp(node)
    g = inst.get_nodeattr
    what = f"FINN node {node.name} ({node.op_type})"
    xlo, xhi = int(in_iv[0]), int(in_iv[1])

    if op == "FMPadding":
        pad = list(g("Padding"))  # [top, left, bottom, right]
        if len(pad) != 4:
            raise FqhwError(f"{what}: padding {pad}")
        top, left, bottom, right = pad

        def fmpad(x):
            n, h, w_, c = x.shape
            r = np.zeros((n, h + top + bottom, w_ + left + right, c), dtype=x.dtype)
            r[:, top : top + h, left : left + w_, :] = x
            return r

        return fmpad, None, (min(xlo, 0), max(xhi, 0)), in_dtype

    if op == "ConvolutionInputGenerator":
        k, s, d, ifm, ofm = _conv_geometry(g, what)

        def window(x):
            r = im2col(x, k, s, d)
            _check_geometry(x, r, ifm, ofm, what)
            return r

        return window, None, (xlo, xhi), in_dtype

    if op in ("MVAU", "Thresholding"):
        if op == "MVAU":
            if int(g("binaryXnorMode")) or "BIPOLAR" in (g("inputDataType"), g("weightDataType"), g("outputDataType")):
                raise FqhwError(f"{what}: binary / bipolar MVAUs are not supported")
            mw, mh = int(g("MW")), int(g("MH"))
            w = exact_int_array(df.get_initializer(node.input[1]), f"{what} weights")
            if w.shape != (mw, mh):
                raise FqhwError(f"{what}: weights of shape {w.shape}, MW x MH = {mw} x {mh}")
            no_act = int(g("noActivation")) == 1
            thr_name = node.input[2] if not no_act else None
            ln = layer_of_mvau.get(node.name)
            key = None if ln is None else (f"{ln}.acc" if no_act else f"{ln}.act")
            # per output column: the accumulator's interval (positive weights times the low
            # end of x plus negative weights times the high end, and the other way round),
            # and the bound on |every partial sum|, all in Python integers
            pos, neg = column_sums(w)
            acc_lo = [p * xlo + q * xhi for p, q in zip(pos, neg)]
            acc_hi = [p * xhi + q * xlo for p, q in zip(pos, neg)]
            xabs = max(abs(xlo), abs(xhi))
            partial = max((p - q for p, q in zip(pos, neg)), default=0) * xabs
            if partial >= THR_CLIP:
                raise FqhwError(f"{what}: the accumulator may exceed 2^62 in magnitude")
            gemm_dtype = carrier(partial)
            wg = w.astype(gemm_dtype)
        else:
            if g("outputDataType") == "BIPOLAR":
                raise FqhwError(f"{what}: bipolar outputs are not supported")
            w, no_act, thr_name, key = None, False, node.input[1], None
            mh = int(g("NumChannels"))
            if max(abs(xlo), abs(xhi)) >= THR_CLIP:
                raise FqhwError(f"{what}: the input may exceed 2^62 in magnitude")
            acc_lo, acc_hi = [xlo] * mh, [xhi] * mh
            gemm_dtype = in_dtype
        act_val = int(g("ActVal"))
        if no_act:
            table = None
            out_iv = (min(acc_lo, default=0), max(acc_hi, default=0))
            out_dtype = gemm_dtype
        else:
            thr = int_thresholds(df.get_initializer(thr_name), mh, f"{what} thresholds")
            out_iv = (act_val, act_val + thr.shape[1])
            out_dtype = carrier(max(abs(out_iv[0]), abs(out_iv[1])))
            # bounds of the accumulator as int64 for the table (|acc| < 2^62 checked above)
            table = ThresholdTable(thr, act_val, np.array(acc_lo, dtype=np.int64),
                                    np.array(acc_hi, dtype=np.int64), gemm_dtype, out_dtype)

        def chunk(xa, out):
            # float32 / float64 on BLAS: exact, every partial sum is an integer below the
            # type's exact range (see the module docstring); int64 otherwise
            acc = xa @ wg if w is not None else xa
            if table is None:
                out[...] = acc
            else:
                table.apply(acc, out=out)

        def mvau(x):
            if w is not None and x.shape[-1] != w.shape[0]:
                raise FqhwError(f"{what}: input of {x.shape[-1]} values per vector, MW = {w.shape[0]}")
            return by_rows(x, mh, gemm_dtype, out_dtype, chunk)

        return mvau, key, out_iv, out_dtype

    if op == "Pool":
        fnx = g("Function")
        k = list(g("KernelSize"))
        ch = int(g("Channels"))
        if fnx not in ("MaxPool", "AccPool"):
            raise FqhwError(f"{what}: pooling function {fnx} is not supported")
        iv = _pool_interval(fnx, k[0] * k[1], (xlo, xhi))
        dt = in_dtype if fnx == "MaxPool" else carrier(max(abs(iv[0]), abs(iv[1])))

        def pool(x):
            t = x.reshape((*x.shape[:-1], k[0] * k[1], ch))
            return t.max(axis=-2) if fnx == "MaxPool" else t.sum(axis=-2, dtype=dt)

        return pool, None, iv, dt

    if op == "StreamingMaxPool":
        pd = list(g("PoolDim"))
        if any(int(v) for v in (_safe(g, "CeilMode") or 0,)):
            raise FqhwError(f"{what}: ceil mode is not supported")

        def maxpool(x):
            n, h, w_, c = x.shape
            oh, ow = h // pd[0], w_ // pd[1]
            x = x[:, : oh * pd[0], : ow * pd[1], :]
            return x.reshape(n, oh, pd[0], ow, pd[1], c).max(axis=(2, 4))

        return maxpool, None, (xlo, xhi), in_dtype

    if op == "GlobalAccPool":
        shp = df.get_tensor_shape(node.input[0])
        pix = int(np.prod(shp[1:-1]))
        iv = (pix * xlo, pix * xhi)
        dt = carrier(max(abs(iv[0]), abs(iv[1])))

        def gap(x):
            return x.sum(axis=(1, 2), keepdims=True, dtype=dt)

        return gap, None, iv, dt

    raise FqhwError(f"{what}: the integer simulator does not support this node")


def _safe(g, name):
    try:
        return g(name)
    except Exception:  # noqa: BLE001 - an attribute this FINN version does not define
        return None

