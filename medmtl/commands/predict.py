"""`medmtl predict`: a trained model's predictions on image files of any size.

    medmtl predict --checkpoint runs/resformer_mtl/checkpoint_best.pth --input scans/ --output predictions/

Each image (PNG, JPEG, TIFF, DICOM, NIfTI) is resized to the model's input
size, and the outputs are mapped back to the image's own pixels. Written to
--output:

    masks/<stem>.png        class indices, uint8, the image's height x width (PNG/JPEG/TIFF/DICOM inputs)
    masks/<stem>.nii.gz     the same for NIfTI inputs, with the input's affine (FolderDataset's orientation)
    overlays/<stem>.png     the image beside its prediction (mask, boxes, label probabilities)
    predictions.json        per image: size, mask file, label probabilities and predicted labels,
                            boxes (xyxy in the image's pixels) with label and score

masks/ is in FolderDataset's layout, so predictions can be reviewed and fed back as training masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import medmtl
from medmtl.commands.from_checkpoint import load_trained
from medmtl.data import IMAGE_SUFFIXES, NormalizeIntensity, read_image
from medmtl.data.folder import _stem, _suffix
from medmtl.engine.plots import save_overlay


def list_inputs(path: str | Path) -> list[Path]:
    """The image files of `path` (one file, or a folder's supported files, sorted)."""
    path = Path(path)
    if path.is_file():
        if _suffix(path.name) not in IMAGE_SUFFIXES:
            raise ValueError(f"--input {path} is not a supported image file ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise ValueError(f"--input {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and _suffix(p.name) in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--input {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _write_mask(mask: torch.Tensor, source: Path, folder: Path) -> Path:
    """mask (H, W) class indices -> masks/<stem>.png, or .nii.gz (input's affine) for NIfTI."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = _stem(source.name)
    if _suffix(source.name) in (".nii", ".nii.gz"):
        import nibabel

        affine = nibabel.load(str(source)).affine
        path = folder / f"{stem}.nii.gz"
        # NIfTI's first axis is x (columns): the (H, W) array is written transposed.
        nibabel.save(nibabel.Nifti1Image(mask.T.numpy().astype("uint8"), affine), str(path))
        return path
    from PIL import Image

    if int(mask.max()) > 255:
        raise ValueError(f"predict: {int(mask.max()) + 1} classes do not fit a uint8 PNG mask")
    path = folder / f"{stem}.png"
    Image.fromarray(mask.numpy().astype("uint8")).save(path)
    return path


@torch.no_grad()
def predict(checkpoint: str | Path, inputs: str | Path, output: str | Path, score_threshold: float = 0.3,
            progress: bool = True, log=print) -> dict:
    """Predictions of the checkpoint's model for every image of `inputs`; returns the
    predictions.json content."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"predict: score_threshold must be in [0, 1], got {score_threshold!r}")
    config, model, label_names = load_trained(checkpoint)
    files = list_inputs(inputs)
    output = Path(output)
    size = int(config.model.get("img_size", config.data.img_size))
    in_channels = int(config.model.get("in_channels", config.data.channels or 1))
    normalize = NormalizeIntensity() if config.data.normalize else None
    records = []
    iterator = files
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc="predict", dynamic_ncols=True)
    for path in iterator:
        image = read_image(path, in_channels)
        h, w = image.shape[1:]
        x = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=(size < h or size < w))
        if normalize is not None:
            x = normalize({"image": x[0]})["image"][None]
        with medmtl.backend("auto"):
            outputs = model(x)
        record = {"file": str(path), "height": h, "width": w}
        mask = boxes = box_labels = None
        title = path.name
        if "seg" in outputs:
            logits = F.interpolate(outputs["seg"].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
            mask = (logits[0] > 0).long() if logits.shape[0] == 1 else logits.argmax(0)
            record["mask"] = str(_write_mask(mask, path, output / "masks").relative_to(output))
            record["classes_present"] = sorted(int(c) for c in mask.unique() if c > 0)
        if "cls" in outputs:
            probs = torch.sigmoid(outputs["cls"][0].float()).tolist()
            names = label_names or [str(i) for i in range(len(probs))]
            record["probabilities"] = dict(zip(names, probs))
            record["labels"] = [n for n, p in zip(names, probs) if p >= 0.5]
            title += "  " + ", ".join(f"{n} {p:.2f}" for n, p in zip(names, probs))
        if "det" in outputs and hasattr(model, "decode_detections"):
            det = model.decode_detections(outputs["det"], score_threshold)[0]
            scale = torch.tensor([w / size, h / size, w / size, h / size])
            boxes, box_labels = det["boxes"].float() * scale, det["labels"] + 1
            record["boxes"] = [{"box": [round(v, 2) for v in b], "label": int(lb), "score": round(float(s), 4)}
                               for b, lb, s in zip(boxes.tolist(), box_labels.tolist(), det["scores"].tolist())]
        overlay = save_overlay(image, output / "overlays" / f"{_stem(path.name)}.png", mask, None, boxes,
                               box_labels, None, title)
        record["overlay"] = str(overlay.relative_to(output))
        records.append(record)
    result = {"checkpoint": str(checkpoint), "model": config.model["name"], "input_size": size, "images": records}
    output.mkdir(parents=True, exist_ok=True)
    (output / "predictions.json").write_text(json.dumps(result, indent=1))
    log(f"predicted {len(records)} image(s) into {output} (masks/, overlays/, predictions.json)")
    return result


def main(args) -> int:
    predict(args.checkpoint, args.input, args.output, args.score_threshold)
    return 0


def add_parser(commands) -> None:
    import argparse

    p = commands.add_parser("predict", help="masks, overlays, labels and boxes for image files",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="an image file or a folder of them")
    p.add_argument("--output", required=True, help="the folder the predictions go to")
    p.add_argument("--score-threshold", type=float, default=0.3, help="detections kept above this score")
    p.set_defaults(run=main)
