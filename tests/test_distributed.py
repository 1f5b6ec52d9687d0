"""Context-parallel varlen attention (varlen_compile.distributed) on two processes.

CPU: the gloo backend, two processes spawned by the test (CI runs this). Every case compares
each rank's output and gradients with single-process attention on the whole batch, under the
error rule against the float64 reference: documents spanning ranks, empty and single-token
documents, causal and not, a causal window, GQA, and a compiled call; and that a compiled graph
keeps only the rank's own tensors from forward to backward. The GPU variant runs the
same cases with NCCL on two GPUs (marked gpu and multigpu), then real sizes (bf16, head dim 128,
16384 tokens, compiled with Inductor, the reference on each rank's GPU). On one GPU (marked gpu),
the same again with both ranks as threads of one process over torch's threaded process group.
"""

from __future__ import annotations

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_case(name: str, spec: AttnSpec, device: str, compiled: bool, real_size: bool = False) -> None:
    """On every rank: the rank's outputs and gradients against the global reference (computed on
    the CPU, or for real sizes on the rank's GPU)."""
    from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard

    # The same global batch on every rank (hash() is salted), from a generator of its own: ranks
    # that are threads of one process share the global one.
    generator = torch.Generator().manual_seed(sum(map(ord, name)))  # make_case draws on the CPU
    case = spec.make(device=device, dtype=torch.bfloat16 if real_size else torch.float32, generator=generator)
    leaves = [zigzag_shard(x).detach().requires_grad_() for x in (case.q, case.k, case.v)]
    grad_out = torch.randn(case.q.shape, generator=generator).to(device=device, dtype=case.q.dtype)

    def attention(q, k, v):
        return context_parallel_varlen_attn(
            q, k, v, case.cu_seq_q, None, spec.is_causal, window_size=spec.window_size,
            enable_gqa=spec.heads_q != spec.kv_heads,
        )

    backend = "inductor" if real_size else "aot_eager"  # real sizes: our templates between collectives
    fn = torch.compile(attention, fullgraph=True, backend=backend) if compiled else attention
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, zigzag_shard(grad_out))

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

    assert_meets_error_rule(out.cpu(), shard(oracle[0]), shard(plain[0]), name=f"{name} out")
    for label, grad, grad_oracle, grad_plain in zip(("dq", "dk", "dv"), grads, oracle[2], plain[2]):
        assert_meets_error_rule(grad.cpu(), shard(grad_oracle), shard(grad_plain), name=f"{name} {label}")


def _check_compiled_saves_local_tensors(device: str) -> None:
    """Compiled with the min-cut partitioner (Inductor's): nothing kept from forward to backward
    has the global token count (the whole batch's gathered K and V would), and the backward
    gathers K and V itself."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return gm

        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    total = 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(total, 2, 16, device=device) for _ in range(3))
    cu_seq = torch.tensor([0, 40, 64], dtype=torch.int32, device=device)
    local = [zigzag_shard(x).requires_grad_() for x in (q, k, v)]
    fn = torch.compile(lambda q, k, v: context_parallel_varlen_attn(q, k, v, cu_seq, None, True), fullgraph=True,
                       backend=backend)
    fn(*local).sum().backward()
    (output,) = [node for node in graphs["forward"].graph.nodes if node.op == "output"]
    kept = [tuple(node.meta["val"].shape) for node in output.args[0] if isinstance(node, torch.fx.Node)
            and isinstance(node.meta.get("val"), torch.Tensor)]
    assert all(total not in shape for shape in kept), f"forward keeps global-size tensors: {kept}"
    backward_ops = {str(node.target) for node in graphs["backward"].graph.nodes}
    assert "varlen_compile.gather_key_value_after.default" in backward_ops, backward_ops


def _check_rank(rank: int, device: str, real_sizes: bool, report) -> None:
    """Every check on one rank of an initialized 2-rank default group; ``report(rank, what,
    trace)`` gets each failure, then ``(rank, "done", "")``."""
    cases = [(name, spec, False) for name, spec in CASES.items()]
    if real_sizes:
        cases += [(name, spec, True) for name, spec in GPU_CASES.items()]
    try:
        _check_compiled_saves_local_tensors(device)
    except Exception:
        report(rank, "compiled graph keeps local tensors only", traceback.format_exc())
    for name, spec, real_size in cases:
        for compiled in (False, True):
            try:
                _check_case(name, spec, device, compiled, real_size)
            except Exception:  # reported by the test in the parent process
                report(rank, f"{name}{' compiled' if compiled else ''}", traceback.format_exc())
    report(rank, "done", "")


def _worker(rank: int, world_size: int, port: int, backend: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        _check_rank(rank, device, backend == "nccl", lambda *report: results.put(report))
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


def _collect(results, reports: list | None = None) -> None:
    reports = (reports or []) + [results.get() for _ in range(100) if not results.empty()]
    failures = [f"rank {rank}, {what}:\n{trace}" for rank, what, trace in reports if what != "done"]
    assert not failures, "\n".join(failures)
    assert sum(what == "done" for _, what, _ in reports) == 2, reports


def _run(backend: str) -> None:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_worker, args=(2, _free_port(), backend, results), nprocs=2, start_method="spawn")
    _collect(results)


def test_two_ranks_gloo_match_single_process():
    _run("gloo")


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


def test_single_rank_equals_varlen_attn_and_errors():
    """One rank (two zig-zag chunks): equal to varlen_attn; misuse gets clear errors."""
    from varlen_compile import varlen_attn
    from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard, zigzag_unshard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        spec = CASES["causal-spanning"]
        case = spec.make(requires_grad=True)
        local = [zigzag_shard(x) for x in (case.q, case.k, case.v)]
        out = zigzag_unshard(context_parallel_varlen_attn(*local, case.cu_seq_q, None, True))
        expected = varlen_attn(*case.inputs(), is_causal=True)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        grads = torch.autograd.grad(out.sum(), (case.q, case.k, case.v))
        expected_grads = torch.autograd.grad(expected.sum(), (case.q, case.k, case.v))
        for grad, wanted in zip(grads, expected_grads):
            torch.testing.assert_close(grad, wanted, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match=r"window_size=\(4, 4\) without causal masking is not supported"):
            context_parallel_varlen_attn(*local, case.cu_seq_q, window_size=(4, 4))
        odd = [x[:63] for x in (case.q, case.k, case.v)]
        with pytest.raises(ValueError, match=r"token count \(63\) to be a multiple of 2 \* world_size \(2\)"):
            context_parallel_varlen_attn(*odd, torch.tensor([0, 63], dtype=torch.int32), is_causal=True)
    finally:
        dist.destroy_process_group()
