"""Vision encode benchmark: one 1344x1344 image through M3's vision tower and projector, m3jax against
transformers on the same card.

    python benchmarks/vision.py [--out DIR] [--small] [--max-pixels N] [--dtype bfloat16|float32]

Geometry: the release's vision_config (tests/data/MiniMax-M3.config.json: ViT 1280 wide, 32 layers, 16 heads,
patch 14, 2x2 merge, projector 6144 -> text hidden 6144), random weights (transformers' init), copied into m3jax
so both encode the same function. The image is processed once by m3jax's ImageProcessor with max_pixels =
--max-pixels (default 1344*1344: no downscaling, 96x96 patches = 9216 tokens in one attention segment, 2304
placeholder tokens); the processor's own time (numpy, host) is reported separately.
Timed (median of 5 repetitions of 3 calls, synchronised): m3jax's jitted tower + projector per attention path
("cudnn" / "xla" packed segments, "reference" dense masked) and transformers' vision_tower + multi_modal_projector
(sdpa) under torch.no_grad. Reports ms per image, patches/s, and the max |feature diff| against transformers as
a sanity check (bf16: a loose agreement, not the float32 parity the tests assert).
--small: a tiny geometry and a 224x224 image, runs on CPU in seconds.
Prints one table last and writes vision.json under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from m3jax.vision import ImageProcessor, VisionConfig, VisionModel, load_vision_params  # noqa: E402

RELEASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                              "MiniMax-M3.config.json")


T0 = time.perf_counter()


def stage(msg: str) -> None:
    """A progress line with the seconds since start, so that a run cut by a time limit still says where it was."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def timed(fn, sync, reps=5, iters=3) -> float:
    """Median seconds per call (after one warm-up call)."""
    sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def hf_config(small: bool):
    from transformers.models.minimax_m3_vl import configuration_minimax_m3_vl as hf_cfg

    if small:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        return hf_cfg.MiniMaxM3VLConfig(text_config=dict(hidden_size=64), vision_config=vision,
                                        projector_hidden_size=64)
    with open(RELEASE_CONFIG) as f:
        d = json.load(f)
    keep = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "patch_size",
            "layer_norm_eps", "num_channels")
    vision = {k: d["vision_config"][k] for k in keep}
    return hf_cfg.MiniMaxM3VLConfig(text_config=dict(hidden_size=d["text_config"]["hidden_size"]), vision_config=vision,
                                    projector_hidden_size=d.get("projector_hidden_size", 6144))


def release_name(prefix: str, key: str) -> str:
    """transformers' module key -> the release's tensor name (what save_pretrained writes)."""
    if prefix == "tower":
        key = key.replace("layers.", "encoder.layers.", 1) if key.startswith("layers.") else key
        key = key.replace("embeddings.proj.", "embeddings.patch_embedding.")
        return "vision_tower.vision_model." + key
    if key.startswith("merge_linear_"):
        return "patch_merge_mlp." + key[len("merge_"):]
    return "multi_modal_projector." + key


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    import torch
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_mod

    side = 224 if args.small else 1344
    max_pixels = args.max_pixels or side * side
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = hf_config(args.small)
    cfg.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    stage(f"building transformers' tower and projector ({device}, {args.dtype})")
    tower = hf_mod.MiniMaxM3VLVisionModel(cfg.vision_config).eval()
    projector = hf_mod.MiniMaxM3VLMultiModalProjector(cfg).eval()
    tensors = {release_name("tower", k): v.float().numpy() for k, v in tower.state_dict().items()}
    tensors.update({release_name("proj", k): v.float().numpy() for k, v in projector.state_dict().items()})
    vcfg = VisionConfig.from_hf(cfg.to_dict())

    stage("weights copied; processing the image")
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    proc = ImageProcessor(max_pixels=max_pixels)
    t0 = time.perf_counter()
    inputs = proc([image])
    t_proc = time.perf_counter() - t0
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    patches = int(grid.prod())

    tower, projector = tower.to(device, tdtype), projector.to(device, tdtype)
    pv_t, grid_t = torch.from_numpy(pv).to(device, tdtype), torch.from_numpy(grid).to(device)

    def hf_encode():
        with torch.no_grad():
            return projector(tower(pixel_values=pv_t, grid_thw=grid_t).last_hidden_state.squeeze(0))

    def torch_sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    stage(f"{patches} patches; timing transformers")
    want = hf_encode().float().cpu().numpy()
    rows = [dict(impl="transformers (sdpa)", ms=1e3 * timed(hf_encode, torch_sync), err=0.0)]
    del tower, projector
    if device == "cuda":
        torch.cuda.empty_cache()

    # cuDNN's fused attention takes no float32 (the tower's GPU default is then "xla", see default_attn_impl)
    cudnn = jax.default_backend() == "gpu" and args.dtype != "float32"
    impls = ["cudnn"] * cudnn + ["xla", "reference"]
    dtype = jnp.dtype(args.dtype)
    for impl in impls:
        stage(f"timing m3jax {impl}")
        try:
            ours = load_vision_params(VisionModel(vcfg, dtype=dtype, attn_impl=impl), tensors)
            got = np.asarray(ours(pv, grid).astype(jnp.float32))
            pv_j = jnp.asarray(pv)
            ms = 1e3 * timed(lambda: ours(pv_j, grid), jax.block_until_ready)
            rows.append(dict(impl=f"m3jax {impl}", ms=ms, err=float(np.abs(got - want).max())))
        except Exception as e:  # noqa: BLE001 - one failing path (e.g. cuDNN refusing a shape) is reported, not fatal
            rows.append(dict(impl=f"m3jax {impl}", ms=None, err=None, error=f"{type(e).__name__}: {e}"[:300]))
            traceback.print_exc()
        finally:
            ours = None

    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=str(jax.devices()[0].device_kind), torch_device=device, dtype=args.dtype,
                  image=[side, side], max_pixels=max_pixels, grid_thw=grid.tolist(), patches=patches,
                  placeholder_tokens=patches // vcfg.merge_window, processor_ms=1e3 * t_proc,
                  feature_scale=float(np.abs(want).max()), rows=rows, small=args.small)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vision.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']} {args.dtype}: image {side}x{side}, grid {grid.tolist()}, {patches} patches, "
          f"{patches // vcfg.merge_window} tokens; m3jax processor {1e3 * t_proc:.1f} ms (host)")
    print(f"max |feature| {result['feature_scale']:.3g}")
    print(f"{'impl':<22}{'ms/image':>10}{'patches/s':>12}{'max|diff|':>11}")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['impl']:<22}{'failed':>10}  {r['error'][:60]}")
        else:
            print(f"{r['impl']:<22}{r['ms']:>10.2f}{patches / r['ms'] * 1e3:>12.0f}{r['err']:>11.3g}")


if __name__ == "__main__":
    main()
