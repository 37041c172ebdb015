"""Measured op times on the local GPU for one training step, to check the time model against (never to fit it).

One tinyllama-1.1b step (bf16 autocast, AdamW, foreach as CUDA defaults) under torch.profiler: every aten op with
its input shapes and its device time; the step's phases timed with CUDA events; a few GEMM shapes and a copy for the
card's achieved matmul rate and bandwidth. Writes one JSON file (argv[1]).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from optprof.model.loading import load_model


def timed(fn, repeat: int = 10) -> float:  # seconds per call, after warm-up, CUDA events
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def main(path: str, model_name: str = "tinyllama-1.1b", micro_batch: int = 4, seq_len: int = 2048) -> None:
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "model": model_name, "micro_batch": micro_batch, "seq_len": seq_len}
    # achieved rates: GEMMs of a few shapes, a device copy
    gemms = {}
    for m, n, k in [(8192, 8192, 8192), (8192, 2048, 2048), (8192, 5632, 2048), (8192, 2048, 5632),
                    (8192, 32000, 2048), (2048, 2048, 8192), (512, 2048, 2048), (128, 128, 128)]:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        s = timed(lambda: a @ b)
        gemms[f"{m}x{n}x{k}"] = {"s": s, "tflops": 2 * m * n * k / s / 1e12}
    out["gemm_bf16"] = gemms
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    s = timed(lambda: y.copy_(x))
    out["copy_1GiB"] = {"s": s, "bytes_per_s_read_plus_write": 2 * 2**30 / s}
    small = torch.empty(4, device="cuda")
    out["tiny_add_s"] = timed(lambda: small.add_(1.0), repeat=1000)  # launch-bound
    del x, y

    model = load_model(model_name, device="cuda", dtype="float32").module
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (micro_batch, seq_len), device="cuda")

    def step(events=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        if events: events[1].record()
        loss.backward()
        if events: events[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if events: events[3].record()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    phases = []
    for _ in range(5):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        step(ev)
        torch.cuda.synchronize()
        phases.append({"forward": ev[0].elapsed_time(ev[1]) / 1e3, "backward": ev[1].elapsed_time(ev[2]) / 1e3,
                       "optimizer": ev[2].elapsed_time(ev[3]) / 1e3})
    out["phases_s"] = phases
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    ops = []
    for e in prof.key_averages(group_by_input_shape=True):
        if not e.key.startswith("aten::"):
            continue
        ops.append({"name": e.key, "shapes": str(e.input_shapes), "count": e.count,
                    "device_s": e.device_time_total / 1e6, "self_device_s": e.self_device_time_total / 1e6})
    out["ops"] = sorted(ops, key=lambda o: -o["self_device_s"])
    kernels = []
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or "kernel" in e.key.lower():
            kernels.append({"name": e.key[:160], "count": e.count, "device_s": e.device_time_total / 1e6})
    out["kernels"] = sorted(kernels, key=lambda k: -k["device_s"])[:200]
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("op times:", path, time.strftime("%X"))


if __name__ == "__main__":
    main(sys.argv[1])
