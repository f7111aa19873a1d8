"""What every stage shares: the CLI, params loading, runtime setup, and file formats.

A stage is ``run(params, inputs, outputs) -> metrics`` plus ``main()``; dvc.yaml passes every path
(``--in name=path``, ``--out name=path``), so no path is written in code.

Image Parquet schema (one row per image):
    image        binary   PNG bytes (8-bit grey or RGB)
    label        int64    class index into the ``class_names`` metadata
    split        string   "train" or "test"
    source_index int64    position of the image in its source (provenance)
File metadata (``dpldm`` key, JSON): height, width, channels, class_names, source.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import yaml

from dpldm.config import ConfigError, RuntimeConfig, UserError, load_section


def parse_args(argv: list[str] | None, *, inputs: tuple[str, ...], outputs: tuple[str, ...],
               state: tuple[str, ...] = ()) -> argparse.Namespace:
    """``--in`` inputs and ``--out`` outputs are DVC deps and outs. ``--state`` folders hold a stage's
    resumable state (checkpoints, attempt records): not DVC outputs, so DVC neither deletes nor caches
    them, and a stage's outputs stay restorable from the run-cache or a remote (DVC restores no stage
    with a ``persist`` output). ``run`` gets them in its outputs dict."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--in", dest="inputs", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--out", dest="outputs", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--state", dest="state", action="append", default=[], metavar="NAME=PATH")
    ns = ap.parse_args(argv)

    def pairs(items, allowed, what):
        out = dict(item.split("=", 1) for item in items)
        missing, extra = set(allowed) - set(out), set(out) - set(allowed)
        if missing or extra:
            ap.error(f"{what}: missing {sorted(missing)}, unknown {sorted(extra)}; expected {list(allowed)}")
        return out

    ns.inputs = pairs(ns.inputs, inputs, "--in")
    ns.outputs = pairs(ns.outputs, outputs, "--out")
    ns.state = pairs(ns.state, state, "--state")
    return ns


def read_params(path: str | os.PathLike) -> dict:
    try:
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None


def stage_main(run: Callable[..., dict], *, inputs: tuple[str, ...], outputs: tuple[str, ...], state: tuple[str, ...] = (),
               argv=None) -> None:
    """Parse the CLI, run the stage, print its metrics. An expected user error (a bad param, a missing or
    unreadable input) exits 2 with one line that names the key or file and the fix: no traceback."""
    ns = parse_args(argv, inputs=inputs, outputs=outputs, state=state)
    try:
        metrics = run(read_params(ns.params), ns.inputs, {**ns.outputs, **ns.state})
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except FileNotFoundError as err:
        print(f"error: {err.strerror or err}: {err.filename} (an input of this stage; run the stages before it, "
              f"e.g. `dvc repro`)", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(metrics, indent=1, default=str))


# ----------------------------------------------------------------------------------------------
# Runtime


# glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_HEAP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the OS. By default glibc
    serves every block over its (dynamic, at most 32 MiB) mmap threshold with a fresh ``mmap`` and
    trims the heap's top after frees, so a loop that allocates the same large tensors again and again
    (a sampling batch, the autoencoder's decode) page-faults fresh zeroed memory on every pass. Here
    both thresholds are fixed at 1 GiB: only larger blocks get their own mapping, and the heap keeps
    what it freed for the next pass. Results are unchanged (only where memory comes from); the
    process's RSS stays at its peak until it exits, which suits one-shot stage processes (up to
    about 200 MiB more peak RSS measured). Stages ran 0.99-1.11x as fast as without, none slower
    beyond the noise, with 2-10x fewer page faults and the same output bytes
    (``benchmarks/malloc_ab.py``). ``DPLDM_MALLOC=default`` leaves glibc as it ships (``keep``, this
    setting, is the default); outside glibc nothing is changed. Returns whether the setting took."""
    import ctypes
    import platform

    mode = os.environ.get("DPLDM_MALLOC", "keep")
    if mode not in ("keep", "default"):
        raise ConfigError(f"environment: DPLDM_MALLOC = {mode!r}; use 'keep' (the stages' setting) or 'default' (glibc's own)")
    if mode == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_HEAP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_HEAP_BYTES))


def setup_runtime(params: dict, *, stage: str | None):
    """Parse the runtime section once: threads, global seeds, glibc's malloc (``keep_freed_memory``) and
    the device (``auto`` = CUDA when present). Returns (torch.device, the stage's seed from
    ``runtime.seeds``; 0 for stages without one)."""
    import torch

    rt: RuntimeConfig = load_section(params, "runtime")
    keep_freed_memory()
    seed = getattr(rt.seeds, stage) if stage else 0
    if rt.threads:
        torch.set_num_threads(rt.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if rt.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params: runtime.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if rt.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), seed
    return torch.device(rt.device), seed


def progress_enabled() -> bool:
    """Progress bars on, unless DPLDM_PROGRESS=0 (the flow and the tests set it)."""
    return os.environ.get("DPLDM_PROGRESS", "1") == "1"


def progress(iterable=None, **kwargs):
    """tqdm that stays quiet in non-interactive logs unless asked (DPLDM_PROGRESS=1)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 2.0)
    kwargs.setdefault("disable", None if progress_enabled() else True)
    return tqdm(iterable, **kwargs)


# ----------------------------------------------------------------------------------------------
# Files: always written to a temporary name first, then renamed (nothing half-written)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def file_sha(path: str | os.PathLike) -> str:
    """Short SHA-256 of a file's bytes (checkpoint run keys, attempt records)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Checkpoint:
    """A stage's resumable state in one file, keyed by everything that defines the run (``run_key``:
    params, input hashes, seed). ``load`` returns the state only when the key matches and the run had not
    completed; ``save`` writes atomically, so a crash never leaves half a checkpoint."""

    def __init__(self, path: str | os.PathLike, run_key: dict):
        self.path, self.run_key = Path(path), run_key

    def load(self) -> dict | None:
        import torch

        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("run_key") != self.run_key or state.get("completed"):
            return None
        return state

    def save(self, state: dict) -> None:
        import torch

        with atomic_path(self.path) as tmp:
            torch.save({**state, "run_key": self.run_key}, tmp)

    def mark_completed(self) -> None:
        """Keep only the key: a later run with the same key starts afresh (a new attempt)."""
        self.save({"completed": True})


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[..., None] if channels == 1 and arr.ndim == 2 else arr


UNKNOWN_RELEASE = {"dp_release": False, "release": "not a DP release: provenance unknown (no release stamp)"}


def release_stamp(meta: dict) -> dict:
    """The release stamp (``dp_release``, ``release``) a model or image file carries."""
    return {k: meta.get("release", UNKNOWN_RELEASE)[k] for k in ("dp_release", "release")}


def write_images(path, *, images: np.ndarray, labels: np.ndarray, split: list[str] | np.ndarray,
                 source_index: np.ndarray, class_names: list[str], source: str, release: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, h, w, c = images.shape
    table = pa.table({
        "image": pa.array([encode_png(im) for im in images], type=pa.binary()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "split": pa.array(list(split), type=pa.string()),
        "source_index": pa.array(np.asarray(source_index, dtype=np.int64)),
    })
    meta = {"height": h, "width": w, "channels": c, "class_names": class_names, "source": source,
            **({"release": release} if release is not None else {})}
    table = table.replace_schema_metadata({"dpldm": json.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_images(path, *, split: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 [N, H, W, C], int64 labels, metadata) of one split (or all rows)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"dpldm"])
    if split is not None:
        mask = np.asarray(table.column("split").to_pylist()) == split
        table = table.filter(mask)
    c = meta["channels"]
    raw = table.column("image").to_pylist()
    images = np.stack([decode_png(b, c) for b in raw]) if raw else np.zeros((0, meta["height"], meta["width"], c), np.uint8)
    return images, table.column("label").to_numpy().astype(np.int64), meta


def npz_rows(path, key: str) -> int:
    """Number of rows of one array in an .npz, from its header only (no private values read)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(fh)
    return int(shape[0])


def load_latents(path, split: str = "train"):
    """(latents, labels) of one split of an encode stage's .npz, as torch tensors (int64 labels)."""
    import torch  # not at the top: the image stages import this module without needing torch

    data = np.load(path)
    return torch.from_numpy(data[f"{split}_latents"]), torch.from_numpy(data[f"{split}_labels"]).long()


def save_npz(path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def save_model(folder, *, state_dict: dict, config: dict, extra: dict | None = None, tensors: dict | None = None) -> None:
    """state_dict (tensors only) + config JSON; no pickled code. ``tensors``: more tensor files by name
    (e.g. ``{"adapter.pt": ...}``)."""
    import torch

    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state_dict, tmp / "model.pt")
        for name, obj in (tensors or {}).items():
            torch.save(obj, tmp / name)
        (tmp / "config.json").write_text(json.dumps({**config, **(extra or {})}, indent=2) + "\n")


def load_model_files(folder, *, generator: bool = False) -> tuple[dict, dict]:
    """(state_dict, config) of a saved model. ``generator=True`` (the AE and LDM loaders) refuses a model
    marked ``evaluation_only``: one trained on private data without DP, for scoring only."""
    import torch

    folder = Path(folder)
    conf = json.loads((folder / "config.json").read_text())
    if generator and conf.get("evaluation_only"):
        raise ConfigError(f"{folder} is an evaluation-only model (trained on private data without DP, dp: false); "
                          f"it cannot be used to generate or encode. Point this stage at a generator model.")
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=True), conf


def image_grid(images: np.ndarray, labels: np.ndarray, *, per_class: int = 10, num_classes: int | None = None) -> np.ndarray:
    """One row per class, ``per_class`` images each; uint8 [rows*H, cols*W, C]."""
    num_classes = num_classes or int(labels.max()) + 1
    n, h, w, c = images.shape
    grid = np.zeros((num_classes * (h + 2), per_class * (w + 2), c), np.uint8)
    for k in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == k)[:per_class]):
            grid[k * (h + 2) + 1:k * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = images[i]
    return grid


def save_png(path, array: np.ndarray, *, scale: int = 2, banner: str = "") -> None:
    """An image grid as PNG, optionally with a one-line text banner above it (e.g. "NOT A DP RELEASE")."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    if banner:
        framed = Image.new(img.mode, (img.width, img.height + 16), 255)
        framed.paste(img, (0, 16))
        ImageDraw.Draw(framed).text((2, 2), banner, fill=0)
        img = framed
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


@contextlib.contextmanager
def live(folder):
    """A DVCLive logger for one stage (its own directory; dvc.yaml declares its metrics and plots)."""
    from dvclive import Live

    if Path(folder).exists():
        shutil.rmtree(folder)
    with Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None) as lv:
        yield lv


def log_live_metrics(folder, metrics: dict) -> None:
    """A stage's scalar metrics (numbers and strings) into its DVCLive directory, in one go."""
    with live(folder) as lv:
        for key, value in metrics.items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                lv.log_metric(key, value, plot=False)
