"""Context-parallel varlen attention (varlen_compile.distributed) on two and four processes.

CPU: the gloo backend, processes spawned by the test (CI runs this). Every case compares each
rank's output and gradients with single-process attention on the whole batch, under the error
rule against the float64 reference: documents spanning ranks, empty and single-token documents,
causal and not, a causal window, GQA, and a compiled call; and that a compiled graph keeps only
the rank's own tensors from forward to backward. Two ranks check the all-gather exchange; four
ranks check both exchanges (all-gather and ring) on the same cases, eagerly, and one compiled
case each; the ring's compiled case also covers tokens no document holds (they attend no key
in any step), and its graphs are checked to keep one K/V block per rank. The GPU variant runs
the two-rank cases with NCCL on two GPUs (marked gpu and multigpu), with both exchanges, then
real sizes (bf16, head dim 128, 16384 tokens, compiled with Inductor, the reference on each
rank's GPU). On one GPU (marked gpu), the same again with both ranks as threads of one process
over torch's threaded process group.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from factory import AttnSpec, VarlenCase, assert_meets_error_rule, reference_outputs

# Global batches of 64 tokens (4 zig-zag chunks of 16 on 2 ranks): documents spanning chunks
# and ranks, empty and single-token documents.
CASES = {
    "causal-spanning": AttnSpec((40, 0, 1, 23), heads_q=4, heads_kv=4, is_causal=True),
    "full-spanning": AttnSpec((7, 50, 1, 6), heads_q=4, heads_kv=4),
    "causal-gqa-window": AttnSpec((64,), heads_q=6, heads_kv=2, is_causal=True, window_size=(9, 0)),
    "causal-many-short": AttnSpec((3, 1, 0, 12, 5, 17, 2, 24), heads_q=3, heads_kv=1, is_causal=True),
}
# Real sizes for two GPUs: 16384 tokens (chunks of 4096), bf16, head dim 128; documents spanning
# two and three chunks, an empty and a one-token document.
GPU_CASES = {
    "gpu-causal-gqa": AttnSpec((3000, 1, 0, 6000, 5000, 2383), heads_q=16, heads_kv=4, head_dim=128, is_causal=True),
    "gpu-full": AttnSpec((7000, 1, 9383), heads_q=8, heads_kv=8, head_dim=128),
    "gpu-causal-window": AttnSpec((9000, 7384), heads_q=4, heads_kv=4, head_dim=128, is_causal=True, window_size=(3000, 0)),
}
EXCHANGES = ("all_gather", "ring")
# Four ranks: global batches of 128 tokens (8 zig-zag chunks of 16), every case with both
# exchanges. The windows reach back less than a chunk (9) and up to two chunks and a half (40,
# over a 60-token document): the ring's calls for a query chunk against an earlier key chunk
# take all, some or none of the chunk's rows.
FOUR_RANK_CASES = {
    "causal-spanning-4": AttnSpec((40, 0, 1, 23, 32, 0, 8, 24), heads_q=4, heads_kv=4, is_causal=True),
    "full-gqa-spanning-4": AttnSpec((7, 50, 1, 6, 64), heads_q=4, heads_kv=2),
    "causal-gqa-window-4": AttnSpec((90, 1, 0, 37), heads_q=6, heads_kv=2, is_causal=True, window_size=(9, 0)),
    "causal-wide-window-4": AttnSpec((3, 1, 0, 12, 5, 17, 2, 60, 28), heads_q=3, heads_kv=1, is_causal=True,
                                     window_size=(40, 0)),
}
# The ring's compiled case: 120 tokens in documents, then 8 that no document holds (cu_seq ends at
# 120 of 128; a compiled call cannot read cu_seq's values to refuse that): out 0, gradients 0.
RING_COMPILED_CASE = ("ring-causal-gqa-window-uncovered", AttnSpec((1, 0, 70, 49), heads_q=4, heads_kv=2,
                                                                  is_causal=True, window_size=(20, 0)), 8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_uncovered_tokens(case: VarlenCase, count: int, generator: torch.Generator) -> VarlenCase:
    """``case`` with ``count`` more random tokens after its documents, in none of them (its
    offsets unchanged)."""
    def extend(x: torch.Tensor) -> torch.Tensor:
        extra = torch.randn((count, *x.shape[1:]), generator=generator).to(device=x.device, dtype=x.dtype)
        return torch.cat([x, extra])

    return VarlenCase(extend(case.q), extend(case.k), extend(case.v), case.cu_seq_q, case.cu_seq_k,
                      case.lengths_q, case.lengths_k)


def _check_case(
    name: str, spec: AttnSpec, device: str, compiled: bool, real_size: bool = False, *,
    exchange: str = "all_gather", backend: object = None, uncovered: int = 0,
) -> None:
    """On every rank: the rank's outputs and gradients against the global reference (computed on
    the CPU, or for real sizes on the rank's GPU). ``backend``: the compiler of a compiled call
    (default aot_eager, Inductor for real sizes); ``uncovered``: tokens after the documents."""
    from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard

    # The same global batch on every rank (hash() is salted), from a generator of its own: ranks
    # that are threads of one process share the global one.
    generator = torch.Generator().manual_seed(sum(map(ord, name)))  # make_case draws on the CPU
    case = spec.make(device=device, dtype=torch.bfloat16 if real_size else torch.float32, generator=generator)
    if uncovered:
        case = _with_uncovered_tokens(case, uncovered, generator)
    leaves = [zigzag_shard(x).detach().requires_grad_() for x in (case.q, case.k, case.v)]
    grad_out = torch.randn(case.q.shape, generator=generator).to(device=device, dtype=case.q.dtype)

    def attention(q, k, v):
        return context_parallel_varlen_attn(
            q, k, v, case.cu_seq_q, None, spec.is_causal, window_size=spec.window_size,
            enable_gqa=spec.heads_q != spec.kv_heads, exchange=exchange,
        )

    if backend is None:
        backend = "inductor" if real_size else "aot_eager"  # real sizes: our templates between collectives
    fn = torch.compile(attention, fullgraph=True, backend=backend) if compiled else attention
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, zigzag_shard(grad_out))
    # Plain tensors, their collectives completed: never an unwaited AsyncCollectiveTensor.
    assert [type(x) for x in (out, *grads)] == [torch.Tensor] * 4, [type(x) for x in (out, *grads)]

    # The global reference, sharded the same way, under the error rule.
    ref_device = device if real_size else "cpu"
    ref_case = VarlenCase(
        *(x.detach().to(ref_device) for x in (case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k)),
        case.lengths_q, case.lengths_k,
    )
    grad_ref = grad_out.to(ref_device)
    oracle = reference_outputs(ref_case, torch.float64, grad_out=grad_ref, **spec.ref_kwargs)
    plain = reference_outputs(ref_case, ref_case.q.dtype, grad_out=grad_ref, **spec.ref_kwargs)

    def shard(x: torch.Tensor) -> torch.Tensor:
        return zigzag_shard(x.to(device)).cpu()

    label = f"{name} {exchange}{' compiled' if compiled else ''}"
    assert_meets_error_rule(out.cpu(), shard(oracle[0]), shard(plain[0]), name=f"{label} out")
    for grad_name, grad, grad_oracle, grad_plain in zip(("dq", "dk", "dv"), grads, oracle[2], plain[2]):
        assert_meets_error_rule(grad.cpu(), shard(grad_oracle), shard(grad_plain), name=f"{label} {grad_name}")


class _GraphRecorder:
    """A compiler that keeps the forward and backward graphs AOT autograd makes with the min-cut
    partitioner (Inductor's) and runs them as they are."""

    def __init__(self) -> None:
        self.graphs: dict[str, torch.fx.GraphModule] = {}

    def backend(self):
        from functorch.compile import min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd

        def keep(name):
            def compiler(gm, example_inputs):
                self.graphs[name] = gm
                return gm

            return compiler

        return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                            partition_fn=min_cut_rematerialization_partition)

    def kept_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the tensors the forward hands on (its output and what it saves)."""
        (output,) = [node for node in self.graphs["forward"].graph.nodes if node.op == "output"]
        unique = dict.fromkeys(node for node in output.args[0] if isinstance(node, torch.fx.Node))
        return [tuple(node.meta["val"].shape) for node in unique if isinstance(node.meta.get("val"), torch.Tensor)]

    def op_counts(self, graph: str) -> collections.Counter:
        return collections.Counter(str(node.target) for node in self.graphs[graph].graph.nodes if node.op == "call_function")


def _check_compiled_saves_local_tensors(device: str) -> None:
    """All-gather, compiled with the min-cut partitioner: nothing kept from forward to backward
    has the global token count (the whole batch's gathered K and V would), and the backward
    gathers K and V itself."""
    from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard

    recorder = _GraphRecorder()
    total = 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(total, 2, 16, device=device) for _ in range(3))
    cu_seq = torch.tensor([0, 40, 64], dtype=torch.int32, device=device)
    local = [zigzag_shard(x).requires_grad_() for x in (q, k, v)]
    fn = torch.compile(lambda q, k, v: context_parallel_varlen_attn(q, k, v, cu_seq, None, True), fullgraph=True,
                       backend=recorder.backend())
    fn(*local).sum().backward()
    kept = recorder.kept_shapes()
    assert all(total not in shape for shape in kept), f"forward keeps global-size tensors: {kept}"
    assert recorder.op_counts("backward")["varlen_compile.gather_key_value_after.default"] == 1


def _check_ring_compiled(device: str) -> None:
    """The ring, compiled with the min-cut partitioner, on the case with uncovered tokens: right
    results; the forward keeps the rank's own tensors (q, k, v, out, lse) and small offsets, no
    K/V block (neither one that visited the rank nor a copy of its own); the backward runs its own
    exchanges (W - 1 of K/V, the first after the incoming gradient, and W of dK/dV)."""
    recorder = _GraphRecorder()
    name, spec, uncovered = RING_COMPILED_CASE
    _check_case(name, spec, device, True, exchange="ring", backend=recorder.backend(), uncovered=uncovered)
    world_size = dist.get_world_size()
    tokens = (sum(spec.lengths_q) + uncovered) // world_size
    key_value_block = tokens * spec.kv_heads * 2 * spec.head_dim
    own = tokens * spec.heads_q * (2 * spec.head_dim + 1) + key_value_block  # q, out, lse; k, v
    kept = recorder.kept_shapes()
    assert sum(math.prod(shape) for shape in kept) < own + key_value_block, f"forward keeps {kept}"
    exchange = "_c10d_functional.all_to_all_single.default"
    forward, backward = recorder.op_counts("forward"), recorder.op_counts("backward")
    assert forward[exchange] == world_size - 1, forward
    assert backward[exchange] == 2 * world_size - 1, backward
    assert backward["varlen_compile.key_value_rows_after.default"] == 1, backward
    # K and V are kept as themselves (inputs the caller holds anyway), never as a block copy.
    block_shape = (tokens, spec.kv_heads * 2 * spec.head_dim)
    assert block_shape not in kept, f"forward keeps a K/V block: {kept}"


def _run_checks(rank: int, checks, report) -> None:
    """``checks``: ``(what, check)`` pairs; ``report(rank, what, trace)`` gets each failure, then
    ``(rank, "done", "")``."""
    for what, check in checks:
        try:
            check()
        except Exception:  # reported by the test in the parent process
            report(rank, what, traceback.format_exc())
    report(rank, "done", "")


def _check_rank(rank: int, device: str, real_sizes: bool, report) -> None:
    """Every check on one rank of an initialized 2-rank default group. The CPU checks the
    all-gather here (the ring on four ranks), a GPU both exchanges."""
    cases = [(name, spec, False) for name, spec in CASES.items()]
    if real_sizes:
        cases += [(name, spec, True) for name, spec in GPU_CASES.items()]
    exchanges = ("all_gather",) if device == "cpu" else EXCHANGES
    checks = [("compiled graph keeps local tensors only", functools.partial(_check_compiled_saves_local_tensors, device))]
    checks += [
        (f"{name} {exchange}{' compiled' if compiled else ''}",
         functools.partial(_check_case, name, spec, device, compiled, real_size, exchange=exchange))
        for name, spec, real_size in cases for exchange in exchanges for compiled in (False, True)
    ]
    _run_checks(rank, checks, report)


def _check_four_ranks(rank: int, device: str, real_sizes: bool, report) -> None:
    """Every check on one rank of an initialized 4-rank default group: both exchanges on every
    case eagerly, then one compiled case each (the ring's with its graphs checked)."""
    del real_sizes
    checks = [
        (f"{name} {exchange}", functools.partial(_check_case, name, spec, device, False, exchange=exchange))
        for exchange in EXCHANGES for name, spec in FOUR_RANK_CASES.items()
    ]
    name = "full-gqa-spanning-4"
    checks.append((f"{name} all_gather compiled", functools.partial(_check_case, name, FOUR_RANK_CASES[name], device, True)))
    checks.append(("ring compiled", functools.partial(_check_ring_compiled, device)))
    _run_checks(rank, checks, report)


def _worker(rank: int, world_size: int, port: int, backend: str, check, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    torch._dynamo.config.recompile_limit = 64  # every case compiles the same function anew
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        check(rank, device, backend == "nccl", lambda *report: results.put(report))
    finally:
        dist.destroy_process_group()


def _thread_ranks(device: str, results) -> None:
    """Both ranks as threads of this process, over torch's threaded process group (collectives
    are copies between the threads' tensors, on ``device``). One thread runs at a time outside
    collectives: torch.compile keeps process-wide state while it traces (torch 2.11 raised
    "FX to symbolically trace a dynamo-optimized function" in a rank that entered its compiled
    function while the other rank traced), so a rank hands the turn on only while it waits in a
    collective."""
    import threading

    from torch.testing._internal.distributed import multi_threaded_pg
    from torch.testing._internal.distributed.multi_threaded_pg import (
        ProcessLocalGroup,
        _install_threaded_pg,
        _uninstall_threaded_pg,
    )

    turn = threading.Lock()
    join = multi_threaded_pg.Collective.join

    def join_handing_on_the_turn(self, rank, data):
        turn.release()
        try:
            return join(self, rank, data)
        finally:
            turn.acquire()

    multi_threaded_pg.Collective.join = join_handing_on_the_turn
    # Both ranks compile the same functions in one process, each against its own group: twice
    # the recompiles of a process per rank.
    torch._dynamo.config.recompile_limit = 64
    torch._C._distributed_c10d._set_thread_isolation_mode(True)  # a group registry per thread
    _install_threaded_pg()
    store = dist.HashStore()

    def rank_thread(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=2, store=store)  # waits for both ranks
        turn.acquire()
        try:
            _check_rank(rank, device, device != "cpu", lambda *report: results.put(report))
        except BaseException as error:  # wake the other rank if it waits in a collective
            results.put((rank, "crashed", traceback.format_exc()))
            ProcessLocalGroup.exception_handle(error)
        finally:
            turn.release()
            try:
                dist.destroy_process_group()
            except AttributeError:  # torch 2.11: its thread-local world lacks `comms`; nothing to free
                pass

    threads = [threading.Thread(target=rank_thread, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _uninstall_threaded_pg()
    multi_threaded_pg.Collective.join = join


def _collect(results, reports: list | None = None, world_size: int = 2) -> None:
    reports = (reports or []) + [results.get() for _ in range(200) if not results.empty()]
    failures = [f"rank {rank}, {what}:\n{trace}" for rank, what, trace in reports if what != "done"]
    assert not failures, "\n".join(failures)
    assert sum(what == "done" for _, what, _ in reports) == world_size, reports


def _run(backend: str, world_size: int = 2, check=_check_rank) -> None:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_worker, args=(world_size, _free_port(), backend, check, results), nprocs=world_size,
                       start_method="spawn")
    _collect(results, world_size=world_size)


def test_two_ranks_gloo_match_single_process():
    _run("gloo")


def test_four_ranks_gloo_both_exchanges_match_single_process():
    """All-gather and ring on four gloo ranks against single-process attention (see
    ``_check_four_ranks``)."""
    _run("gloo", world_size=4, check=_check_four_ranks)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_ranks_nccl_match_single_process():
    _run("nccl")


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
])
def test_two_ranks_as_threads_match_single_process(device):
    """The NCCL test's cases, real sizes included, on one GPU: both ranks are threads of one
    process over torch's threaded process group (its collectives copy between the threads'
    tensors). Everything but NCCL itself: the zig-zag exchange, the kernels at real sizes, the
    compiled graphs (Inductor) and the backward's gathers and reduce-scatters. On the CPU (the
    gloo test's cases) it keeps the harness working on every torch CI runs."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    process = context.Process(target=_thread_ranks, args=(device, results))
    process.start()
    reports, deadline = [], time.monotonic() + 900
    while process.is_alive() and time.monotonic() < deadline:  # drain: a full pipe blocks the writer
        while not results.empty():
            reports.append(results.get())
        process.join(timeout=1)
    if process.is_alive():
        process.kill()
    _collect(results, reports)
    assert process.exitcode == 0, process.exitcode


# ----------------------------------------------------------------------------- FSDP2 training

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_fsdp.py")


def _torchrun(nproc: int, out: str, *args: str) -> str:
    import subprocess
    import sys

    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
         str(_free_port()), EXAMPLE, "--out", out, *args],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def _losses(path: str) -> list[float]:
    import json

    with open(path) as file:
        return json.load(file)["losses"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) run; CUDA machines run the GPU test")
def test_fsdp_example_two_ranks_match_one_rank_cpu(tmp_path):
    """examples/train_fsdp.py with gloo: compiled FSDP2 blocks on 2 ranks train exactly as 1 rank
    on the same global batches (float32)."""
    _torchrun(2, str(tmp_path / "two.json"), "--tiny", "--steps", "4")
    _torchrun(1, str(tmp_path / "one.json"), "--tiny", "--steps", "4")
    torch.testing.assert_close(_losses(str(tmp_path / "two.json")), _losses(str(tmp_path / "one.json")), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_example_two_gpus_match_one_gpu(tmp_path):
    """20 steps in bf16 on 2 GPUs vs 1 GPU, same global batches: the loss curves agree within bf16
    noise, and the compiled blocks run our templates forward and backward."""
    small = ("--steps", "20", "--tokens", "16384", "--layers", "2", "--d-model", "512", "--heads", "8",
             "--kv-heads", "2", "--vocab", "4096")
    printed = _torchrun(2, str(tmp_path / "two.json"), *small, "--report-kernels")
    assert "compiled blocks run our templates: forward True, backward True" in printed, printed
    _torchrun(1, str(tmp_path / "one.json"), *small)
    two, one = _losses(str(tmp_path / "two.json")), _losses(str(tmp_path / "one.json"))
    relative = [abs(a - b) / b for a, b in zip(two, one)]
    assert max(relative) < 0.02, (two, one)  # bf16 end to end; the curves drift slowly apart
    assert sum(two[-4:]) < sum(two[:4]), f"loss did not go down: {two}"


def _attention_node(out: torch.Tensor):
    """The autograd node of the context-parallel exchange behind ``out``."""
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and "Attention" in type(node).__name__:
            return node
        stack.extend(next_node for next_node, _ in (node.next_functions if node is not None else ()))
    raise AssertionError(f"no attention node behind {out.grad_fn}")


def test_single_rank_equals_varlen_attn_and_errors():
    """One rank (two zig-zag chunks): equal to varlen_attn, keeping only out and lse beside the
    rank's own inputs for the backward; misuse gets clear errors."""
    from varlen_compile import varlen_attn
    from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard, zigzag_unshard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        spec = CASES["causal-spanning"]
        case = spec.make(requires_grad=True)
        local = [zigzag_shard(x) for x in (case.q, case.k, case.v)]
        expected = varlen_attn(*case.inputs(), is_causal=True)
        expected_grads = torch.autograd.grad(expected.sum(), (case.q, case.k, case.v))
        for exchange in EXCHANGES:
            local_out = context_parallel_varlen_attn(*local, case.cu_seq_q, None, True, exchange=exchange)
            # What is kept for the backward: this rank's K and V themselves, never a copy of them.
            saved = _attention_node(local_out).saved_tensors
            saved_pointers = {tensor.data_ptr() for tensor in saved}
            assert {local[1].data_ptr(), local[2].data_ptr()} <= saved_pointers, exchange
            kept = sum(tensor.nbytes for tensor in saved if tensor.data_ptr() not in {x.data_ptr() for x in local})
            assert kept <= local_out.nbytes + 4 * local_out.shape[0] * local_out.shape[1] + case.cu_seq_q.nbytes, exchange
            out = zigzag_unshard(local_out)
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
            grads = torch.autograd.grad(out.sum(), (case.q, case.k, case.v))
            for grad, wanted in zip(grads, expected_grads):
                torch.testing.assert_close(grad, wanted, rtol=1e-5, atol=1e-6)
        for exchange in ("Ring", None):
            with pytest.raises(ValueError, match=rf"context_parallel_varlen_attn: exchange must be one of 'all_gather', "
                                                 rf"'ring', got {exchange!r}"):
                context_parallel_varlen_attn(*local, case.cu_seq_q, None, True, exchange=exchange)
        with pytest.raises(ValueError, match=r"window_size=\(4, 4\) without causal masking is not supported"):
            context_parallel_varlen_attn(*local, case.cu_seq_q, window_size=(4, 4))
        odd = [x[:63] for x in (case.q, case.k, case.v)]
        with pytest.raises(ValueError, match=r"token count \(63\) to be a multiple of 2 \* world_size \(2\)"):
            context_parallel_varlen_attn(*odd, torch.tensor([0, 63], dtype=torch.int32), is_causal=True)
    finally:
        dist.destroy_process_group()


def test_ring_merge_is_exact_and_never_nan():
    """The ring's lse merge over three steps of disjoint keys equals one softmax over all of
    them, for rows that see keys in every step, in some steps, and in none (``lse = +inf`` in
    every partial): no NaN anywhere; the first row's out stays 0 and its running lse ``-inf``
    (no key yet), which the ring turns into ``+inf`` at the end."""
    from varlen_compile.distributed import _merge_into

    generator = torch.Generator().manual_seed(0)
    heads, rows, dim, keys_per_step = 2, 4, 3, (3, 2, 4)
    sees = torch.tensor([[False, False, False], [False, True, False], [True, True, True], [True, False, True]])
    scores = [torch.randn(heads, rows, keys, generator=generator, dtype=torch.float64) for keys in keys_per_step]
    values = [torch.randn(keys, heads, dim, generator=generator, dtype=torch.float64) for keys in keys_per_step]
    scores = [s.masked_fill(~sees[:, step, None], -math.inf) for step, s in enumerate(scores)]
    out = torch.zeros(rows, heads, dim, dtype=torch.float64)
    lse = torch.full((heads, rows), -math.inf, dtype=torch.float64)
    for step_scores, step_values in zip(scores, values):  # each step's partial, in the ops' convention
        step_lse = torch.logsumexp(step_scores, dim=-1)
        weights = torch.exp(step_scores - step_lse.masked_fill(step_lse == -math.inf, 0)[..., None])
        step_out = torch.einsum("hqk,khd->qhd", weights, step_values)
        _merge_into(out, lse, slice(0, rows), step_out, step_lse.masked_fill(step_lse == -math.inf, math.inf))
    all_scores, all_values = torch.cat(scores, dim=-1), torch.cat(values)
    expected_lse = torch.logsumexp(all_scores, dim=-1)
    expected = torch.einsum("hqk,khd->qhd", torch.softmax(all_scores, dim=-1).nan_to_num(0.0), all_values)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[:, 1:], expected_lse[:, 1:], rtol=1e-12, atol=1e-12)
    assert (lse[:, 0] == -math.inf).all() and (out[0] == 0).all()
