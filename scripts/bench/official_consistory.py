"""Times the UNet calls of a ConsiStory character frame as the OFFICIAL NVlabs/consistory code runs
them, so they sit beside `crates/storyfarm-diffusion/examples/bench_consistory.rs` in BENCHMARKS.md.

Everything that runs is the official code, imported unmodified (commit 8158d41, fetched outside this
repo): its UNet (`ConsistorySDXLUNet2DConditionModel`, FreeU s1=0.6 s2=0.4 b1=1.1 b2=1.2 as its
`load_pipeline`), its attention processors (`register_extended_self_attn`), `AttentionStore` (its own
Otsu masks and 0.5 mask dropout), `QueryStore`, `FeatureInjector`, `AnchorCache`. Each timed call is
one UNet call with exactly the `cross_attention_kwargs` of the official denoising loop
(consistory_pipeline.py), settings as `run_batch_generation` / `run_anchor_generation` /
`run_extra_generation` (50 steps, 2 anchors, mask_dropout 0.5, shared attention in 'up' only).

Synthetic (no weights, prompts or earlier steps exist): random UNet weights (f32, CPU), latents,
text context, pooled embeddings; the cross-attention maps fed to the AttentionStore (a centred disc
over about a third of each image for the concept token, so the official Otsu + dropout give the
masks our bench's `disc()` gives); the nearest-neighbour maps and distances of the FeatureInjector
(distances low inside the disc, so the official dynamic threshold injects about a third of the
patches, as our plan); the anchors' cache of anchor mode, filled by official anchor calls.

Calls (names as ours): `plain` (the F frames alone: a stock diffusers UNet2DConditionModel sharing
the weights, default SDPA attention, no FreeU), `vanilla` (query caching, steps 0..5), `sdsa`
(step 20), `sdsa+blend` (step 3), `sdsa+inject` (step 8, pass 2), all on A + F images under CFG;
then official anchor mode, one extra frame against the anchors' caches: `extra-vanilla`,
`extra-sdsa`, `extra-sdsa+blend`, `extra-sdsa+inject` (skip with --no-extra).

Environment (tests/fixtures/consistory/README.md's recipe): the venv with torch/diffusers 0.42, the
official code in $CONSISTORY_OFFICIAL (default /work/scratch/consistory-official) and the recorder's
`official_env.py` (compatibility shims) in --env-dir / $CONSISTORY_ENV_DIR (default /work/scratch/cg).
xformers is replaced by a shim this script writes to a temporary folder (or --shims DIR; it sets
CONSISTORY_SHIMS itself): `memory_efficient_attention` as torch SDPA, the same maths as xformers'
kernel without materialising the logits (the recorder's exact shim needs >12 GB at 1024²).

  # ($VENV: the recipe's venv, e.g. /work/scratch/cvenv) tiny model (seconds per call), self-checks on
  nice -n 10 $VENV/bin/python scripts/bench/official_consistory.py \\
      tests/fixtures/models/tiny-sdxl/unet/config.json --threads 1 --runs 1 --check
  # real SDXL at 1024², first call of each kind only (minutes per call; about 13 GB peak: 10.3 GB
  # of f32 weights, shared by both UNets, and the 6-image CFG batch's activations)
  $VENV/bin/python scripts/bench/official_consistory.py tests/fixtures/real-configs/sdxl_unet.json --runs 0

--runs N: median of N timed calls after one warm-up; --runs 0: the first call only. Wall seconds and
the process's CPU seconds (time.process_time) per kind, then the whole-frame ratio from the call
counts as bench_consistory.rs computes it, and peak RSS. --check prints, per kind, the shared-
attention calls, blended queries and injected patches it observed, and asserts them (timings taken
with --check carry its clones: do not publish them).
"""
import argparse
import atexit
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("config", help="diffusers UNet config.json (SDXL layout)")
ap.add_argument("--runs", type=int, default=3, help="timed runs after a warm-up; 0: the first call only")
ap.add_argument("--side", type=int, default=1024, help="image side in pixels (the official code assumes 1024)")
ap.add_argument("--frames", type=int, default=1)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--env-dir", default=os.environ.get("CONSISTORY_ENV_DIR", "/work/scratch/cg"))
ap.add_argument("--official", default=os.environ.get("CONSISTORY_OFFICIAL", "/work/scratch/consistory-official"))
ap.add_argument("--shims", help="folder with xformers/ and IPython/ shims (default: written to a temp dir)")
ap.add_argument("--no-extra", action="store_true", help="skip the anchor-mode extra frame")
ap.add_argument("--check", action="store_true", help="assert each call does what it claims (adds cost)")
args = ap.parse_args()

SDPA_SHIM = '''"""xformers.ops.memory_efficient_attention as torch SDPA on [B, N, d] (benchmark shim)."""
import torch

HOOKS = []  # observers hook(query, key, value, output, scale), as the recorder's shim


class AttentionOpBase:  # referenced in type hints only
    pass


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
    # SDPA's fused CPU kernel never holds the [B, N, M] logits (10 x 4096 x 8192: 14 MB peak, not 1.3 GB).
    mask = None if attn_bias is None else attn_bias.unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask=mask, dropout_p=p, scale=scale)[0]
    for hook in HOOKS:
        hook(query, key, value, out, scale)
    return out
'''
if args.shims is None:
    args.shims = tempfile.mkdtemp(prefix="consistory-bench-shims-")
    atexit.register(shutil.rmtree, args.shims, True)
    for rel, text in {"xformers/__init__.py": "from . import ops  # noqa: F401\n", "xformers/ops.py": SDPA_SHIM,
                      "IPython/__init__.py": "", "IPython/display.py": "def display(*a, **k):\n    return None\n"}.items():
        os.makedirs(os.path.join(args.shims, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(args.shims, rel), "w") as f:
            f.write(text)
os.environ["CONSISTORY_SHIMS"] = os.path.abspath(args.shims)
os.environ["CONSISTORY_OFFICIAL"] = os.path.abspath(args.official)
sys.path.insert(0, os.path.abspath(args.env_dir))

import torch  # noqa: E402
import warnings  # noqa: E402

torch.set_num_threads(args.threads)
warnings.filterwarnings("ignore")
import official_env as E  # noqa: E402
import diffusers  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
assert os.path.abspath(E.xformers.ops.__file__).startswith(os.environ["CONSISTORY_SHIMS"]), E.xformers.ops.__file__
AP, CU, CR, PT = E.attention_processor, E.consistory_utils, E.consistory_run, E.ptp_utils

ANCHORS, STEPS, TOKEN = 2, 50, 5
BLEND, INJECT = STEPS // 10, STEPS // 3 - STEPS // 10 + 1  # bench_consistory.rs's call counts
STEP = {"vanilla": 3, "sdsa": 20, "sdsa+blend": 3, "sdsa+inject": 8}
# The official defaults, as the run_*_generation functions spell them (n_steps = 50).
EXT_KWARGS = {"extend_kv_unet_parts": ["up"], "t_range": [(1, STEPS)]}
QS_KWARGS = {"t_range": [0, STEPS // 10], "strength_start": 0.9, "strength_end": 0.81836735}
FI_KWARGS = dict(inject_range_alpha=[(STEPS // 10, STEPS // 3, 0.8)], swap_strategy="min",
                 inject_unet_parts=["up", "down"], dist_thr="dynamic")

config = json.load(open(args.config))
side = args.side // 8
F, n_set = args.frames, ANCHORS + args.frames
text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

torch.manual_seed(0)
unet = CR.ConsistorySDXLUNet2DConditionModel.from_config(config).eval()
unet.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)
# The plain UNet shares the official one's weight tensors (meta init + assign): one copy in memory.
with torch.device("meta"):
    plain_unet = UNet2DConditionModel.from_config(config).eval()
plain_unet.load_state_dict(unet.state_dict(), strict=True, assign=True)
assert all(not t.is_meta for t in list(plain_unet.parameters()) + list(plain_unet.buffers()))


def disc(res):
    """A centred disc over about a third of a res x res map (bench_consistory.rs's `disc`)."""
    c = (res - 1) / 2
    y, x = torch.meshgrid(torch.arange(res) - c, torch.arange(res) - c, indexing="ij")
    return (y * y + x * x <= res * res / (3 * math.pi)).flatten()


def inputs(n):
    b, px = 2 * n, float(args.side)
    return dict(sample=torch.randn(b, config["in_channels"], side, side),
                encoder_hidden_states=torch.randn(b, 77, config["cross_attention_dim"]),
                added_cond_kwargs={"text_embeds": torch.randn(b, text_dim),
                                   "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * b)})


def store_with_disc_masks(n, mapping=None):
    """An official AttentionStore whose own aggregation (Otsu, upsampling, 0.5 dropout) turns disc
    cross-attention maps of the concept token into its masks, as after a step of the official loop."""
    kw = {"token_indices": torch.full((1, n), TOKEN), "mask_dropout": 0.5}
    if mapping is not None:
        kw["extended_mapping"] = mapping
    store = PT.AttentionStore(kw)
    maps = torch.zeros(n, store.attn_res[0] * store.attn_res[1], 77)
    maps[:, disc(store.attn_res[0]), TOKEN] = 1.0
    store.step_store["synthetic"] = [maps]
    store.aggregate_last_steps_attention()
    assert torch.equal(store.last_mask[32], disc(32).expand(n, -1))
    return store


def injector(masks, n_tgt, n_src, cyclic):
    """An official FeatureInjector over synthetic nearest-neighbour maps: source patches scattered,
    distances low inside the disc (so the dynamic threshold keeps it), inf for an image against
    itself as cyclic_nn_map leaves it."""
    nn_map, nn_dist = {}, {}
    for res in CR.LATENT_RESOLUTIONS:
        p = res * res
        nn_map[res] = ((torch.arange(p) * 7919) % p).expand(n_tgt, n_src, p).clone()
        nn_dist[res] = torch.where(disc(res), 0.0, 1.0) + 0.05 * torch.rand(n_tgt, n_src, p)
        if cyclic:
            nn_dist[res][torch.arange(n_tgt), torch.arange(n_tgt)] = float("inf")
    return CU.FeatureInjector(nn_map, nn_dist, {k: v.clone() for k, v in masks.items()}, **FI_KWARGS)


class Check:
    """--check: counts, per timed kind, shared-attention calls (keys longer than queries), blended
    queries and injected patches, observed by wrapping the official objects' methods."""
    def __init__(self):
        self.reset()
        E.xformers.ops.HOOKS.append(self.attention)

    def reset(self):
        self.ext, self.blend, self.inj = [], 0, []

    def attention(self, q, k, v, out, scale):
        if k.shape[1] != q.shape[1]:
            self.ext.append(k.shape[1] / q.shape[1] - 1)

    def watch_queries(self, qs):
        orig = qs.inject_query

        def inject_query(query, *a):
            out = orig(query, *a)
            self.blend += out is not query
            return out
        qs.inject_query = inject_query

    def watch_injector(self, fi):
        for name in ("inject_outputs", "inject_anchors"):
            def wrapped(output, *a, _orig=getattr(fi, name)):
                before = output.clone()
                out = _orig(output, *a)
                changed = (out != before).any(-1)
                if changed.any():
                    self.inj.append(changed.float().mean().item())
                return out
            setattr(fi, name, wrapped)

    def report(self, kind, calls):
        ext = sum(self.ext) / max(len(self.ext), 1)
        inj = sum(self.inj) / max(len(self.inj), 1)
        print(f"  check: {len(self.ext) // calls} shared-attention calls (extra keys {ext:.3f} of own), "
              f"{self.blend // calls} blended queries, {len(self.inj) // calls} injected layers "
              f"({inj:.3f} of patches) per call")
        want_ext = not kind.startswith("plain") and not kind.endswith("vanilla")
        assert bool(self.ext) == want_ext and (self.blend > 0) == kind.endswith("blend"), kind
        assert bool(self.inj) == kind.endswith("inject") and (not self.inj or 0.2 < inj < 0.45), kind
        self.reset()


check = Check() if args.check else None
results = {}


def timed(kind, n, fn):
    walls, cpus = [], []
    for run in range(args.runs + 1 if args.runs else 1):
        w0, c0 = time.perf_counter(), time.process_time()
        fn().sum().item()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if run > 0 or args.runs == 0:
            walls.append(wall)
            cpus.append(cpu)
    # Upper median, as bench_consistory.rs's `median`.
    wall, cpu = sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]
    results[kind] = wall
    print(f"{kind:<12} images {n:>2}  wall {wall:8.3f}s  cpu {cpu:8.3f}s", flush=True)
    if check:
        check.report(kind, args.runs + 1 if args.runs else 1)


def official_call(inp, store, step, kwargs):
    """One UNet call of the official loop at step `step` (DDIM, 50 steps: t = 981 - 20 step)."""
    store.curr_iter = step
    return unet(**inp, timestep=torch.tensor(981 - 20 * step), timestep_cond=None,
                cross_attention_kwargs=kwargs, return_dict=False)[0]


def vanilla_call(inp, store, qs, step):
    qs.set_mode("cache")
    out = official_call(inp, store, step, {"query_store": qs, "perform_extend_attn": False, "record_attention": False})
    qs.set_mode("inject")
    return out


def main_call(inp, store, qs, step, fi=None, cache=None):
    return official_call(inp, store, step, {"query_store": qs, "perform_extend_attn": True, "record_attention": True,
                                            "feature_injector": fi, "anchors_cache": cache})


def frame_ratio(t, plain):
    """bench_consistory.rs's whole-frame formula: two passes of 50 main calls plus the vanilla calls.
    (The official loop differs slightly: 6 vanilla calls per pass (steps 0..5), a step-0 main call
    without shared attention, and step 5 of pass 2 both blending and injecting.)"""
    pass1 = t["sdsa+blend"] * BLEND + t["sdsa"] * (STEPS - BLEND) + t["vanilla"] * BLEND
    pass2 = (t["sdsa+blend"] * BLEND + t["sdsa+inject"] * INJECT + t["sdsa"] * (STEPS - BLEND - INJECT)
             + t["vanilla"] * BLEND)
    return (pass1 + pass2) / (STEPS * plain)


with torch.inference_mode():
    # Batch mode (run_batch_generation, n_achors=2): anchors and frames in one batch, frames attend
    # to the anchors' masked keys, anchors to each other.
    store = store_with_disc_masks(n_set, CR.create_anchor_mapping(n_set, anchor_indices=list(range(ANCHORS))))
    AP.register_extended_self_attn(unet, store, EXT_KWARGS)
    qs = CU.QueryStore(**QS_KWARGS)
    fi = injector(store.last_mask, n_set, n_set, cyclic=True)
    # (The official UNet's attn_processors lists None under diffusers 0.42; the modules hold them.)
    proc = next(m.processor for m in unet.modules() if isinstance(m, Attention)
                and isinstance(m.processor, AP.ConsistoryExtendedAttnXFormersAttnProcessor))
    # The official ranges must put each kind's step where intended, and give our formula's counts
    # (blending in main calls 1..5: step 0 has no shared attention; injection in 5..16).
    in_ext = lambda s: any(a <= s <= b for a, b in proc.t_range)  # noqa: E731
    in_blend = lambda s: in_ext(s) and qs.t_range[0] <= s <= qs.t_range[1]  # noqa: E731
    in_inject = lambda s: any(a <= s <= b for a, b, _ in fi.inject_range_alpha)  # noqa: E731
    assert qs.t_range[0] <= STEP["vanilla"] <= qs.t_range[1]  # the loop makes vanilla calls only there
    for kind in ("sdsa", "sdsa+blend", "sdsa+inject"):
        s = STEP[kind]
        assert in_ext(s) and in_blend(s) == kind.endswith("blend") and in_inject(s) == kind.endswith("inject"), kind
    assert sum(map(in_blend, range(STEPS))) == BLEND and sum(map(in_inject, range(STEPS))) == INJECT
    if check:
        check.watch_queries(qs)
        check.watch_injector(fi)
        print(f"masks: share {store.last_mask[64].float().mean():.3f} at 64, after dropout "
              f"{store.last_mask_dropout[32].float().mean():.3f} at 32, {store.last_mask_dropout[64].float().mean():.3f} at 64")

    frame_in, set_in = inputs(F), inputs(n_set)
    plain_call = lambda inp: plain_unet(**inp, timestep=torch.tensor(981 - 20 * 20), return_dict=False)[0]  # noqa: E731
    timed("plain", F, lambda: plain_call(frame_in))
    timed("vanilla", n_set, lambda: vanilla_call(set_in, store, qs, STEP["vanilla"]))
    if check:
        assert len(qs.query_store) > 0
    timed("sdsa", n_set, lambda: main_call(set_in, store, qs, STEP["sdsa"]))
    timed("sdsa+blend", n_set, lambda: main_call(set_in, store, qs, STEP["sdsa+blend"]))
    timed("sdsa+inject", n_set, lambda: main_call(set_in, store, qs, STEP["sdsa+inject"], fi))
    batch = frame_ratio(results, results["plain"])
    print(f"official batch mode per frame ({F} frame(s) per batch, {ANCHORS} anchors recomputed): "
          f"{batch:.2f}x a plain frame (two-pass floor 2.00x at equal call cost)")

    if not args.no_extra:
        # Anchor mode (run_anchor_generation, then run_extra_generation per frame). The anchors' calls
        # in cache mode keep their masked inputs of every shared layer (stage 1, no injection) and,
        # with their own injector, their injected outputs (stage 2); one call per step the frame needs.
        # The anchors' calls get no QueryStore (their blending changes values, not what is cached).
        # The frame is always alone: the official inject branch concatenates one anchor set per batch.
        a_store = store_with_disc_masks(ANCHORS)
        AP.register_extended_self_attn(unet, a_store, EXT_KWARGS)
        stage1, stage2 = CU.AnchorCache(), CU.AnchorCache()
        a_in = inputs(ANCHORS)
        a_fi = injector(a_store.last_mask, ANCHORS, ANCHORS, cyclic=True)
        for step, cache, a_inj in ((STEP["sdsa+blend"], stage1, None), (STEP["sdsa"], stage1, None),
                                   (STEP["sdsa+inject"], stage2, a_fi)):
            w0 = time.perf_counter()
            main_call(a_in, a_store, None, step, a_inj, cache)
            print(f"  (anchors' cache call, step {step:>2}: {time.perf_counter() - w0:.3f}s wall, not in the ratio)")
        assert stage1.input_h_cache and stage2.h_out_cache
        if check:
            check.reset()
        f_store = store_with_disc_masks(1)
        AP.register_extended_self_attn(unet, f_store, EXT_KWARGS)
        stage1.set_mode_inject()
        stage2.set_mode_inject()
        f_qs = CU.QueryStore(**QS_KWARGS)
        f_fi = injector(f_store.last_mask, 1, ANCHORS, cyclic=False)  # anchor_nn_map's shape
        if check:
            check.watch_queries(f_qs)
            check.watch_injector(f_fi)
        one_in = frame_in if F == 1 else inputs(1)
        if F != 1:
            timed("plain x1", 1, lambda: plain_call(one_in))
        timed("extra-vanilla", 1, lambda: vanilla_call(one_in, f_store, f_qs, STEP["vanilla"]))
        timed("extra-sdsa", 1, lambda: main_call(one_in, f_store, f_qs, STEP["sdsa"], None, stage1))
        timed("extra-sdsa+blend", 1, lambda: main_call(one_in, f_store, f_qs, STEP["sdsa+blend"], None, stage1))
        timed("extra-sdsa+inject", 1, lambda: main_call(one_in, f_store, f_qs, STEP["sdsa+inject"], f_fi, stage2))
        extra = frame_ratio({k: results["extra-" + k] for k in STEP}, results["plain" if F == 1 else "plain x1"])
        print(f"official anchor mode per extra frame (the anchors' own run excluded): {extra:.2f}x a plain frame")

print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
