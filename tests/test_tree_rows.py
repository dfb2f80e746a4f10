"""The pieces of an exact tree pass that run anywhere (llama/tree_rows.py): each node's path, the slots the
split attention lets each query see through positions, paths and a window (the reference the CUDA kernel is
held to), and matmuls in calls of the rows a kernel keeps per-row bits for."""
from __future__ import annotations

import torch
from torch import nn

from llama import fused_ops
from llama.speculative.tree import TokenTree, tree_attention, tree_paths
from llama.tree_rows import linear_rows


def _tree() -> TokenTree:
    tree = TokenTree(10)
    tree.add_path(0, [11, 12, 13], 20)
    tree.add_path(0, [21, 22], 20)
    tree.add_path(2, [31], 20)
    return tree


def test_paths_list_each_node_then_its_ancestors_at_their_slots():
    tree, start = _tree(), 5
    paths = tree_paths(tree, start)
    assert paths.dtype == torch.int32 and paths.shape == (len(tree), 1 + max(tree.depths))
    for node in range(len(tree)):
        want, n = [], node
        while n >= 0:
            want.append(start + n)
            n = tree.parents[n]
        row = paths[node].tolist()
        assert row[: len(want)] == want and all(v == -1 for v in row[len(want) :])
    assert tree_paths(tree, start, 3, 6).tolist() == paths[3:6, : 1 + max(tree.depths[3:6])].tolist()


def test_positions_and_paths_show_each_node_what_the_tree_mask_shows():
    for window in (None, 3, 50):
        tree, start = _tree(), 7
        positions, mask = tree_attention(tree, start, window=window)
        seen = fused_ops.visible_slots(positions[None], tree_paths(tree, start)[None], window, 1, len(tree),
                                       start + len(tree), torch.device("cpu"))
        assert torch.equal(seen[0], mask), window


def test_without_paths_a_query_sees_the_window_up_to_its_position():
    seen = fused_ops.visible_slots(torch.tensor([[3, 9]]), None, 4, 1, 2, 12, torch.device("cpu"))
    assert seen[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert seen[0, 1].nonzero().flatten().tolist() == [6, 7, 8, 9]
    everything = fused_ops.visible_slots(None, None, None, 1, 1, 5, torch.device("cpu"))
    assert everything.all()


def test_reference_attention_over_paths_equals_each_branch_alone():
    """Node i attending over the tree's slots through its path equals attention over a cache holding the
    context and then only its own path, at consecutive positions."""
    torch.manual_seed(0)
    tree, start, heads, dim = _tree(), 6, 2, 8
    kv_len = start + len(tree)
    keys, values = torch.randn(1, heads, kv_len, dim), torch.randn(1, heads, kv_len, dim)
    q = torch.randn(1, len(tree), heads, dim)
    positions = torch.tensor(tree.depths)[None] + start
    paths = tree_paths(tree, start)[None]
    out = fused_ops.attention_reference(q, keys, values, None, positions, paths)
    for node in range(len(tree)):
        slots = list(range(start)) + [s for s in reversed(paths[0, node].tolist()) if s >= 0]
        alone = fused_ops.attention_reference(q[:, node : node + 1], keys[:, :, slots], values[:, :, slots], None)
        torch.testing.assert_close(out[:, node], alone[:, 0])


class _Counting(nn.Linear):
    def __init__(self, whole: bool) -> None:
        super().__init__(4, 3)
        self.calls: list[int] = []
        self.whole = whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.reshape(-1, 4).shape[0])
        return super().forward(x)

    def exact_forward(self, rows: torch.Tensor) -> torch.Tensor | None:
        return self(rows) if self.whole else None


def test_linear_rows_takes_a_modules_exact_call_else_one_row_a_call():
    x = torch.randn(1, 7, 4)
    for whole, calls in ((False, [1] * 7), (True, [7])):
        linear = _Counting(whole)
        got = linear_rows(linear, x, exact=True)
        assert linear.calls == calls and got.shape == (1, 7, 3)
        torch.testing.assert_close(got, nn.functional.linear(x, linear.weight, linear.bias))
    linear = _Counting(False)
    linear_rows(linear, x, exact=False)
    assert linear.calls == [7]


class _Dequantizing(nn.Module):
    """A layer whose forward is F.linear by a dense weight it makes on each call, plus its bias (int8 on the GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.out_features, self.in_features = 3, 4
        self.weight, self.bias = torch.randn(3, 4), torch.randn(3)
        self.made = 0

    def dense_weight(self, x: torch.Tensor) -> torch.Tensor:
        self.made += 1
        return self.weight.clone()

    def with_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias


def test_a_dense_weight_is_made_once_per_tree_and_used_in_calls_of_the_checked_rows(monkeypatch):
    import llama.tree_rows as tree_rows

    calls: list[int] = []

    def counting_linear(x, w):
        calls.append(x.shape[0])
        return nn.functional.linear(x, w)

    monkeypatch.setattr(tree_rows, "checked_rows", lambda *shape: 3)
    monkeypatch.setattr(tree_rows, "F", type("F", (), {"linear": staticmethod(counting_linear)}))
    layer, x = _Dequantizing(), torch.randn(1, 7, 4)
    got = linear_rows(layer, x, exact=True)
    assert layer.made == 1 and calls == [3, 3, 1] and got.shape == (1, 7, 3)
    torch.testing.assert_close(got, nn.functional.linear(x, layer.weight, layer.bias))
