"""The graphs torch captures around varlen_attn, pinned as text (expecttest).

For the seed's attention block (fused qkv Linear -> varlen_attn -> out Linear): the forward and
backward graphs AOTAutograd hands to the compiler, and the ``torch.export`` graph. A change in
what gets traced shows up here as a readable diff; ``EXPECTTEST_ACCEPT=1 python -m pytest
tests/test_graphs.py`` rewrites the expected text in this file. The dispatch-logging tests in
test_compile_cpu.py check the ops at run time; these pin the graph text.
"""

from __future__ import annotations

import expecttest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs, normalize_gm

from factory import make_cu_seq
from modules import AttentionBlock

HEADS, HEAD_DIM = 2, 8
LENGTHS = [3, 4]


def _graph_text(graph_module: torch.fx.GraphModule) -> str:
    return normalize_gm(graph_module.print_readable(print_output=False))


class TestCapturedGraphs(expecttest.TestCase):
    def setUp(self) -> None:
        torch._dynamo.reset()
        torch.manual_seed(0)
        self.block = AttentionBlock(HEADS, HEAD_DIM, is_causal=True)
        self.x = torch.randn(sum(LENGTHS), HEADS * HEAD_DIM, requires_grad=True)
        self.cu_seq = make_cu_seq(LENGTHS)

    def tearDown(self) -> None:
        torch._dynamo.reset()

    def _aot_graphs(self) -> tuple[str, str]:
        backend = AotEagerAndRecordGraphs()
        compiled = torch.compile(self.block, backend=backend, fullgraph=True)
        compiled(self.x, self.cu_seq).sum().backward()
        self.assertEqual((len(backend.fw_graphs), len(backend.bw_graphs)), (1, 1))
        return _graph_text(backend.fw_graphs[0]), _graph_text(backend.bw_graphs[0])

    def test_aot_forward_graph(self):
        forward, _ = self._aot_graphs()
        self.assertExpectedInline(forward, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[7, 16]", primals_2: "f32[48, 16]", primals_3: "f32[48]", primals_4: "i32[3]", primals_5: "f32[16, 16]", primals_6: "f32[16]"):
        t: "f32[16, 48]" = torch.ops.aten.t.default(primals_2)
        addmm: "f32[7, 48]" = torch.ops.aten.addmm.default(primals_3, primals_1, t);  primals_3 = t = None
        split = torch.ops.aten.split.Tensor(addmm, 16, -1);  addmm = None
        getitem: "f32[7, 16]" = split[0]
        getitem_1: "f32[7, 16]" = split[1]
        getitem_2: "f32[7, 16]" = split[2];  split = None

        view: "f32[7, 2, 8]" = torch.ops.aten.view.default(getitem, [7, 2, 8]);  getitem = None
        view_1: "f32[7, 2, 8]" = torch.ops.aten.view.default(getitem_1, [7, 2, 8]);  getitem_1 = None
        view_2: "f32[7, 2, 8]" = torch.ops.aten.view.default(getitem_2, [7, 2, 8]);  getitem_2 = None

        varlen_attn = torch.ops.varlen_compile.varlen_attn.default(view, view_1, view_2, primals_4, primals_4, None, None, True, None, -1, -1)
        getitem_3: "f32[7, 2, 8]" = varlen_attn[0]
        getitem_4: "f32[2, 7]" = varlen_attn[1];  varlen_attn = None
        detach_1: "f32[2, 7]" = torch.ops.aten.detach.default(getitem_4);  getitem_4 = None

        view_3: "f32[7, 16]" = torch.ops.aten.view.default(getitem_3, [7, 16])
        t_1: "f32[16, 16]" = torch.ops.aten.t.default(primals_5)
        addmm_1: "f32[7, 16]" = torch.ops.aten.addmm.default(primals_6, view_3, t_1);  primals_6 = view_3 = t_1 = None

        detach_3: "f32[2, 7]" = torch.ops.aten.detach.default(detach_1);  detach_1 = None
        return (addmm_1, primals_1, primals_2, primals_4, primals_5, view, view_1, view_2, getitem_3, detach_3)
""")  # noqa: B950

    def test_aot_backward_graph(self):
        _, backward = self._aot_graphs()
        self.assertExpectedInline(backward, """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[7, 16]", primals_2: "f32[48, 16]", primals_4: "i32[3]", primals_5: "f32[16, 16]", view: "f32[7, 2, 8]", view_1: "f32[7, 2, 8]", view_2: "f32[7, 2, 8]", getitem_3: "f32[7, 2, 8]", detach_3: "f32[2, 7]", tangents_1: "f32[7, 16]"):
        t_1: "f32[16, 16]" = torch.ops.aten.t.default(primals_5);  primals_5 = None
        t_2: "f32[16, 16]" = torch.ops.aten.t.default(t_1);  t_1 = None
        mm: "f32[7, 16]" = torch.ops.aten.mm.default(tangents_1, t_2);  t_2 = None
        t_3: "f32[16, 7]" = torch.ops.aten.t.default(tangents_1)
        view_3: "f32[7, 16]" = torch.ops.aten.view.default(getitem_3, [7, 16])
        mm_1: "f32[16, 16]" = torch.ops.aten.mm.default(t_3, view_3);  t_3 = view_3 = None
        t_4: "f32[16, 16]" = torch.ops.aten.t.default(mm_1);  mm_1 = None
        sum_1: "f32[1, 16]" = torch.ops.aten.sum.dim_IntList(tangents_1, [0], True);  tangents_1 = None
        view_4: "f32[16]" = torch.ops.aten.view.default(sum_1, [16]);  sum_1 = None
        t_5: "f32[16, 16]" = torch.ops.aten.t.default(t_4);  t_4 = None
        view_5: "f32[7, 2, 8]" = torch.ops.aten.view.default(mm, [7, 2, 8]);  mm = None

        detach: "f32[7, 2, 8]" = torch.ops.aten.detach.default(getitem_3);  getitem_3 = None
        detach_2: "f32[7, 2, 8]" = torch.ops.aten.detach.default(detach);  detach = None
        varlen_attn_backward = torch.ops.varlen_compile.varlen_attn_backward.default(view_5, view, view_1, view_2, detach_2, detach_3, primals_4, primals_4, None, None, True, None, -1, -1);  view_5 = view = view_1 = view_2 = detach_2 = detach_3 = primals_4 = None
        getitem_5: "f32[7, 2, 8]" = varlen_attn_backward[0]
        getitem_6: "f32[7, 2, 8]" = varlen_attn_backward[1]
        getitem_7: "f32[7, 2, 8]" = varlen_attn_backward[2];  varlen_attn_backward = None

        view_6: "f32[7, 16]" = torch.ops.aten.view.default(getitem_7, [7, 16]);  getitem_7 = None
        view_7: "f32[7, 16]" = torch.ops.aten.view.default(getitem_6, [7, 16]);  getitem_6 = None
        view_8: "f32[7, 16]" = torch.ops.aten.view.default(getitem_5, [7, 16]);  getitem_5 = None

        cat: "f32[7, 48]" = torch.ops.aten.cat.default([view_8, view_7, view_6], 1);  view_8 = view_7 = view_6 = None
        t: "f32[16, 48]" = torch.ops.aten.t.default(primals_2);  primals_2 = None
        t_6: "f32[48, 16]" = torch.ops.aten.t.default(t);  t = None
        mm_2: "f32[7, 16]" = torch.ops.aten.mm.default(cat, t_6);  t_6 = None
        t_7: "f32[48, 7]" = torch.ops.aten.t.default(cat)
        mm_3: "f32[48, 16]" = torch.ops.aten.mm.default(t_7, primals_1);  t_7 = primals_1 = None
        t_8: "f32[16, 48]" = torch.ops.aten.t.default(mm_3);  mm_3 = None
        sum_2: "f32[1, 48]" = torch.ops.aten.sum.dim_IntList(cat, [0], True);  cat = None
        view_9: "f32[48]" = torch.ops.aten.view.default(sum_2, [48]);  sum_2 = None
        t_9: "f32[48, 16]" = torch.ops.aten.t.default(t_8);  t_8 = None
        return (mm_2, t_9, view_9, None, t_5, view_4)
""")  # noqa: B950

    def test_export_graph(self):
        program = torch.export.export(self.block, (self.x, self.cu_seq))
        self.assertExpectedInline(_graph_text(program.graph_module), """\
class GraphModule(torch.nn.Module):
    def forward(self, p_qkv_weight: "f32[48, 16]", p_qkv_bias: "f32[48]", p_out_weight: "f32[16, 16]", p_out_bias: "f32[16]", x: "f32[7, 16]", cu_seq: "i32[3]"):
        linear: "f32[7, 48]" = torch.ops.aten.linear.default(x, p_qkv_weight, p_qkv_bias);  x = p_qkv_weight = p_qkv_bias = None

        chunk = torch.ops.aten.chunk.default(linear, 3, -1);  linear = None
        getitem: "f32[7, 16]" = chunk[0]
        getitem_1: "f32[7, 16]" = chunk[1]
        getitem_2: "f32[7, 16]" = chunk[2];  chunk = None

        view: "f32[7, 2, 8]" = torch.ops.aten.view.default(getitem, [7, 2, 8]);  getitem = None
        view_1: "f32[7, 2, 8]" = torch.ops.aten.view.default(getitem_1, [7, 2, 8]);  getitem_1 = None
        view_2: "f32[7, 2, 8]" = torch.ops.aten.view.default(getitem_2, [7, 2, 8]);  getitem_2 = None

        varlen_attn = torch.ops.varlen_compile.varlen_attn.default(view, view_1, view_2, cu_seq, cu_seq, None, None, True, None, -1, -1);  view = view_1 = view_2 = cu_seq = None
        getitem_3: "f32[7, 2, 8]" = varlen_attn[0]
        getitem_4: "f32[2, 7]" = varlen_attn[1];  varlen_attn = getitem_4 = None

        reshape: "f32[7, 16]" = torch.ops.aten.reshape.default(getitem_3, [7, 16]);  getitem_3 = None

        linear_1: "f32[7, 16]" = torch.ops.aten.linear.default(reshape, p_out_weight, p_out_bias);  reshape = p_out_weight = p_out_bias = None
        return (linear_1,)
""")  # noqa: B950
