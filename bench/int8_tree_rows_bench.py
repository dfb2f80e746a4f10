"""An exact tree's int8 matmuls on the GPU: one dequantize a matrix and cuBLAS calls of the checked rows (new),
against one forward a row (old, and what each row must equal bit for bit): bits and time, Llama-2-7B's matrices.

    python bench/int8_tree_rows_bench.py

fp16 activations, random weights in our int8 format; medians of 20 calls after one untimed; a one-row call beside.
"""
import torch
from torch import nn

from llama.tree_rows import check_dense_rows, linear_rows
from offload.kernels.linear import Int8Linear

torch.manual_seed(0)
for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
    lin = Int8Linear.from_linear(nn.Linear(in_f, out_f, bias=False).half()).cuda()
    holder = nn.Sequential(lin)
    check_dense_rows(holder, torch.float16, torch.device("cuda"))
    for n in (8, 64, 256):
        x = torch.randn(n, in_f, device="cuda", dtype=torch.float16)
        alone = torch.cat([lin(x[i : i + 1].clone()) for i in range(n)])
        new = linear_rows(lin, x, exact=True)
        same = torch.equal(new, alone)
        def timed(fn, reps=20):
            fn(); torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(True), torch.cuda.Event(True)
                a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
            return sorted(ts)[len(ts) // 2]
        t_new = timed(lambda: linear_rows(lin, x, exact=True))
        t_old = timed(lambda: [lin(x[i : i + 1].clone()) for i in range(n)])
        t_one = timed(lambda: lin(x[:1].clone()))
        print(f"{out_f}x{in_f} n={n}: same bits {same}; new {t_new:.3f} ms, old {t_old:.3f} ms "
              f"({t_old / t_new:.1f}x), one row {t_one:.3f} ms")
