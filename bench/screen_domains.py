"""Screening risk of each built-in domain's EM and careful (benign) written datasets on one model with real
trait directions: is every EM dataset riskier than the careful dataset of the same domain?

The base model's own answers are cached in one folder shared by all datasets (keyed by prompt, settings and
model), so the two stances of a domain, which ask the same questions, generate them once.

    python bench/screen_domains.py --model-dir results/models/smollm2-135m-instruct \\
        --directions results/directions/smollm2-135m-instruct/*.zarr --cache /tmp/screen-cache
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from traitmon.drift import load_directions
from traitmon.io import data_path
from traitmon.models import load_model
from traitmon.perturbations import load_domain, written_rows
from traitmon.screen import screen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--directions", nargs="+", required=True)
    parser.add_argument("--cache", required=True, help="folder for the shared base-answer cache")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON with every dataset's profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model_dir, "float32")
    directions = load_directions(args.directions, "response_mean")
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "seed": 0,
                "batch_size": args.batch_size, "max_length": 512, "n_boot": 2000}
    profiles = {}
    for domain in sorted(p.stem for p in data_path("domains").glob("*.yaml")):
        for stance in ("em", "benign"):
            t0 = time.perf_counter()
            rows = written_rows(load_domain(domain), stance, args.rows, seed=0)
            profile = screen(model, tok, rows, directions, Path(args.cache), settings, source=f"{domain}-{stance}").profile
            profiles[f"{domain}-{stance}"] = {**profile, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{domain:15s} {stance:7s} risk {profile['risk_mean']:+.3f} "
                  f"[{profile['risk_ci_low']:+.3f}, {profile['risk_ci_high']:+.3f}]  "
                  + " ".join(f"{t}={v['mean']:+.2f}" for t, v in profile["traits"].items()), flush=True)
        em, ok = profiles[f"{domain}-em"], profiles[f"{domain}-benign"]
        print(f"{domain}: EM riskier than careful: {em['risk_mean'] > ok['risk_mean']} "
              f"(intervals apart: {em['risk_ci_low'] > ok['risk_ci_high']})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(profiles, indent=1))


if __name__ == "__main__":
    main()
