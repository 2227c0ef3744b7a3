"""A decode step's control flow, decided on the device: pieces and branches, run eagerly, by the host or by the GPU.

A *plan* is one decode step (or speculative cycle) written as pieces — callables that read and write buffers
allocated before them, in place — in sequence, and :class:`Branch` es on a 0-d bool flag that the work before wrote on
the device ("has every row exited at this check?", "is any row still running?"). Three ways to run a plan:

* **eager** (the CPU, or CUDA graphs off): each piece runs as it is; a branch reads its flag on the host.
* **host** (``generation.decide host``): each piece is captured as its own CUDA graph; the host replays them and reads
  each flag between them, a synchronisation per branch. On a small model that round trip costs two to three layers
  (docs/decoding.md); it stays as the reference the device-decided engine is tested against, and as the baseline.
* **device** (``generation.decide device``): the whole plan is captured as one CUDA graph whose branches are
  conditional IF nodes (CUDA ≥ 12.4; an IF node with an else branch needs 12.8): a one-thread kernel sets each
  node's condition from its flag, the GPU takes the branch, and the host launches one graph per step without waiting
  for it.

Two ways to build conditional nodes, by what the installed torch offers: torch's own
``CUDAGraph.begin_capture_to_if_node`` (torch ≥ 2.12; an else branch is a second IF node on the negated flag), or the
CUDA driver API through ``cuda-bindings`` (:class:`DriverNodes`: the condition kernel compiled once with NVRTC, one IF
node with an else branch, the body graphs captured from streams of their own, every allocation routed to the graph's
memory pool). ``auto`` takes torch's where it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

import torch

from earlyexit.errors import EarlyExitError
from earlyexit.generation import Decide

Nodes = Literal["auto", "torch", "driver"]


@dataclass(frozen=True)
class Branch:
    """Run ``then`` where ``flag`` (a 0-d bool tensor written by the work before) is true, else ``otherwise``."""

    flag: torch.Tensor
    then: Plan
    otherwise: Plan = ()


Plan = Union[Callable[[], Any], Branch, Sequence["Plan"]]


def pieces(plan: Plan) -> list[Callable[[], Any]]:
    """Every piece of ``plan`` once, in the order a capture meets them (each branch's both sides)."""
    if isinstance(plan, Branch):
        return pieces(plan.then) + pieces(plan.otherwise)
    if callable(plan):
        return [plan]
    return [piece for part in plan for piece in pieces(part)]


def walk(plan: Plan, run: Callable[[Callable], Any] = lambda piece: piece()) -> None:
    """Run ``plan`` with the host deciding: each branch reads its flag (a synchronisation on a GPU)."""
    if isinstance(plan, Branch):
        walk(plan.then if bool(plan.flag) else plan.otherwise, run)
    elif callable(plan):
        run(plan)
    else:
        for part in plan:
            walk(part, run)


def device_decisions(nodes: Nodes = "auto") -> Nodes | None:
    """Which way conditional nodes can be built here (``torch`` or ``driver``), or None where neither can."""
    if not torch.cuda.is_available():
        return None
    if nodes in ("auto", "torch") and hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return "torch"
    if nodes == "torch":
        return None
    try:
        DriverNodes.check()
    except (ImportError, EarlyExitError):
        return None
    return "driver"


def resolve(decide: Decide, nodes: Nodes = "auto") -> tuple[Literal["device", "host"], Nodes | None]:
    """``generation.decide`` on a GPU with CUDA graphs: ``auto`` is ``device`` where conditional nodes can be built,
    else ``host``; ``device`` where they cannot is refused in one line."""
    way = device_decisions(nodes)
    if decide == "host":
        return "host", None
    if way is None:
        if decide == "device":
            raise EarlyExitError("generation.decide device needs CUDA graph conditional nodes: CUDA ≥ 12.4 and either "
                                 "torch ≥ 2.12 or the cuda-bindings package (pip install cuda-bindings); or set "
                                 "generation.decide host")
        return "host", None
    return "device", way


def capture(plan: Plan, state: list[torch.Tensor], device, nodes: Nodes) -> Callable[[], None]:
    """``plan`` captured as one CUDA graph whose branches are conditional nodes; returns its replay.

    Every piece is first run once on a side stream (lazy initialisation, compilation, cuBLAS workspaces: nothing may
    be initialised inside a conditional body), then the plan is captured; ``state`` (the tensors the plan changes) is
    restored after each.
    """
    saved = [tensor.clone() for tensor in state]
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for piece in pieces(plan):
            piece()
    torch.cuda.current_stream(device).wait_stream(stream)
    for tensor, value in zip(state, saved):
        tensor.copy_(value)
    graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
    builder = TorchNodes() if nodes == "torch" else DriverNodes(device, pool)

    def build(part: Plan) -> None:
        if isinstance(part, Branch):
            builder.branch(part.flag, lambda: build(part.then), (lambda: build(part.otherwise)) if part.otherwise else None)
        elif callable(part):
            part()
        else:
            for item in part:
                build(item)

    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        build(plan)
    for tensor, value in zip(state, saved):
        tensor.copy_(value)
    return graph.replay


class TorchNodes:
    """Conditional nodes through torch's own ``CUDAGraph.begin_capture_to_if_node`` (IF only: an else branch is a
    second IF node on the negated flag, computed before the first)."""

    def branch(self, flag: torch.Tensor, then: Callable[[], None], otherwise: Callable[[], None] | None) -> None:
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        negated = torch.logical_not(flag) if otherwise is not None else None
        for condition, body in ((flag, then), (negated, otherwise)):
            if body is None:
                continue
            graph.begin_capture_to_if_node(condition)
            try:
                body()
            finally:
                graph.end_capture_to_conditional_node()


_CONDITION_SOURCE = r"""
typedef __device_builtin__ unsigned long long cudaGraphConditionalHandle;
extern "C" __device__ __cudart_builtin__ void cudaGraphSetConditional(cudaGraphConditionalHandle handle, unsigned int value);
extern "C" __global__ void set_condition(cudaGraphConditionalHandle handle, const bool* flag) {
    cudaGraphSetConditional(handle, *flag ? 1u : 0u);
}
"""
_kernels: dict[int, Any] = {}  # the condition kernel, compiled once per device


class DriverNodes:
    """Conditional nodes through the CUDA driver API (``cuda-bindings``), for a torch without its own.

    At each branch: a one-thread kernel copies the flag into a new condition handle, an IF node (with an else body when
    the branch has one) is added after it, and each body is captured from a stream of its own into the node's body
    graph. torch's allocator routes only the capturing stream's allocations to the graph's pool; from the first branch
    on, every allocation goes there (the capture's thread does nothing else), so the bodies' temporaries live as long
    as the graph.
    """

    def __init__(self, device, pool):
        self.device = torch.device(device)
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.pool = pool
        self.routed = False
        self.depth = 0
        self.kernel = self.compile(self.index)
        for depth in range(1, 5):  # made before the capture begins
            self.stream(depth)

    @staticmethod
    def check() -> None:
        """Refuse (ImportError or EarlyExitError) where the driver API cannot build conditional nodes."""
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
        if err != driver.CUresult.CUDA_SUCCESS or version < 12080:
            raise EarlyExitError(f"the CUDA driver ({version}) is older than 12.8 (IF nodes with an else branch)")
        if not hasattr(torch._C, "_cuda_beginAllocateToPool"):
            raise EarlyExitError("this torch cannot route allocations to a graph's pool")

    @staticmethod
    def compile(index: int):
        if index in _kernels:
            return _kernels[index]
        import numpy as np
        from cuda.bindings import driver, nvrtc

        major, minor = torch.cuda.get_device_capability(index)
        err, program = nvrtc.nvrtcCreateProgram(_CONDITION_SOURCE.encode(), b"condition.cu", 0, [], [])
        _ok(err)
        options = [f"--gpu-architecture=compute_{major}{minor}".encode()]
        (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(program)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(program, log)
            raise EarlyExitError(f"NVRTC could not compile the condition kernel: {log.decode(errors='replace').strip()}")
        _, size = nvrtc.nvrtcGetPTXSize(program)
        ptx = b" " * size
        _ok(nvrtc.nvrtcGetPTX(program, ptx)[0])
        with torch.cuda.device(index):
            torch.cuda.init()
            ptx_array = np.char.array(ptx)
            module = _ok(*driver.cuModuleLoadData(ptx_array.ctypes.data))
            kernel = _ok(*driver.cuModuleGetFunction(module, b"set_condition"))
        _kernels[index] = kernel
        return kernel

    def branch(self, flag: torch.Tensor, then: Callable[[], None], otherwise: Callable[[], None] | None) -> None:
        import numpy as np
        from cuda.bindings import __version__ as version
        from cuda.bindings import driver, runtime

        cuda13 = int(version.split(".")[0]) >= 13
        if not self.routed:
            torch._C._cuda_endAllocateToPool(self.index, self.pool)
            torch._C._cuda_beginAllocateToPool(self.index, self.pool)
            torch._C._cuda_releasePool(self.index, self.pool)  # the begin took a reference the capture's end never returns
            self.routed = True
        stream = torch.cuda.current_stream(self.device)
        graph = _ok(*runtime.cudaStreamGetCaptureInfo(stream.cuda_stream))[2]
        handle = _ok(*runtime.cudaGraphConditionalHandleCreate(graph, 0, 0))
        pointer = np.array([flag.data_ptr()], dtype=np.uint64)
        arguments = np.array([handle.getPtr(), pointer.ctypes.data], dtype=np.uint64)
        _ok(driver.cuLaunchKernel(self.kernel, 1, 1, 1, 1, 1, 1, 0, stream.cuda_stream, arguments.ctypes.data, 0)[0])
        _, _, graph, dependencies, *_ = _ok(*runtime.cudaStreamGetCaptureInfo(stream.cuda_stream))
        size = 1 if otherwise is None else 2  # an IF node with an else body: CUDA ≥ 12.8
        params = driver.CUgraphNodeParams()
        params.type = driver.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
        params.conditional.handle = handle
        params.conditional.type = driver.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
        params.conditional.size = size
        params.conditional.ctx = _ok(*driver.cuCtxGetCurrent())
        if cuda13:  # CUDA 13 added the edge data argument
            node = _ok(*driver.cuGraphAddNode(graph, dependencies, None, len(dependencies), params))
        else:
            node = _ok(*driver.cuGraphAddNode(graph, dependencies, len(dependencies), params))
        if cuda13:
            _ok(runtime.cudaStreamUpdateCaptureDependencies(
                stream.cuda_stream, [node], None, 1, runtime.cudaStreamUpdateCaptureDependenciesFlags.cudaStreamSetCaptureDependencies)[0])
        else:
            _ok(runtime.cudaStreamUpdateCaptureDependencies(
                stream.cuda_stream, [node], 1, runtime.cudaStreamUpdateCaptureDependenciesFlags.cudaStreamSetCaptureDependencies)[0])
        bodies = list(params.conditional.phGraph_out)[:size]
        for body, work in zip(bodies, (then, otherwise)):
            self.depth += 1
            child = self.stream(self.depth)
            try:
                _ok(runtime.cudaStreamBeginCaptureToGraph(child.cuda_stream, body, None, None, 0,
                                                          runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)[0])
                try:
                    with torch.cuda.stream(child):
                        work()
                finally:
                    _ok(runtime.cudaStreamEndCapture(child.cuda_stream)[0])
            finally:
                self.depth -= 1

    def stream(self, depth: int):
        """The stream a body at nesting ``depth`` is captured from: one of our own per depth, never one of torch's pool,
        which hands its streams out round-robin (a body captured from a pool stream failed with cudaErrorIllegalState
        on an H200 after a test had taken many streams: the stream handed out was, we take it, one still capturing)."""
        streams = _streams.setdefault(self.index, [])
        while len(streams) < depth:
            from cuda.bindings import runtime

            raw = _ok(*runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking))
            streams.append(torch.cuda.ExternalStream(int(raw), device=self.device))
        return streams[depth - 1]


_streams: dict[int, list] = {}  # per device, the body-capture streams by nesting depth (made once)


def _ok(err, *values):
    """The values of a ``cuda-bindings`` call after its error code (refused unless it is success)."""
    if int(getattr(err, "value", err)) != 0:
        raise EarlyExitError(f"CUDA driver call failed while building conditional nodes: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values
