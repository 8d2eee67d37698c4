"""One UNet forward of a real diffusers config with random weights in PyTorch on the CPU, timed
the way ../shared/BASELINES.md describes (2 threads, float32, inference_mode, SDPA attention,
1 warm-up, median of N). The storyfarm side is `bench_unet` (BENCHMARKS.md runs both in one go).

usage: python pytorch_unet.py <unet config.json> [runs]
"""
import json
import resource
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

torch.set_num_threads(2)
config_path = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
config = json.load(open(config_path))
unet = UNet2DConditionModel.from_config(config).eval()
xl = config.get("addition_embed_type") == "text_time"
side = 128 if xl else 64
batch = 1 if xl else 2
sample = torch.randn(batch, 4, side, side)
context = torch.randn(batch, 77, config["cross_attention_dim"])
added = None
if xl:
    px = side * 8
    added = {
        "text_embeds": torch.randn(batch, config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]),
        "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32),
    }
walls, cpus = [], []
with torch.inference_mode():
    for run in range(runs + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        unet(sample, 501, encoder_hidden_states=context, added_cond_kwargs=added)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        print(f"pytorch run {run}{' (warm-up)' if run == 0 else ''}: wall {wall:.2f}s cpu {cpu:.2f}s", file=sys.stderr)
        if run:
            walls.append(wall)
            cpus.append(cpu)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
print(f"pytorch   batch {batch}x4x{side}x{side}: best {min(walls):.2f}s median {statistics.median(walls):.2f}s "
      f"cpu(median) {statistics.median(cpus):.2f}s peak RSS {rss:.1f} GiB")
