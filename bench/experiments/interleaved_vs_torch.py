# An experiment next to the benchmark: fastdropout forward+backward (dropout_dense, then
# dropout_dense_backward) and torch autograd (F.linear(F.dropout(x)), backward) timed
# alternately in one process, so that the host's load drifts over both alike.  Median and
# minimum of each, p = 0.5, 2 threads.  Usage: python bench/experiments/interleaved_vs_torch.py [reps]
import numpy as np, time, sys, math
import torch, fastdropout as fd
torch.set_num_threads(2)
F = torch.nn.functional
P, SEED = 0.5, 1234
for (m, k, n), reps in [((64, 784, 512), 200), ((256, 1024, 1024), 60), ((1024, 4096, 4096), int(sys.argv[1]) if len(sys.argv) > 1 else 15)]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
    twg, tbg, txg = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True), tx.clone().requires_grad_(True)
    def f_fd():
        fd.dropout_dense(x, w, b, P, seed=SEED)
        fd.dropout_dense_backward(dy, x, w, P, seed=SEED)
    def f_t():
        out = F.linear(F.dropout(txg, P, training=True), twg, tbg)
        out.backward(tdy)
        txg.grad = twg.grad = tbg.grad = None
    f_fd(); f_t()
    a, t = [], []
    for i in range(reps):
        for f, s in ((f_fd, a), (f_t, t)) if i % 2 == 0 else ((f_t, t), (f_fd, a)):
            t0 = time.perf_counter(); f(); s.append(time.perf_counter() - t0)
    a, t = np.array(a) * 1e3, np.array(t) * 1e3
    print(f"{m}x{k}x{n}: fastdropout median {np.median(a):.3f} ms (min {a.min():.3f}), torch median {np.median(t):.3f} ms (min {t.min():.3f}); "
          f"ratio of medians {np.median(t)/np.median(a):.2f}x, of minima {t.min()/a.min():.2f}x", flush=True)
