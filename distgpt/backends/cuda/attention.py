"""Causal self-attention through fused (flash) attention, without autograd: forward writes the
output and the per-row log-sum-exp, backward takes them back.

Three paths, one `Attention` object choosing per call:
- cuDNN's fused attention through its own Python frontend (`import cudnn`, the cuda extras), the
  default for every shape the object planned. One forward and one backward graph per shape,
  built once; each call binds our buffers (strided views, no copies) and one planned workspace
  and runs on torch's current stream. So O and the statistics land in the (B, T, C) and
  (B, NH, T) buffers, and dQ/dK/dV straight in the (B, T, 3C) gradient, the step allocates
  nothing and a whole step can be captured in a CUDA graph. This replaces the ATen path below
  for the training step, whose copies of out and dqkv took 5.7 ms of a 133.5 ms 124M step at
  B=64 (DESIGN.md). The workspace is the largest planned graph's (`workspace_bytes`, for the
  memory estimate); a graph built later for a smaller batch must fit in it.
- cuDNN through ATen (`_scaled_dot_product_cudnn_attention`), for shapes nobody planned: ATen
  allocates its outputs (torch's caching allocator serves them, so no cudaMalloc after the first
  call) and we copy them into our buffers. Sampling runs every context length (1, t) once per
  token and is not the training step, so a graph per t would cost more to build than it saves.
- FlashAttention-2 with torch's deterministic switch on around its backward (`set_deterministic`):
  cuDNN's backward adds dq up across key tiles with atomics, so dq, and from there the whole
  run, differs in the last bits between two identical runs; FA2 reduces in a fixed order, so runs
  and resumes are bitwise reproducible, at about 0.9 ms more per layer at B=64, T=1024, 12 heads
  on an H100 (benchmarks/attention_determinism.py). It keeps its copies.
benchmarks/attention_bench.py times the three side by side at the 124M and 1558M shapes and
checks the frontend against the ATen path.

Layouts (bf16; statistics fp32). qkv (B, T, 3C) contiguous; q, k, v are views with dims
(B, NH, T, HS), strides (T*3C, HS, 3C, 1) at element offsets 0, C, 2C; out and dout (B, T, C)
are (B, NH, T, HS) with strides (T*C, HS, C, 1); dqkv has qkv's layout. lse (B, NH, T) is cuDNN's
Stats tensor (B, NH, T, 1): max + ln(sum exp(s - max)) over each row of the scaled scores
s = q.k / sqrt(HS) (cuDNN's default; stats_use_log2 would scale it by log2(e)): the natural-log
log-sum-exp, the same quantity as the reference's lse and FA2's softmax_lse."""
import math
from typing import NamedTuple

import torch

ATTENTION = torch.ops.aten._scaled_dot_product_cudnn_attention
ATTENTION_BACKWARD = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
FLASH = torch.ops.aten._flash_attention_forward
FLASH_BACKWARD = torch.ops.aten._flash_attention_backward
# operand uids in the frontend graphs (fixed, so the per-call binding is one ordered list)
Q, K, V, O, STATS, DO, DQ, DK, DV = 1, 2, 3, 100, 101, 200, 201, 202, 203
FORWARD_UIDS = (Q, K, V, O, STATS)
BACKWARD_UIDS = (Q, K, V, O, DO, STATS, DQ, DK, DV)
# graphs built after plan() for a smaller batch at a planned T (validation's last batches, a
# sample whose context fills T); past this many the oldest is dropped. Planned ones stay.
MAX_LAZY_GRAPHS = 8


def _import_cudnn():
    try:
        import cudnn
    except (ImportError, OSError) as exc:
        raise ModuleNotFoundError(f"cuDNN's Python frontend is missing ({exc}): pip install "
                                  f"'distgpt[cuda12]' or 'distgpt[cuda13]' (nvidia-cudnn-frontend)") from None
    return cudnn


class _Graph(NamedTuple):
    graph: object  # cudnn.pygraph, built
    uids: tuple  # operand order of the per-call buffer list
    workspace_bytes: int
    engine: str  # which engine serves it: "cudnn backend" or a frontend Python engine's name


def _build_error(kind, shape, exc):
    """cuDNN's reasons are long; the first line names the cause."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RuntimeError(f"cuDNN attention cannot build its {kind} graph for (B, T, NH, HS) = {shape}: "
                        f"{first} (deterministic=true runs FlashAttention-2 instead)")


def _heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v as (B, NH, T, HS) views."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // n_head
    return qkv.view(B, T, 3, n_head, HS).permute(2, 0, 3, 1, 4).unbind(0)


def _check(**tensors):
    """What the frontend graphs were declared with: bf16 (lse fp32), contiguous, 16-byte aligned."""
    for name, t in tensors.items():
        dtype = torch.float32 if name == "lse" else torch.bfloat16
        if t.dtype != dtype or not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"attention: {name} must be a contiguous, 16-byte aligned {dtype} tensor "
                             f"(got {t.dtype}, strides {t.stride()}, address {t.data_ptr():#x})")


class Attention:
    """The cuDNN handle, the graphs (keyed by kind and (B, T, NH, HS)), the one workspace they
    share and the deterministic switch, for one device."""

    def __init__(self):
        self.deterministic = False
        self.device = None
        self.workspace = None  # uint8, the largest planned graph's workspace
        self._cudnn = self._handle = None
        self._planned = {}  # (T, NH, HS) -> the largest planned B
        self._graphs = {}  # ("fwd" | "bwd", B, T, NH, HS) -> _Graph
        self._lazy = []  # keys built after plan(), oldest first
        self._deferred = []  # plan() calls made in deterministic mode
        self._philox = {}  # the ATen and FA2 paths' dropout RNG state, see _aten_forward

    @property
    def workspace_bytes(self):
        return 0 if self.workspace is None else self.workspace.numel()

    def set_deterministic(self, flag):
        """FlashAttention-2 for every call while on. Turning it off builds what plan() deferred."""
        self.deterministic = bool(flag)
        if not self.deterministic:
            while self._deferred:
                self._plan(*self._deferred.pop(0))

    def engines(self):
        """key -> the engine serving that graph (for benchmarks and reports)."""
        return {key: g.engine for key, g in self._graphs.items()}

    # ------------------------------------------------------------ planning
    def plan(self, B, T, C, n_head, device):
        """Build the forward and backward graphs for (B, T) and size the workspace for the largest
        graph planned so far. Calls for b <= B at this T take the frontend from then on. In
        deterministic mode this waits until the mode is turned off: FA2 needs neither."""
        if self.deterministic:
            self._deferred.append((B, T, C, n_head, device))
        else:
            self._plan(B, T, C, n_head, device)

    def _plan(self, B, T, C, n_head, device):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"attention.plan: cuDNN attention needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if C % n_head or (C // n_head) % 8:
            raise ValueError(f"attention.plan: head size C/NH = {C}/{n_head} must be a whole multiple of 8")
        if self._handle is None:
            self._cudnn = _import_cudnn()
            with torch.cuda.device(device):
                self._handle = self._cudnn.create_handle()
            self.device = device
        elif device != self.device:
            raise ValueError(f"attention.plan: this Attention serves {self.device}, not {device}")
        HS = C // n_head
        needed = self.workspace_bytes
        for kind in ("fwd", "bwd"):
            key = (kind, B, T, n_head, HS)
            if key not in self._graphs:
                self._graphs[key] = self._build(*key)
            if key in self._lazy:  # planned now: never dropped
                self._lazy.remove(key)
            needed = max(needed, self._graphs[key].workspace_bytes)
        if needed > self.workspace_bytes or self.workspace is None:
            self.workspace = torch.empty(max(needed, 1), dtype=torch.uint8, device=device)
        self._planned[(T, n_head, HS)] = max(B, self._planned.get((T, n_head, HS), 0))

    def _build(self, kind, B, T, NH, HS):
        g, uids = self._declare(kind, B, T, NH, HS)
        try:
            g.build_plans()
        except Exception as exc:
            raise _build_error(kind, (B, T, NH, HS), exc) from exc
        engine = "cudnn backend" if g.selected_engine is None else g.selected_engine.name
        return _Graph(g, uids, int(g.get_workspace_size()), engine)

    def _declare(self, kind, B, T, NH, HS):
        """The graph for (kind, B, T, NH, HS) with its ranked execution plans, none built yet:
        (graph, operand uids)."""
        cudnn = self._cudnn
        bf16, fp32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
        C = NH * HS
        dims, stats_dims = [B, NH, T, HS], [B, NH, T, 1]
        qkv_stride, out_stride, stats_stride = [T * 3 * C, HS, 3 * C, 1], [T * C, HS, C, 1], [NH * T, T, 1, 1]
        g = cudnn.pygraph(handle=self._handle, io_data_type=bf16, intermediate_data_type=fp32,
                          compute_data_type=fp32)
        q, k, v = (g.tensor(name=n, dim=dims, stride=qkv_stride, data_type=bf16, uid=u)
                   for n, u in (("q", Q), ("k", K), ("v", V)))
        # causal as cuDNN prefers to spell it: nothing right of the top-left-aligned diagonal
        mask = dict(attn_scale=1.0 / math.sqrt(HS), diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                    diagonal_band_right_bound=0)
        if kind == "fwd":
            o, stats = g.sdpa(name="attention", q=q, k=k, v=v, generate_stats=True, **mask)
            o.set_uid(O).set_output(True).set_dim(dims).set_stride(out_stride).set_data_type(bf16)
            stats.set_uid(STATS).set_output(True).set_dim(stats_dims).set_stride(stats_stride)
            stats.set_data_type(fp32)
            uids = FORWARD_UIDS
        else:
            o, do = (g.tensor(name=n, dim=dims, stride=out_stride, data_type=bf16, uid=u)
                     for n, u in (("o", O), ("dO", DO)))
            stats = g.tensor(name="stats", dim=stats_dims, stride=stats_stride, data_type=fp32, uid=STATS)
            grads = g.sdpa_backward(name="attention_backward", q=q, k=k, v=v, o=o, dO=do, stats=stats, **mask)
            for grad, uid in zip(grads, (DQ, DK, DV)):
                grad.set_uid(uid).set_output(True).set_dim(dims).set_stride(qkv_stride).set_data_type(bf16)
            uids = BACKWARD_UIDS
        try:
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
        except Exception as exc:
            raise _build_error(kind, (B, T, NH, HS), exc) from exc
        return g, uids

    def _graph_for(self, kind, b, t, n_head, HS, dtype):
        """The graph for this call, or None for the ATen path (a T nobody planned, or not bf16)."""
        if dtype != torch.bfloat16:
            return None
        key = (kind, b, t, n_head, HS)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        if b > self._planned.get((t, n_head, HS), 0):
            return None
        graph = self._build(*key)
        if graph.workspace_bytes > self.workspace_bytes:
            raise RuntimeError(f"cuDNN attention's {kind} graph for (B, T, NH, HS) = {(b, t, n_head, HS)} "
                               f"needs {graph.workspace_bytes} workspace bytes, more than the "
                               f"{self.workspace_bytes} planned: plan() this shape too")
        self._graphs[key] = graph
        self._lazy.append(key)
        if len(self._lazy) > MAX_LAZY_GRAPHS:
            del self._graphs[self._lazy.pop(0)]
        return graph

    def _execute(self, graph, buffers):
        # the handle follows torch's stream every call (cudnn.set_stream skips an unchanged one):
        # no host sync and no allocation here, so this records into a CUDA graph capture too
        self._cudnn.set_stream(self._handle, torch.cuda.current_stream(self.device).cuda_stream)
        graph.graph.execute(list(buffers), self.workspace, handle=self._handle, tensor_uids=graph.uids)

    # ------------------------------------------------------------ the step
    def forward(self, out, lse, qkv, n_head):
        """out (B,T,C) = causal softmax(q k^T / sqrt(HS)) v; lse (B,NH,T) fp32 saved for backward."""
        if self.deterministic:
            return _flash_forward(self._philox, out, lse, qkv, n_head)
        B, T, C = out.shape
        graph = self._graph_for("fwd", B, T, n_head, C // n_head, qkv.dtype)
        if graph is None:
            return _aten_forward(self._philox, out, lse, qkv, n_head)
        _check(qkv=qkv, out=out, lse=lse)
        q, k, v = _heads(qkv, n_head)
        o = out.view(B, T, n_head, C // n_head).transpose(1, 2)
        self._execute(graph, (q, k, v, o, lse.unsqueeze(-1)))

    def backward(self, dqkv, dout, qkv, out, lse, n_head):
        """dqkv (B,T,3C) = gradient through attention (overwrites)."""
        if self.deterministic:
            return _flash_backward(self._philox, dqkv, dout, qkv, out, lse, n_head)
        B, T, C = dout.shape
        HS = C // n_head
        graph = self._graph_for("bwd", B, T, n_head, HS, qkv.dtype)
        if graph is None:
            return _aten_backward(self._philox, dqkv, dout, qkv, out, lse, n_head)
        _check(dqkv=dqkv, dout=dout, qkv=qkv, out=out, lse=lse)
        q, k, v = _heads(qkv, n_head)
        o, do = (t.view(B, T, n_head, HS).transpose(1, 2) for t in (out, dout))
        dq, dk, dv = _heads(dqkv, n_head)
        self._execute(graph, (q, k, v, o, do, lse.unsqueeze(-1), dq, dk, dv))


# ---------------------------------------------------------------- cuDNN through ATen, with copies
# philox: the forward's dropout RNG state (seed, offset), meaningless without dropout, but the
# backward ops take them as tensors, so the first forward's are kept and handed back
def _aten_forward(philox, out, lse, qkv, n_head):
    B, T, C = out.shape
    q, k, v = _heads(qkv, n_head)
    result = ATTENTION(q, k, v, None, True, 0.0, True, False)
    out.view(B, T, n_head, C // n_head).copy_(result[0].transpose(1, 2))
    lse.copy_(result[1].view(B, n_head, T))
    philox.setdefault(qkv.device, (result[6], result[7], result[1].dim()))


def _aten_backward(philox, dqkv, dout, qkv, out, lse, n_head):
    B, T, C = dout.shape
    HS = C // n_head
    q, k, v = _heads(qkv, n_head)
    o = out.view(B, T, n_head, HS).transpose(1, 2)
    do = dout.view(B, T, n_head, HS).transpose(1, 2)
    seed, offset, lse_dims = philox[qkv.device]
    stats = lse.unsqueeze(-1) if lse_dims == 4 else lse
    # no bias and no variable-length sequences: None, as torch's own autograd passes them
    dq, dk, dv = ATTENTION_BACKWARD(do, q, k, v, o, stats, seed, offset, None, None, None, T, T, 0.0, True)
    dq_heads = dqkv.view(B, T, 3, n_head, HS)
    dq_heads[:, :, 0].copy_(dq.transpose(1, 2))
    dq_heads[:, :, 1].copy_(dk.transpose(1, 2))
    dq_heads[:, :, 2].copy_(dv.transpose(1, 2))


# ---------------------------------------------------------------- FlashAttention-2, deterministic
def _flash_heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v as (B, T, NH, HS) views: FlashAttention's own layout."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_head, C3 // 3 // n_head).unbind(2)


def _flash_forward(philox, out, lse, qkv, n_head):
    B, T, C = out.shape
    q, k, v = _flash_heads(qkv, n_head)
    result = FLASH(q, k, v, None, None, T, T, 0.0, True, False)
    out.view(B, T, n_head, C // n_head).copy_(result[0])
    lse.copy_(result[1])
    philox.setdefault(("flash", qkv.device), (result[2], result[3]))


def _flash_backward(philox, dqkv, dout, qkv, out, lse, n_head):
    B, T, C = dout.shape
    q, k, v = _flash_heads(qkv, n_head)
    o, do = out.view(B, T, n_head, C // n_head), dout.view(B, T, n_head, C // n_head)
    rng_state, unused = philox[("flash", qkv.device)]
    # FlashAttention-2 reads torch's deterministic switch when it launches (and only in strict
    # mode); switched on for this call alone, it touches nothing else of the step
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        dq, dk, dv = FLASH_BACKWARD(do, q, k, v, o, lse, None, None, T, T, 0.0, True, rng_state, unused)[:3]
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    heads = dqkv.view(B, T, 3, n_head, C // n_head)
    heads[:, :, 0].copy_(dq)
    heads[:, :, 1].copy_(dk)
    heads[:, :, 2].copy_(dv)
