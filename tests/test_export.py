"""torch.export keeps the op, with dynamic token and sequence counts, through save/load."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from factory import AttnSpec, assert_matches_reference
from varlen_compile import AuxRequest, varlen_attn

# GQA, per-sequence q_len != k_len, a window, no max hints.
SPEC = AttnSpec((5, 0, 9, 1), (7, 3, 4, 1), heads_q=4, heads_kv=2, is_causal=True, window_size=(4, -1))
NEW_SPEC = AttnSpec((12, 3, 1, 6, 2, 8), (2, 3, 9, 6, 0, 11), heads_q=4, heads_kv=2, is_causal=True,
                    window_size=(4, -1))


class PackedAttention(torch.nn.Module):
    def forward(self, query, key, value, cu_seq_q, cu_seq_k):
        return varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, **SPEC.api_kwargs, return_aux=AuxRequest(lse=True)
        )


@pytest.fixture(scope="module")
def exported() -> torch.export.ExportedProgram:
    total_q, total_k, num_offsets = Dim("total_q", min=2), Dim("total_k", min=2), Dim("num_offsets", min=2)
    dynamic_shapes = (
        {0: total_q}, {0: total_k}, {0: total_k}, {0: num_offsets}, {0: num_offsets},
    )
    return torch.export.export(PackedAttention(), SPEC.make().inputs(), dynamic_shapes=dynamic_shapes)


def _check(program: torch.export.ExportedProgram) -> None:
    """Runs on a batch of another size and sequence count, equal to eager and the reference."""
    case = NEW_SPEC.make()
    assert case.q.shape[0] != sum(SPEC.lengths_q) and case.k.shape[0] != sum(SPEC.key_lengths)
    out, lse = program.module()(*case.inputs())
    expected_out, expected_lse = PackedAttention()(*case.inputs())
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
    assert_matches_reference(case, out, lse, **NEW_SPEC.ref_kwargs)


def test_graph_keeps_the_op(exported):
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.varlen_compile.varlen_attn.default in targets
    placeholders = [node for node in exported.graph.nodes if node.op == "placeholder"]
    token_dims = [node.meta["val"].shape[0] for node in placeholders[:3]]
    assert all(isinstance(dim, torch.SymInt) for dim in token_dims), token_dims


def test_runs_on_new_sizes(exported):
    _check(exported)


def test_save_and_load(exported, tmp_path):
    path = tmp_path / "varlen_attn.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    targets = [node.target for node in loaded.graph.nodes if node.op == "call_function"]
    assert torch.ops.varlen_compile.varlen_attn.default in targets
    _check(loaded)
