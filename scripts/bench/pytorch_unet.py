"""One UNet forward of a real diffusers config with random weights in PyTorch on the CPU, timed
the way ../shared/BASELINES.md describes (2 threads, float32, inference_mode, SDPA attention,
1 warm-up, median of N). The storyfarm side is `bench_unet` (BENCHMARKS.md runs both in one go).
Like `bench_unet`, `STORYFARM_DEVICE=cuda` and `STORYFARM_PRECISION=f16|bf16|f32` run it on a GPU
(default f16 there), timed to the end of the queued kernels.

usage: python pytorch_unet.py <unet config.json> [runs]
"""
import json
import os
import resource
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

config_path = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
device = os.environ.get("STORYFARM_DEVICE", "cpu")
gpu = device.startswith("cuda")
precision = os.environ.get("STORYFARM_PRECISION", "f16" if gpu else "f32")
dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[precision]
if not gpu:
    torch.set_num_threads(2)
config = json.load(open(config_path))
unet = UNet2DConditionModel.from_config(config).eval().to(device=device, dtype=dtype)
xl = config.get("addition_embed_type") == "text_time"
side = 128 if xl else 64
batch = 1 if xl else 2
sample = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
context = torch.randn(batch, 77, config["cross_attention_dim"], device=device, dtype=dtype)
added = None
if xl:
    px = side * 8
    added = {
        "text_embeds": torch.randn(batch, config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"],
                                   device=device, dtype=dtype),
        "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, device=device, dtype=dtype),
    }
walls, cpus = [], []
with torch.inference_mode():
    for run in range(runs + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        unet(sample, 501, encoder_hidden_states=context, added_cond_kwargs=added)
        if gpu:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        print(f"pytorch run {run}{' (warm-up)' if run == 0 else ''}: wall {wall:.3f}s cpu {cpu:.3f}s", file=sys.stderr)
        if run:
            walls.append(wall)
            cpus.append(cpu)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
print(f"pytorch   batch {batch}x4x{side}x{side} ({precision} on {device}): best {min(walls):.3f}s "
      f"median {statistics.median(walls):.3f}s cpu(median) {statistics.median(cpus):.3f}s peak RSS {rss:.1f} GiB")
