"""Does a text-only MacCap run see the image? Colour of the largest object in its captions, per variant.

    python benchmarks/maccap_colour.py RUN [--images 80] [--decode greedy]

RUN is a MacCap run trained on shapes captions. For unseen shapes test scenes (data.seed 0, test split)
it captions every image under each inference variant (subregions k in {0, 10} × samples N in {1, 4},
re-ranked when N > 1) and prints the share of captions that name the colour of the scene's largest
object, beside the same captions shuffled across images (what a captioner blind to the image scores).
"""
from __future__ import annotations

import argparse
import time

import torch

from finealign.api import load
from finealign.data.sources.shapes import make_scene, render
from finealign.data.transforms import ImageTransform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--decode", default="greedy", choices=["greedy", "beam"])
    args = ap.parse_args()
    model = load(args.run).model
    tf = ImageTransform(model.cfg.image_size, train=False)
    scenes = [make_scene(0, "test", i) for i in range(args.images)]
    images = torch.stack([tf(render(s)) for s in scenes])
    colour = [s.objects[s.primary].colour for s in scenes]
    print("| subregions k | samples N (re-ranked) | colour named | shuffled captions | s |\n|---:|---:|---:|---:|---:|")
    for k, n in [(0, 1), (0, 4), (10, 1), (10, 4)]:
        model.mc.subregions, model.mc.samples, model.mc.rerank = k, n, n > 1
        t0 = time.perf_counter()
        caps = model.caption_images(images, strategy=args.decode, max_new_tokens=16)
        hit = sum(c in cap for c, cap in zip(colour, caps)) / len(caps)
        shuf = sum(c in cap for c, cap in zip(colour, caps[1:] + caps[:1])) / len(caps)
        print(f"| {k} | {n} | {100 * hit:.1f}% | {100 * shuf:.1f}% | {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
    main()
