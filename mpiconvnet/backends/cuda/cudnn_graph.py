"""Convolutions through cuDNN's graph (backend) API: an execution plan per layer shape and
kind, built once, then one cudnnBackendExecute per call.

Why: cuDNN 9 runs its legacy convolution calls through this same API, rebuilding what it
needs on every call: on the H100 a legacy call cost ~73 us of host time (docs/benchmarks.md),
and an AlexNet step makes 14 of them, enough to bound small and TF32 steps by the host.
Here the graph, the engine choice and the plan are made once per (shape, kind); a call
is a variant pack (the device pointers; cached while the pointers repeat, as they do
step after step from the memory pool) and an execute.

Used with TF32 since its first GPU run (2026-11-25, docs/gpu.md item 17), or always with
MPICONVNET_CUDNN_API=graph; context.cudnn_api_from_env says why. Enum values are copied from
cudnn_graph.h (cuDNN 9; they have not changed since the API appeared in cuDNN 8).

The engine: cuDNN's heuristics list engine configurations, best first: mode A's, then the
fallback mode's (functional engines with no performance promise, for shapes mode A has
nothing for, or when its query fails), as cuDNN's frontend and PyTorch ask both. Engines
that need runtime compilation (NVRTC, seconds to build) go after the others. Those whose
numerical notes say they down-convert inputs are skipped, and for float32 without TF32 so
are tensor-core ones (as PyTorch filters them), and with MPICONVNET_DETERMINISTIC=1 the
nondeterministic ones; of the rest, up to FIND_CANDIDATES whose
plans build and whose workspace fits are timed on the first call's own operands and the
fastest that runs is kept (MPICONVNET_CUDNN_FIND=0: the first one, untimed), as
cudnnFind* does for the legacy API. Engines needing runtime compilation are tried only
when no precompiled one serves.
"""
import ctypes
import itertools
import weakref

from . import cudnn

# cudnnBackendDescriptorType_t
TENSOR = 17
CONVOLUTION = 1
OPERATION = {"forward": 10, "filter": 11, "data": 12}   # CUDNN_BACKEND_OPERATION_CONVOLUTION_*
OPERATIONGRAPH = 15
ENGINEHEUR = 4
ENGINECFG = 3
ENGINE = 2
EXECUTION_PLAN = 5
VARIANT_PACK = 16
# cudnnBackendAttributeType_t
TYPE_HANDLE, TYPE_DATA_TYPE, TYPE_INT64, TYPE_FLOAT, TYPE_DOUBLE, TYPE_VOID_PTR = 0, 1, 3, 4, 5, 6
TYPE_CONVOLUTION_MODE, TYPE_HEUR_MODE, TYPE_NUMERICAL_NOTE, TYPE_BACKEND_DESCRIPTOR = 7, 8, 11, 15
TYPE_BEHAVIOR_NOTE = 19
# cudnnBackendAttributeName_t
TENSOR_BYTE_ALIGNMENT, TENSOR_DATA_TYPE, TENSOR_DIMENSIONS, TENSOR_STRIDES, TENSOR_UNIQUE_ID = 900, 901, 902, 903, 906
CONVOLUTION_COMP_TYPE, CONVOLUTION_CONV_MODE, CONVOLUTION_DILATIONS = 100, 101, 102
CONVOLUTION_FILTER_STRIDES, CONVOLUTION_POST_PADDINGS, CONVOLUTION_PRE_PADDINGS = 103, 104, 105
CONVOLUTION_SPATIAL_DIMS = 106
# per operation kind: alpha, beta, conv desc, then its three tensors by our uid names
OPERATION_ATTRS = {
    "forward": {"alpha": 700, "beta": 701, "conv": 702, "w": 703, "x": 704, "y": 705},
    "data": {"alpha": 706, "beta": 707, "conv": 708, "w": 709, "x": 710, "y": 711},     # x: dx, y: dy
    "filter": {"alpha": 712, "beta": 713, "conv": 714, "w": 715, "x": 716, "y": 717},   # w: dw, y: dy
}
OPERATIONGRAPH_HANDLE, OPERATIONGRAPH_OPS = 800, 801
ENGINEHEUR_MODE, ENGINEHEUR_OPERATION_GRAPH, ENGINEHEUR_RESULTS = 200, 201, 202
ENGINECFG_ENGINE = 300
ENGINE_NUMERICAL_NOTE, ENGINE_BEHAVIOR_NOTE = 1303, 1305
EXECUTION_PLAN_HANDLE, EXECUTION_PLAN_ENGINE_CONFIG, EXECUTION_PLAN_WORKSPACE_SIZE = 400, 401, 402
VARIANT_PACK_UNIQUE_IDS, VARIANT_PACK_DATA_POINTERS, VARIANT_PACK_WORKSPACE = 1000, 1001, 1003
# cudnnBackendHeurMode_t
HEUR_MODE_FALLBACK, HEUR_MODE_A = 2, 3
# cudnnBackendNumericalNote_t
NOTE_TENSOR_CORE, NOTE_DOWN_CONVERT_INPUTS, NOTE_NONDETERMINISTIC = 0, 1, 4
# cudnnBackendBehaviorNote_t
NOTE_RUNTIME_COMPILATION = 0

UIDS = {"x": 1, "w": 2, "y": 3}
# every pointer handed to a convolution is a pool block or a bucket view: 256-byte aligned
BYTE_ALIGNMENT = 16
# engines timed on the first call when searching. On an H200 (2026-11-25) the heuristics
# listed up to 32 engines for AlexNet's conv2, and its fastest were the 7th (forward), 11th
# (filter gradient, 0.29 ms against 0.49 for the first) and 28th (data gradient): 8 missed two
FIND_CANDIDATES = 32
TIMED_RUNS = 3           # runs per candidate (after one untimed)
VARIANT_PACKS_KEPT = 16  # per plan: the operand pointers of a step repeat, step after step

_declared = None


def lib():
    """libcudnn with the backend functions declared (on top of cudnn.lib()'s)."""
    global _declared
    L = cudnn.lib()
    if _declared is not L:
        vp, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        P = ctypes.POINTER
        for name, argtypes in {
            "cudnnBackendCreateDescriptor": [i, P(vp)],
            "cudnnBackendDestroyDescriptor": [vp],
            "cudnnBackendFinalize": [vp],
            # (desc, attribute name, attribute type, element count, *elements)
            "cudnnBackendSetAttribute": [vp, i, i, i64, vp],
            # (desc, attribute name, attribute type, requested count, *count, *elements)
            "cudnnBackendGetAttribute": [vp, i, i, i64, P(i64), vp],
            "cudnnBackendExecute": [vp, vp, vp],
        }.items():
            f = getattr(L, name)
            f.argtypes, f.restype = argtypes, i
        _declared = L
    return L


def _call(name, *args):
    cudnn.check(getattr(lib(), name)(*args), name)


def status_of(error):
    """The cuDNN status a CudnnError ends with (CUDNN_STATUS_NOT_SUPPORTED, ...)."""
    return str(error).rsplit(" ", 1)[-1]


_ELEMENT = {TYPE_HANDLE: ctypes.c_void_p, TYPE_DATA_TYPE: ctypes.c_int, TYPE_INT64: ctypes.c_int64,
            TYPE_FLOAT: ctypes.c_float, TYPE_DOUBLE: ctypes.c_double, TYPE_VOID_PTR: ctypes.c_void_p,
            TYPE_CONVOLUTION_MODE: ctypes.c_int, TYPE_HEUR_MODE: ctypes.c_int, TYPE_NUMERICAL_NOTE: ctypes.c_int,
            TYPE_BEHAVIOR_NOTE: ctypes.c_int, TYPE_BACKEND_DESCRIPTOR: ctypes.c_void_p}


class Descriptor:
    """One cudnnBackendDescriptor_t, destroyed with the object."""

    def __init__(self, kind):
        self.ptr = ctypes.c_void_p()
        _call("cudnnBackendCreateDescriptor", kind, ctypes.byref(self.ptr))
        _alive[next(_made)] = self

    def set(self, name, attr_type, values):
        """Set attribute `name` to the list `values` (descriptors given as Descriptors)."""
        values = [v.ptr if isinstance(v, Descriptor) else v for v in values]
        array = (_ELEMENT[attr_type] * len(values))(*values)
        _call("cudnnBackendSetAttribute", self.ptr, name, attr_type, len(values), ctypes.cast(array, ctypes.c_void_p))
        return self

    def finalize(self):
        _call("cudnnBackendFinalize", self.ptr)
        return self

    def get(self, name, attr_type, count=1):
        """Up to `count` elements of attribute `name`, as a list."""
        array = (_ELEMENT[attr_type] * max(count, 1))()
        returned = ctypes.c_int64(0)
        _call("cudnnBackendGetAttribute", self.ptr, name, attr_type, count, ctypes.byref(returned),
              ctypes.cast(array, ctypes.c_void_p))
        return list(array[:returned.value])

    def get_descriptors(self, name, kind, count):
        """Attribute `name` read into `count` new descriptors of `kind` (how cuDNN hands back
        engine configurations and engines); those it filled, in order."""
        made = [Descriptor(kind) for _ in range(count)]
        array = (ctypes.c_void_p * count)(*[d.ptr.value for d in made])
        returned = ctypes.c_int64(0)
        _call("cudnnBackendGetAttribute", self.ptr, name, TYPE_BACKEND_DESCRIPTOR, count, ctypes.byref(returned),
              ctypes.cast(array, ctypes.c_void_p))
        return made[:returned.value]

    def destroy(self):
        if self.ptr and _declared is not None:
            _declared.cudnnBackendDestroyDescriptor(self.ptr)
        self.ptr = None

    def __del__(self):
        self.destroy()


# every descriptor not yet destroyed, by creation order
_alive = weakref.WeakValueDictionary()
_made = itertools.count()


def destroy_all():
    """Destroy every descriptor still alive, newest first, before the cuDNN handle goes
    (State.close). Execution plans and operation graphs hold the handle: one kept alive
    past it (by a test's traceback, a reference cycle) was otherwise destroyed later by the
    garbage collector, after the handle and its CUDA context, and that crashed the process
    (a segfault at the end of the GPU tests, H200, 2026-11-25)."""
    for number in sorted(_alive.keys(), reverse=True):
        descriptor = _alive.get(number)
        if descriptor is not None:
            descriptor.destroy()


def tensor(name, shape, dtype):
    """A packed NCHW tensor descriptor for operand `name` (x, w or y)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return (Descriptor(TENSOR)
            .set(TENSOR_DATA_TYPE, TYPE_DATA_TYPE, [cudnn.data_type(dtype)])
            .set(TENSOR_DIMENSIONS, TYPE_INT64, list(shape))
            .set(TENSOR_STRIDES, TYPE_INT64, strides)
            .set(TENSOR_UNIQUE_ID, TYPE_INT64, [UIDS[name]])
            .set(TENSOR_BYTE_ALIGNMENT, TYPE_INT64, [BYTE_ALIGNMENT])
            .finalize())


def convolution(stride, pad, dtype):
    """2-d cross-correlation (what PyTorch and Caffe call convolution); groups follow from
    the tensors (w is (K, C/groups, R, S))."""
    return (Descriptor(CONVOLUTION)
            .set(CONVOLUTION_SPATIAL_DIMS, TYPE_INT64, [2])
            .set(CONVOLUTION_COMP_TYPE, TYPE_DATA_TYPE, [cudnn.data_type(dtype)])
            .set(CONVOLUTION_CONV_MODE, TYPE_CONVOLUTION_MODE, [cudnn.CUDNN_CROSS_CORRELATION])
            .set(CONVOLUTION_DILATIONS, TYPE_INT64, [1, 1])
            .set(CONVOLUTION_FILTER_STRIDES, TYPE_INT64, [stride, stride])
            .set(CONVOLUTION_PRE_PADDINGS, TYPE_INT64, [pad, pad])
            .set(CONVOLUTION_POST_PADDINGS, TYPE_INT64, [pad, pad])
            .finalize())


def operation(kind, conv, tensors, dtype):
    """The operation node of `kind` (forward, data, filter): y = w * x, dx from dy and w,
    or dw from x and dy; alpha 1, beta 0 (outputs are overwritten)."""
    attrs = OPERATION_ATTRS[kind]
    scalar = TYPE_DOUBLE if dtype.char == "d" else TYPE_FLOAT
    op = (Descriptor(OPERATION[kind])
          .set(attrs["alpha"], scalar, [1.0])
          .set(attrs["beta"], scalar, [0.0])
          .set(attrs["conv"], TYPE_BACKEND_DESCRIPTOR, [conv]))
    for name in ("x", "w", "y"):
        op.set(attrs[name], TYPE_BACKEND_DESCRIPTOR, [tensors[name]])
    return op.finalize()


def operation_graph(handle, op):
    return (Descriptor(OPERATIONGRAPH)
            .set(OPERATIONGRAPH_HANDLE, TYPE_HANDLE, [handle])
            .set(OPERATIONGRAPH_OPS, TYPE_BACKEND_DESCRIPTOR, [op])
            .finalize())


def engine_configs(graph, mode):
    """The engine configurations heuristics `mode` offers for `graph`, best first."""
    heuristics = (Descriptor(ENGINEHEUR)
                  .set(ENGINEHEUR_OPERATION_GRAPH, TYPE_BACKEND_DESCRIPTOR, [graph])
                  .set(ENGINEHEUR_MODE, TYPE_HEUR_MODE, [mode])
                  .finalize())
    count = ctypes.c_int64(0)
    _call("cudnnBackendGetAttribute", heuristics.ptr, ENGINEHEUR_RESULTS, TYPE_BACKEND_DESCRIPTOR, 0,
          ctypes.byref(count), None)
    return heuristics.get_descriptors(ENGINEHEUR_RESULTS, ENGINECFG, count.value) if count.value else []


def heuristic_configs(graph):
    """Mode A's configurations, then the fallback mode's, in the heuristics' order (_choose
    puts those needing runtime compilation last); and the heuristics queries that failed,
    as text."""
    configs, failures = [], []
    for mode, name in ((HEUR_MODE_A, "mode A"), (HEUR_MODE_FALLBACK, "fallback")):
        try:
            configs += engine_configs(graph, mode)
        except cudnn.CudnnError as e:
            failures.append(f"the {name} heuristics failed ({status_of(e)})")
    return configs, failures


def needs_runtime_compilation(config):
    """Whether an engine is built with NVRTC; False where cuDNN cannot say (an older cuDNN
    without behaviour notes), which only loses the ordering."""
    try:
        return NOTE_RUNTIME_COMPILATION in notes(config, ENGINE_BEHAVIOR_NOTE, TYPE_BEHAVIOR_NOTE)
    except cudnn.CudnnError:
        return False


def notes(config, attribute, attr_type):
    """The set of an engine configuration's numerical or behaviour notes."""
    engine = config.get_descriptors(ENGINECFG_ENGINE, ENGINE, 1)
    return set(engine[0].get(attribute, attr_type, 16)) if engine else set()


def numerical_notes(config):
    return notes(config, ENGINE_NUMERICAL_NOTE, TYPE_NUMERICAL_NOTE)


def allowed(notes, dtype, tf32, deterministic=False):
    """An engine's numerical notes are acceptable: inputs never down-converted, TF32
    tensor cores for float32 only when TF32 is allowed, and, when asked, deterministic."""
    if NOTE_DOWN_CONVERT_INPUTS in notes or (deterministic and NOTE_NONDETERMINISTIC in notes):
        return False
    return tf32 or dtype.char != "f" or NOTE_TENSOR_CORE not in notes


def execution_plan(handle, config):
    plan = (Descriptor(EXECUTION_PLAN)
            .set(EXECUTION_PLAN_HANDLE, TYPE_HANDLE, [handle])
            .set(EXECUTION_PLAN_ENGINE_CONFIG, TYPE_BACKEND_DESCRIPTOR, [config])
            .finalize())
    return plan, int(plan.get(EXECUTION_PLAN_WORKSPACE_SIZE, TYPE_INT64)[0])


def variant_pack(pointers, workspace):
    """pointers: {uid: device address}; workspace: a device address or 0."""
    uids = sorted(pointers)
    return (Descriptor(VARIANT_PACK)
            .set(VARIANT_PACK_UNIQUE_IDS, TYPE_INT64, uids)
            .set(VARIANT_PACK_DATA_POINTERS, TYPE_VOID_PTR, [pointers[u] for u in uids])
            .set(VARIANT_PACK_WORKSPACE, TYPE_VOID_PTR, [workspace or None])
            .finalize())


class GraphConvPlan:
    """The graph-API counterpart of conv.ConvPlan: for one (shapes, stride, pad, groups,
    dtype, tf32), the three kinds' execution plans, each chosen on its first call."""

    def __init__(self, st, x_shape, w_shape, stride, pad, groups, dtype):
        self.y_shape = cudnn.conv_output_shape(x_shape, w_shape, stride, pad)
        if min(self.y_shape[2:]) < 1:
            raise ValueError(f"convolution of {x_shape} with {w_shape}, stride {stride}, pad {pad} has an empty output")
        self.x_shape, self.w_shape, self.dtype, self.tf32 = x_shape, w_shape, dtype, st.tf32
        self.tensors = {"x": tensor("x", x_shape, dtype), "w": tensor("w", w_shape, dtype),
                        "y": tensor("y", self.y_shape, dtype)}
        self.conv = convolution(stride, pad, dtype)
        self.plans = {}    # kind -> (plan descriptor, workspace bytes, {pointers: variant pack})
        # what each plan was built from stays alive with it: cuDNN's own frontend keeps the
        # operation graph and engine configuration of a plan as long as the plan
        self.sources = {}  # kind -> (operation, graph, engine configurations)

    def run(self, st, kind, x, w, y):
        """Queue `kind` on the backend stream; x, w, y are device addresses (for data, x is
        dx; for filter, w is dw)."""
        pointers = {UIDS["x"]: x, UIDS["w"]: w, UIDS["y"]: y}
        if kind not in self.plans:
            self.plans[kind] = self._choose(st, kind, pointers)
        plan, ws_bytes, packs = self.plans[kind]
        workspace = st.workspace_ptr(ws_bytes)
        key = (x, w, y, workspace)
        pack = packs.get(key)
        if pack is None:
            if len(packs) >= VARIANT_PACKS_KEPT:
                packs.clear()
            pack = packs[key] = variant_pack(pointers, workspace)
        _call("cudnnBackendExecute", st.dnn.ptr, plan.ptr, pack.ptr)

    def _choose(self, st, kind, pointers):
        op = operation(kind, self.conv, self.tensors, self.dtype)
        graph = operation_graph(st.dnn.ptr, op)
        configs, heuristics_failed = heuristic_configs(graph)
        self.sources[kind] = (op, graph, configs)
        passed_over = {"skipped": 0, "too_big": 0, "failed": []}
        # engines built by NVRTC (sorted last, seconds each to build) only when no precompiled
        # one builds and runs
        compiled = [needs_runtime_compilation(config) for config in configs]
        for tier in ([c for c, nvrtc in zip(configs, compiled) if not nvrtc],
                     [c for c, nvrtc in zip(configs, compiled) if nvrtc]):
            candidates = self._buildable(st, tier, passed_over)
            if len(candidates) > 1:
                candidates = self._fastest_first(st, candidates, pointers, passed_over["failed"])
            if candidates:
                plan, ws_bytes = candidates[0]
                return plan, ws_bytes, {}
        reasons = list(heuristics_failed)
        if passed_over["skipped"]:
            reasons.append(f"{passed_over['skipped']} down-convert their inputs, or use tensor cores with TF32 off "
                           f"(MPICONVNET_TF32=1 allows those), or are not deterministic with "
                           f"MPICONVNET_DETERMINISTIC=1")
        if passed_over["too_big"]:
            reasons.append(f"{passed_over['too_big']} need more than the {st.workspace_limit >> 20} MiB workspace "
                           f"(raise MPICONVNET_CUDNN_WORKSPACE_MB)")
        failed = passed_over["failed"]
        if failed:
            reasons.append(f"{len(failed)} plans failed to build or to run ({', '.join(sorted(set(failed)))})")
        raise cudnn.CudnnError(f"cuDNN graph API: no usable engine for the convolution {kind} of x "
                               f"{self.x_shape} with w {self.w_shape} among {len(configs)} configurations"
                               + (": " + "; ".join(reasons) if reasons else ""))

    def _buildable(self, st, configs, passed_over):
        """(plan, workspace bytes) of the first configurations, in order, whose numerical
        notes are allowed, whose plan builds and whose workspace fits: up to FIND_CANDIDATES
        (MPICONVNET_CUDNN_FIND=0: the first). What is passed over is counted in passed_over."""
        limit = FIND_CANDIDATES if st.find_algorithms else 1
        candidates = []
        for config in configs:
            try:   # an engine that cannot tell its notes or build its plan is passed over
                if not allowed(numerical_notes(config), self.dtype, self.tf32, st.deterministic):
                    passed_over["skipped"] += 1
                    continue
                plan, ws_bytes = execution_plan(st.dnn.ptr, config)
            except cudnn.CudnnError as e:
                passed_over["failed"].append(status_of(e))
                continue
            if ws_bytes > st.workspace_limit:
                passed_over["too_big"] += 1
                continue
            candidates.append((plan, ws_bytes))
            if len(candidates) == limit:
                break
        return candidates

    def _fastest_first(self, st, candidates, pointers, failed):
        """The candidates sorted fastest first, each timed on the first call's own operands;
        one whose execute fails is dropped (its status added to failed), as cuDNN's frontend
        does. One scratch workspace, the largest any candidate needs, serves them all and goes
        back to the driver afterwards, as cudnnFind*'s own does: grown candidate by candidate
        through the state's workspace, the pool kept a block of every size it passed (3.97 GB
        held against 2.07 with 8 engines timed, alexnet-owt TF32 batch 128, H200 2026-11-25)."""
        from .memory import empty
        largest = max(ws_bytes for _, ws_bytes in candidates)
        scratch = empty((largest,), "uint8") if largest else None
        workspace = scratch.ptr if scratch is not None else 0
        timed = []
        for index, candidate in enumerate(candidates):
            try:
                timed.append((self._time(st, candidate[0], pointers, workspace), index, candidate))
            except cudnn.CudnnError as e:
                failed.append(status_of(e))
        del scratch          # the timing runs are done: _time waited for each
        st.pool.free_held()
        return [candidate for _, _, candidate in sorted(timed, key=lambda t: t[:2])]

    def _time(self, st, plan, pointers, workspace):
        """Milliseconds of one run of a candidate plan, best of TIMED_RUNS after one untimed."""
        pack = variant_pack(pointers, workspace)
        start, end = st.drv.Event(), st.drv.Event()
        best = None
        for run in range(TIMED_RUNS + 1):
            start.record(st.stream)
            _call("cudnnBackendExecute", st.dnn.ptr, plan.ptr, pack.ptr)
            end.record(st.stream)
            end.synchronize()
            if run:
                elapsed = end.time_since(start)
                best = elapsed if best is None else min(best, elapsed)
        return best
