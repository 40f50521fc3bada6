"""A fast integer simulator of the deployed model, built from a FINN dataflow graph or,
for an hls4ml build, from its power-of-two QONNX file (`IntegerSimulator.from_qonnx`: Conv,
ReLU + Quant, MaxPool, Flatten, MatMul on integer codes; see the section at the end).

`IntegerSimulator.from_build(build_dir)` reads the folded, specialised dataflow graph of an
estimate-only FINN build (fqhw.backends.finn.build) and the parent graph around it, and
turns every HW node into a numpy operation that runs a whole batch at once:

    FMPadding                  zero padding of the NHWC feature map
    ConvolutionInputGenerator  im2col: (N, OH, OW, KH*KW*C), channels fastest
    MVAU                       integer matmul with the integer weights, then (unless
                               noActivation) the integer thresholds: code = ActVal + the number
                               of thresholds t with acc >= t
    Thresholding               the same thresholds on a stream
    Pool (MaxPool / AccPool)   max / sum over the KH*KW window; a generator that only feeds a
                               Pool is fused with it (max / sum of KH*KW strided views, no im2col)
    StreamingMaxPool           max pooling by reshape (NHWC, kernel = stride)
    GlobalAccPool              sum over the pixels
    DuplicateStreams           a fork: its outputs are aliases of its input (no copy)
    StreamingConcat            a join: the streams side by side on the channel axis
    ElementwiseAdd             a join: the integer sum of two streams (a residual add)

The graph is a DAG, run in a topological order: the default CNN's is a chain, with
`fqhw compile --channel-groups` a grouped layer forks its shared window to one MVAU (+ pool)
per group and joins them with a StreamingConcat; a ResNet's (`from_finn_result`, the
finn_result.json of fqhw.backends.finn.residual) forks every block's input to its main
branch and shortcut and joins them with an ElementwiseAdd followed by Thresholding.

Weights, thresholds and attributes come from the ONNX nodes (qonnx ModelWrapper,
getCustomOp), never from the Brevitas model, so the simulator checks the build on its own.
Every value is an integer until the parent graph's output Mul: "logits" = head accumulator times
that scale (plus a ResNet's classifier bias, the parent's Add), in float64.

Why it is exact although it computes in floating point. The input pixel codes lie in [0, 255]
(`run` refuses anything else), so at construction every tensor gets a static integer interval
(interval arithmetic through the graph: the weights' positive and negative parts for an MVAU,
[ActVal, ActVal + #thresholds] after thresholds, window size times the input for a sum pool).
A tensor whose values stay below 2^24 in magnitude is carried as float32, below 2^53 as
float64 (both hold those integers exactly), else as int64. An MVAU multiplies on BLAS in the
narrowest float type whose exact range holds max_j sum_i |w_ij| * max|x|: every product and
every partial sum, in whatever order BLAS adds them, is an integer no larger than that, so no
rounding ever happens; beyond 2^53 it falls back to an int64 matmul.

The thresholds were the largest single cost (one binary search per channel: about 30 % of a
run of the previous version, the int64 <-> float64 conversions around its float64 matmuls
most of the rest; carrying float32 removed those). `ThresholdTable` replaces the search by two table look-ups: the reachable thresholds of a
channel are split into buckets of width 2^k, with 2^k no larger than the smallest gap between
two distinct thresholds, so a bucket holds at most one distinct threshold value; the code is
the number of thresholds below the bucket, plus that value's multiplicity if acc reaches it.
The bucket index is (acc - base) * 2^-k, which is exact in floating point (an integer times a
power of two), floored. `threshold_reference` is the plain per-channel binary search, kept as
the fallback and as the tests' reference.

`run` returns the integer tensors `finn_integer_trace` returns ("input", "<layer>.act",
"<layer>.acc" for an MVAU without activation, i.e. "head.acc"; NCHW codes, int64; channel
groups' "<layer>:g<k>.act" joined into "<layer>.act") plus "logits" (for a ResNet the keys
of finn_dataflow_integer_trace: "<block>.out", "<block>.shortcut", "fc.acc"); `run(..., trace=False)` returns only the output accumulator and "logits", which is
all a whole-data-set accuracy needs and spares writing every feature map out as int64.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from fqhw.backends.intsim.dataflow import JOIN_OPS, base_op, fusable_pool, fused_pool_fn, join_fn, node_fn, topological
from fqhw.backends.intsim.kernels import INPUT_RANGE, SimNode, carrier
from fqhw.backends.intsim.po2 import po2_graph
from fqhw.errors import FqhwError
from fqhw.onnxgraph import node_attr


# images per pass through the network when run() is not told (measured best on 2 cores:
# small enough that one pass's feature maps stay in the caches)
DEFAULT_BATCH_SIZE = 32
_BLAS_CONTROLLER = None


def _blas_threads(n: int | None):
    """A context that limits numpy's BLAS to `n` threads (None: leave it as it is).

    The simulator's products are tall and skinny (thousands of rows, 16-300 columns) and come
    in chunks; with OpenBLAS's default of one thread per core its threads spin between calls,
    and on a machine whose cores other processes also use that made a run 4-5x slower in
    wall-clock time (and 5x more CPU time) than one thread did. The products are a quarter of
    the work, so one thread gives up little even on an idle machine. threadpoolctl comes with
    scikit-learn (a dependency of finn-plus); without it the BLAS is left alone."""
    global _BLAS_CONTROLLER
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - installed with finn-plus
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=n, user_api="blas")


class IntegerSimulator:
    """The deployed integer model of one FINN build, vectorised over a batch with numpy."""

    def __init__(self, nodes, in_name, out_name, front, in_shape, record, out_scale, back, build_dir=None, in_dtype=np.int64,
                 key_signs: dict[str, np.ndarray] | None = None):
        self.nodes: list[SimNode] = nodes
        self.in_name = in_name  # the dataflow graph's input tensor
        self.out_name = out_name  # its output (the head accumulator)
        self.front = front  # layout ops in front of the accelerator: ("T", perm) / ("R", shape)
        self.in_shape = tuple(in_shape)  # the accelerator's input shape, batch 1
        self.record = record  # tensor name -> trace key ("<layer>.act" / "<layer>.acc")
        self.out_scale = out_scale  # float64 array broadcasting against the accumulator
        self.back = back  # layout ops after the accelerator, before/after the scale
        self.build_dir = build_dir
        self.in_dtype = in_dtype  # the carrier of the pixel codes
        # trace key -> int64 +-1 per output column, multiplied into that key's values
        self.key_signs = {k: np.asarray(v, dtype=np.int64).reshape(-1) for k, v in (key_signs or {}).items()}

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_build(cls, build_dir) -> "IntegerSimulator":
        """From a compile output folder (holding finn/) or a FINN build folder: the default
        CNN's (finn_build.json, fqhw.backends.finn.build, with or without channel groups) or
        a ResNet's (finn_result.json, fqhw.backends.finn.residual; see `from_finn_result`)."""
        from fqhw.backends.finn.common import FinnBuild

        build_dir = Path(build_dir)
        for fb in (build_dir, build_dir / "finn"):
            if (fb / "finn_build.json").exists():
                build = FinnBuild.load(fb)
                return cls.from_models(build.dataflow_model, build.parent_model, build.mvau_of_layer, build_dir=str(build_dir))
            if (fb / "finn_result.json").exists():
                return cls.from_finn_result(fb)
        raise FqhwError(
            f"{build_dir} holds no finn_build.json or finn_result.json (nor finn/finn_build.json, finn/finn_result.json): "
            "pass a compile output folder"
        )

    @classmethod
    def from_finn_result(cls, build_dir, qonnx_path=None) -> "IntegerSimulator":
        """From a ResNet's FINN build folder (finn_result.json of
        fqhw.backends.finn.residual.finn_dataflow_resnet with an allocation): its folded,
        specialised dataflow partition (MVAUs, Thresholding, ElementwiseAdd joins,
        DuplicateStreams forks, pooling, GlobalAccPool) and dataflow_parent.onnx around it.

        `qonnx_path` (default: model.qonnx.onnx beside the build folder, where fqhw compile
        writes it) is read for the MVAUs' weight codes only: FINN renames every node, so
        each MVAU is found by its weights, as finn_dataflow_integer_trace finds it, and the
        trace keys are that function's ("<layer>.act", "<block>.shortcut", "<block>.out",
        "fc.acc" with FINN's column signs undone)."""
        from qonnx.core.modelwrapper import ModelWrapper

        from fqhw.backends.finn.folding import match_mvaus_by_codes, qonnx_weight_codes
        from fqhw.backends.finn.residual import FinnResult, hw_keys

        build_dir = Path(build_dir)
        res = FinnResult.load(build_dir)
        if not res.dataflow_model:
            raise FqhwError(f"{build_dir / 'finn_result.json'} has no dataflow graph (FINN was run without an allocation); re-run fqhw compile")
        parent = build_dir / "dataflow_parent.onnx"
        for need in (Path(res.dataflow_model), parent):
            if not need.is_file():
                raise FqhwError(f"{need} is missing: the simulator of a ResNet build reads it; re-run fqhw compile")
        qonnx_path = Path(qonnx_path) if qonnx_path is not None else Path(build_dir).resolve().parent / "model.qonnx.onnx"
        if not qonnx_path.is_file():
            raise FqhwError(f"{qonnx_path} is missing: the simulator finds a ResNet build's MVAUs by the weights in it; re-run fqhw compile")
        df = ModelWrapper(res.dataflow_model)
        mvau_layer = match_mvaus_by_codes(df, qonnx_weight_codes(qonnx_path))
        keys = hw_keys(df, mvau_layer)
        signs = {keys[node]: sign for node, (_, sign) in mvau_layer.items() if keys[node].endswith(".acc")}
        mvau_of_layer = {layer: node for node, (layer, _) in mvau_layer.items()}
        return cls.from_models(df, ModelWrapper(str(parent)), mvau_of_layer, build_dir=str(build_dir), node_keys=keys, key_signs=signs)

    @classmethod
    def from_models(cls, dataflow, parent, mvau_of_layer: dict[str, str], build_dir=None,
                    node_keys: dict[str, str] | None = None, key_signs: dict[str, np.ndarray] | None = None) -> "IntegerSimulator":
        """From the dataflow graph and its parent (paths or qonnx ModelWrappers) and the map
        fqhw layer name -> MVAU node name (FinnBuild.mvau_of_layer).

        The graph is a DAG, not necessarily a chain: a DuplicateStreams fork makes its
        outputs aliases of its input (no copy: no simulator node writes into its input),
        a StreamingConcat / ElementwiseAdd join reads several tensors, and the nodes run in
        a topological order. `node_keys` (node name -> trace key) names tensors the MVAU
        rule does not (a ResNet's "<block>.out" Thresholding) or overrides it; `key_signs`
        (trace key -> +-1 per output column) undoes the column signs FINN moved into an
        MVAU's weights, for keys that must equal the QONNX trace (a ResNet's "fc.acc")."""
        from qonnx.core.modelwrapper import ModelWrapper

        df = dataflow if isinstance(dataflow, ModelWrapper) else ModelWrapper(str(dataflow))
        par = parent if isinstance(parent, ModelWrapper) else ModelWrapper(str(parent))
        layer_of_mvau = {v: k for k, v in mvau_of_layer.items()}
        node_keys = dict(node_keys or {})
        if len(df.graph.input) != 1 or len(df.graph.output) != 1:
            raise FqhwError("the dataflow graph must have one input and one output")
        in_name, out_name = df.graph.input[0].name, df.graph.output[0].name

        in_dtype = carrier(max(abs(v) for v in INPUT_RANGE))
        interval = {in_name: INPUT_RANGE}
        dtype = {in_name: in_dtype}
        alias: dict[str, str] = {}  # a DuplicateStreams output -> the tensor it copies
        nodes: list[SimNode] = []
        record: dict[str, str] = {}
        fused = set()

        def stream(node, t):
            src = alias.get(t, t)
            if src not in interval:
                raise FqhwError(f"FINN node {node.name}: its input {t} is not computed by the nodes before it")
            return src

        for node in topological(df):
            if node.name in fused:
                continue
            op = base_op(node.op_type)
            if op == "DuplicateStreams":
                src = stream(node, node.input[0])
                for o in node.output:
                    alias[o] = src
                continue
            if op in JOIN_OPS:
                srcs = tuple(stream(node, t) for t in node.input if df.get_initializer(t) is None)
                fn, iv, dt = join_fn(df, node, [interval[t] for t in srcs], [dtype[t] for t in srcs])
                out_t, name, op_type, inp, key = node.output[0], node.name, node.op_type, srcs, None
            else:
                src = stream(node, node.input[0])
                inp = src
                pool = fusable_pool(df, node)
                if pool is not None:
                    fn, iv, dt = fused_pool_fn(df, node, pool, interval[src], dtype[src])
                    fused.add(pool.name)
                    out_t, name, op_type = pool.output[0], f"{node.name}+{pool.name}", f"{node.op_type}+{pool.op_type}"
                    key = None
                else:
                    fn, key, iv, dt = node_fn(df, node, layer_of_mvau, interval[src], dtype[src])
                    out_t, name, op_type = node.output[0], node.name, node.op_type
            key = node_keys.get(node.name, key)
            oshape = tuple(df.get_tensor_shape(out_t))[1:]
            nodes.append(SimNode(name, op_type, inp, out_t, fn, oshape, iv, dt))
            interval[out_t], dtype[out_t] = iv, dt
            if key is not None:
                record[out_t] = key
        names = {n for sn in nodes for n in sn.name.split("+")}
        missing = set(mvau_of_layer.values()) - names
        if missing:
            raise FqhwError(f"MVAU nodes {sorted(missing)} of the build are not in its dataflow graph")
        out_name = alias.get(out_name, out_name)
        if out_name not in interval:
            raise FqhwError(f"the dataflow graph's output {out_name} is not computed by its nodes")

        # the parent graph: layout ops in front, the partition, then the output Mul
        sdps = par.get_nodes_by_op_type("StreamingDataflowPartition")
        if len(sdps) != 1:
            raise FqhwError(f"the parent graph has {len(sdps)} dataflow partitions, expected 1")
        sdp = sdps[0]
        front = []
        t = sdp.input[0]
        while t != par.graph.input[0].name:
            p = par.find_producer(t)
            if p is None or p.op_type not in ("Transpose", "Reshape", "Flatten"):
                raise FqhwError(f"unexpected node in front of the accelerator: {p.op_type if p else None}")
            if p.op_type == "Transpose":
                front.append(("T", node_attr(p, "perm")))
            else:
                front.append(("R", tuple(par.get_tensor_shape(p.output[0]))[1:]))
            t = p.input[0]
        front.reverse()
        scale = None
        back = []
        t = sdp.output[0]
        gout = par.graph.output[0].name
        while t != gout:
            cons = par.find_consumers(t) or []
            if len(cons) != 1:
                raise FqhwError(f"the parent graph's tensor {t} has {len(cons)} consumers, expected 1")
            c = cons[0]
            if c.op_type == "Mul":
                s = par.get_initializer(c.input[1])
                if s is None or scale is not None:
                    raise FqhwError(f"unexpected Mul {c.name} behind the accelerator")
                scale = np.asarray(s, dtype=np.float64)
                back.append(("S", None))
            elif c.op_type == "Add" and scale is not None:
                # the classifier bias a ResNet's float tail adds after the output scale
                b = par.get_initializer(c.input[1])
                if b is None:
                    raise FqhwError(f"unexpected Add {c.name} behind the accelerator: its second operand is not a constant")
                back.append(("B", np.asarray(b, dtype=np.float64)))
            elif c.op_type in ("Reshape", "Flatten"):
                back.append(("R", tuple(par.get_tensor_shape(c.output[0]))[1:]))
            else:
                raise FqhwError(f"unexpected node behind the accelerator: {c.name} ({c.op_type})")
            t = c.output[0]
        if scale is None:
            scale = np.ones(1, dtype=np.float64)
            back.append(("S", None))
        return cls(nodes, in_name, out_name, front, df.get_tensor_shape(in_name), record, scale, back, build_dir, in_dtype,
                   key_signs=key_signs)

    @classmethod
    def from_qonnx(cls, path) -> "IntegerSimulator":
        """From a power-of-two QONNX file: the `model.qonnx.onnx` of an hls4ml build
        (fqhw.quant.po2), where every Quant node has one power-of-two scale and zero point 0.

        Why the QONNX file and not the hls4ml project: it is the model every backend of such a
        build starts from, it states the integer arithmetic exactly (codes times 2^e), and
        reading it needs neither hls4ml nor the compiled C simulation, so the simulator checks
        the C simulation instead of repeating it. A FINN build's QONNX file has float scales
        (absorbed into FINN's thresholds) and is refused here: simulate it with `from_build`.
        See `po2_graph` for the ops and why every value is exact."""
        return po2_graph(cls, Path(path))

    # ----------------------------------------------------------------- execution

    def run(self, images, batch_size: int | None = None, trace: bool = True, blas_threads: int | None = 1) -> dict[str, np.ndarray]:
        """`images`: uint8 (or integer) pixel codes, N x C x H x W. Returns int64 NCHW codes
        "input", "<layer>.act", the head accumulator "head.acc" (N, classes) and float64
        "logits" (accumulator times the output scale); with trace=False only the output
        accumulator and "logits". `batch_size`: images per pass (DEFAULT_BATCH_SIZE when
        None); `blas_threads`: numpy's BLAS threads during the run (None: as they are; see
        _blas_threads). Both change the speed, never a value."""
        images = np.asarray(images)
        if not np.issubdtype(images.dtype, np.integer):
            raise FqhwError(f"the simulator takes the uint8 pixel codes, not {images.dtype} values")
        if images.ndim != 4:
            raise FqhwError(f"images must be N x C x H x W, got shape {images.shape}")
        if images.size and (images.min() < INPUT_RANGE[0] or images.max() > INPUT_RANGE[1]):
            raise FqhwError("pixel codes must lie in [0, 255]")
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        n = images.shape[0]
        if n == 0:
            raise FqhwError("no images")
        out: dict[str, np.ndarray] = {}
        with _blas_threads(blas_threads):
            for i in range(0, n, batch_size):
                self._run_batch(images[i : i + batch_size], i, n, out, trace)
        if any(":g" in k for k in out):
            from fqhw.units import merge_group_keys

            # channel groups: "<layer>:g<k>.act" joined into "<layer>.act", as FINN's and
            # qonnx's traces have them
            out = merge_group_keys(out)
        return out

    def _run_batch(self, x: np.ndarray, start: int, total: int, out: dict, trace: bool) -> None:
        """Run images start .. start + len(x) and write their results into `out` (allocated
        on the first batch, for all `total` images)."""
        n = x.shape[0]
        stop = start + n

        def put(key, value, dtype=np.int64):
            # value: (n, ...) in any layout; written as C-ordered `dtype` (exact: integers)
            if key not in out:
                out[key] = np.empty((total, *value.shape[1:]), dtype=dtype)
            np.copyto(out[key][start:stop], value, casting="unsafe")

        a = x
        undo = []
        for kind, arg in self.front:
            if kind == "T":
                a = a.transpose(arg)
                undo.append(("T", list(np.argsort(arg))))
            else:
                undo.append(("R", a.shape[1:]))
                a = a.reshape((n, *arg))
        a = np.ascontiguousarray(a, dtype=self.in_dtype).reshape((n, *self.in_shape[1:]))
        if trace:
            seen = a
            for kind, arg in reversed(undo):
                seen = seen.transpose(arg) if kind == "T" else seen.reshape((n, *arg))
            put("input", seen)
        ctx = {self.in_name: a}
        for node in self.nodes:
            r = node.fn(*[ctx[t] for t in node.inputs])
            if r.size != n * int(np.prod(node.out_shape)):
                raise FqhwError(f"FINN node {node.name}: {r.shape[1:]} values per image, the graph says {node.out_shape}")
            r = r.reshape((n, *node.out_shape))
            ctx[node.out] = r
            key = self.record.get(node.out)
            if key is not None and (trace or node.out == self.out_name):
                if key.endswith(".acc") and r.ndim == 4 and r.shape[1:3] == (1, 1):
                    r = r.reshape(n, -1)  # an accumulator behind a global pool: (N, classes)
                sign = self.key_signs.get(key)
                if sign is not None:
                    r = r.astype(np.int64) * sign  # exact: integers, |values| < 2^62
                put(key, r.transpose(0, 3, 1, 2) if r.ndim == 4 else r)
        y = ctx[self.out_name]
        for kind, arg in self.back:
            if kind == "R":
                y = y.reshape((n, *arg))
            elif kind == "B":
                y = y + arg
            else:
                y = y.astype(np.float64) * self.out_scale
        put("logits", np.asarray(y, dtype=np.float64).reshape(n, -1), np.float64)


