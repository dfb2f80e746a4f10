"""An exact tree's int8 matmuls on the GPU: one dequantize a matrix and cuBLAS calls of the checked rows (new),
against one forward a row (old, and what each row must equal bit for bit): bits and time, Llama-2-7B's matrices.

    python bench/int8_tree_rows_bench.py

fp16 activations, random weights in our int8 format; medians of 20 calls after one untimed; a one-row call beside.
"""
from __future__ import annotations

import torch
from torch import nn

from llama.tree_rows import check_dense_rows, linear_rows
from offload.kernels.linear import Int8Linear

MATRICES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in)
ROWS = (8, 64, 256)


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    for out_f, in_f in MATRICES:
        layer = Int8Linear.from_linear(nn.Linear(in_f, out_f, bias=False).half()).cuda()
        check_dense_rows(nn.Sequential(layer), torch.float16, torch.device("cuda"))
        for n in ROWS:
            x = torch.randn(n, in_f, device="cuda", dtype=torch.float16)  # (rows, in)
            one_at_a_time = lambda: [layer(x[i : i + 1].clone()) for i in range(n)]  # noqa: E731
            same = torch.equal(linear_rows(layer, x, exact=True), torch.cat(one_at_a_time()))
            t_new = median_ms(lambda: linear_rows(layer, x, exact=True))
            t_old = median_ms(one_at_a_time)
            t_one = median_ms(lambda: layer(x[:1].clone()))
            print(f"{out_f}x{in_f} n={n}: same bits {same}; new {t_new:.3f} ms, old {t_old:.3f} ms "
                  f"({t_old / t_new:.1f}x), one row {t_one:.3f} ms")


if __name__ == "__main__":
    main()
