"""Benchmark: how fast the recorder streams SD1.4 text-encoder activations into a store file.

`record_throughput(device, n_prompts=1000, path=...)` builds the SD1.4 text encoder with random
weights (CLIP ViT-L/14 text tower: hidden 768, 12 layers, 12 heads, MLP 3072, vocab 49408,
77 positions, quick_gelu), records the input of all 12 MLP ``fc2`` layers (77 x 3072 per
prompt and layer, ReFACT's key space) for `n_prompts` random prompts into the store at `path`,
and measures the disk's sequential write speed in the same run (a dd-like write of
`disk_probe_gib` GiB in 64 MiB blocks followed by fsync, in the same directory). The recording
is timed from the first forward pass to the fsync after the store is closed, so both numbers
include getting the bytes onto the disk.

Not a test: it writes gigabytes (1,000 prompts is 10.9 GiB in float32, 5.4 GiB in float16).
The issue's target is ``ratio >= 0.5`` on the GPU machine.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

log = logging.getLogger(__name__)

SD14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                 hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=49407)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a closed file's bytes to the disk (so a timing includes getting them there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_write_speed(directory: str, gib: float = 2.0, block_mib: int = 64) -> float:
    """Sequential write speed of the disk under `directory` in bytes/s (write + fsync)."""
    path = os.path.join(directory, f".fadelab_disk_probe_{os.getpid()}")
    block = np.random.default_rng(0).integers(0, 256, block_mib << 20, dtype=np.uint8).tobytes()
    n = max(1, int(gib * 1024 / block_mib))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, block)
        os.fsync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.remove(path)
    return n * len(block) / seconds


def store_write_speed(directory: str, gib: float = 2.0, batch: int = 50) -> float:
    """Bytes/s the store alone sustains streaming float16 (77, 3072) rows (no model), with fsync.

    Tells the store's own overhead apart from the forward passes in `record_throughput`.
    """
    from store.store import Store

    path = os.path.join(directory, f".fadelab_store_probe_{os.getpid()}.h5")
    row = np.random.default_rng(0).standard_normal((batch, 77, 3072)).astype(np.float16)
    n = max(1, int(gib * (1 << 30) / row.nbytes))
    try:
        t0 = time.perf_counter()
        with Store.open(path, "a") as st:
            w = st.open_activations("M", "probe", (n * batch, 77, 3072), "float16",
                                    ("prompt", "token", "neuron"))
            for _ in range(n):
                w.write(row)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        seconds = time.perf_counter() - t0
    finally:
        if os.path.exists(path):
            os.remove(path)
    return n * row.nbytes / seconds


def record_throughput(device: str = "cuda", n_prompts: int = 1000, path: str = "bench_store.h5",
                      batch_size: int = 50, store_dtype: str = "float16",
                      disk_probe_gib: float = 2.0, compression: str | None = None,
                      keep_file: bool = False) -> dict:
    """Record 12 fc2 inputs of a random-weight SD1.4 text encoder into a store; time it.

    Returns a dict: device, n_prompts, store_dtype, payload_bytes (the activations' bytes),
    file_bytes, record_seconds, forward_seconds (forward passes alone, measured first),
    write_bytes_per_s (payload / record_seconds), disk_bytes_per_s, ratio (the two divided),
    file_overhead (file_bytes / payload_bytes), store_only_bytes_per_s and store_only_ratio
    (`store_write_speed`: the store streaming synthetic rows, no model, against the same disk).
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from store.recorder import Recorder
    from store.store import Store

    if os.path.exists(path):
        from store.errors import StoreError
        raise StoreError(f"{path} exists; the benchmark writes a fresh store (remove it first)")
    dtype = getattr(torch, store_dtype)
    model_dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**SD14_TEXT)).to(device=device, dtype=model_dtype).eval()
    tower = getattr(model, "text_model", model)  # transformers < 5 wraps the tower
    sites = {f"text.mlp.{i}.fc2": layer.mlp.fc2 for i, layer in enumerate(tower.encoder.layers)}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (n_prompts, 77), generator=gen)
    prompts = [f"random prompt {i}" for i in range(n_prompts)]

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():  # forward passes alone (and warm-up)
        sync()
        t0 = time.perf_counter()
        for s in range(0, n_prompts, batch_size):
            model(ids[s:s + batch_size].to(device))
        sync()
        forward_seconds = time.perf_counter() - t0

    directory = os.path.dirname(os.path.abspath(path))
    disk = disk_write_speed(directory, disk_probe_gib)
    store_only = store_write_speed(directory, disk_probe_gib)
    t0 = time.perf_counter()
    with Store.open(path, "a", config=f"benchmark n_prompts={n_prompts}") as st, torch.no_grad():
        with Recorder(sites, what="input", dtype=dtype, store=st, variant="M",
                      n_prompts=n_prompts, coords={"prompt": prompts},
                      compression=compression) as rec:
            for s in range(rec.start_row, n_prompts, batch_size):
                model(ids[s:s + batch_size].to(device))
    fsync_path(path)
    record_seconds = time.perf_counter() - t0

    payload = n_prompts * len(sites) * 77 * 3072 * torch.tensor([], dtype=dtype).element_size()
    file_bytes = os.path.getsize(path)
    if not keep_file:
        os.remove(path)
    out = {"device": str(device), "n_prompts": n_prompts, "store_dtype": store_dtype,
           "payload_bytes": payload, "file_bytes": file_bytes,
           "record_seconds": record_seconds, "forward_seconds": forward_seconds,
           "write_bytes_per_s": payload / record_seconds, "disk_bytes_per_s": disk,
           "ratio": payload / record_seconds / disk, "file_overhead": file_bytes / payload,
           "store_only_bytes_per_s": store_only, "store_only_ratio": store_only / disk}
    log.info("record_throughput: %s", out)
    return out
