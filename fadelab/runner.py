"""The experiment runner: the grid's cells in this process, in local processes, or on Slurm.

What it offers:
    run_cells(config, out, shard, device)      this process's slice of the grid (fadelab run)
    run_local_jobs(config, out, jobs, device)  `jobs` processes side by side, sharing one queue of cells
    run_slurm(config, out, tasks, device)      a Slurm job array through submitit
    generate_images(prompts, seeds, ...)       PNGs and a grid for any family (fadelab generate)

What a cell does is fadelab/cells.py and fadelab/plan.py; the grid itself is fadelab/grid.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def _grid(images: np.ndarray, cols: int) -> Image.Image:
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return Image.fromarray(canvas)


def generate_images(prompts: list[str], seeds: list[int], *, family: str = "organism",
                    weights: str | None = None, out: Path, device: str = "cpu",
                    steps: int | None = None, guidance: float | None = None,
                    scale: float = 1.0) -> list[Path]:
    """One PNG per prompt x seed under `out`, plus grid.png; returns the paths (grid last)."""
    from models import load
    from models.organism.sample import generate

    kw = {"scale": scale, "device": device}
    if weights is not None:
        kw["weights"] = weights
    elif family != "organism":
        kw["weights"] = "hub"
    model = load(family, **kw)
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    images = generate(model.pipe, all_prompts, all_seeds, steps=steps, guidance_scale=guidance)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, p, s) in enumerate(zip(images, all_prompts, all_seeds)):
        path = out / f"{i:04d}_seed{s}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    (out / "prompts.json").write_text(json.dumps([{"file": q.name, "prompt": p, "seed": s}
                                                  for q, p, s in zip(paths, all_prompts, all_seeds)], indent=1))
    _grid(images, cols=len(seeds)).save(out / "grid.png")
    return paths + [out / "grid.png"]


# -- the grid: cells, shards, local processes, Slurm ----------------------------------------------

def _code_version(where: Path | None = None) -> str:
    """The checkout's commit, with "+modified" when tracked files differ from it (uncommitted
    edits, or a copy of a newer tree beside an older .git, as on the lent GPU machines, where
    session 21's stores named the session's first commit for code six commits later); "unknown"
    outside a git checkout."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=where or Path(__file__).parent, timeout=10)

    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        if not head:
            return "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no")
        return head + ("+modified" if changed.returncode == 0 and changed.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_cells(config: str | None, out: Path, *, shard: str | None = None, device: str = "cpu",
              progress: bool = True, smoke: bool | None = None, queue: str | None = None) -> dict:
    """Run this process's slice of the grid, cell by cell; finished cells are skipped.

    Each cell writes its own store, out/cells/<cell id>.h5, and marks it done last, so a cell
    that was killed is redone from its store's completed entries on the next run, and a cell
    that finished is never recomputed. The slice is `shard` ("i/n": every n-th cell), or, with
    `queue` (a folder that processes of one `run_local_jobs` call share), whichever cells this
    process claims first (`queued_cells`). Returns {"ran": [...], "skipped": [...], "seconds": ...}.
    """
    from fadelab import cells as cell_runner
    from fadelab.grid import cell_done, cell_path, cells, load_experiment, parse_shard
    from fadelab.grid import shard as take

    exp = load_experiment(config, smoke=smoke)
    i, n = parse_shard(shard)
    ran, skipped = [], []
    if queue is not None:
        skipped = [c.id for c in cells(exp) if _claim_text(Path(queue), c) == DONE_BEFORE]
        mine = queued_cells(cells(exp), out, Path(queue))
        label = "queue"
    else:
        mine = take(cells(exp), i, n)
        label = f"{i}/{n}"
    t0 = time.time()
    ctx = cell_runner.Context(exp, out, device=device, code_version=_code_version(), progress=progress)
    from tqdm.auto import tqdm

    bar = tqdm(mine, desc=f"cells {label}" if label != "0/1" else "cells", unit="cell", disable=not progress)
    for cell in bar:
        path = cell_path(out, cell)
        if cell_done(path, cell):
            if cell.id not in skipped:
                skipped.append(cell.id)
            continue
        bar.set_postfix_str(cell.id)
        log.info("cell %s (%s)", cell.id, cell.variant)
        cell_runner.run_cell(ctx, cell)
        ran.append(cell.id)
        if queue is not None:
            (Path(queue) / f"{cell.id}.done").touch()  # for the others and the parent's bar
    bar.close()
    summary = {"ran": ran, "skipped": skipped, "seconds": round(time.time() - t0, 1), "shard": label,
               "model_load_s": None if ctx.model_load_s is None else round(ctx.model_load_s, 1)}
    spawned = os.environ.get(SPAWNED_AT)
    if spawned:  # started by run_local_jobs: seconds from its Popen to this process's first cell
        summary["startup_s"] = round(t0 - float(spawned), 1)
    return summary


#: set by run_local_jobs in each child's environment: the parent's time.time() at its Popen
SPAWNED_AT = "FADELAB_SPAWNED_AT"


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat's start time against the boot
    clock, to 1/100 s); None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the whole line
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def startup_line(results: list[dict]) -> str | None:
    """One line on what the processes of run_local_jobs spent before their cells' work: start-up
    (interpreter, imports, the experiment; Popen to the first cell) and the model load inside the
    first cell, as min-max over the processes; None when no process reported them."""
    def span(key):
        vals = [r[key] for r in results if r.get(key) is not None]
        return f"{min(vals):.1f}-{max(vals):.1f} s" if vals else "-"

    if not any(r.get("startup_s") is not None for r in results):
        return None
    began = f"started {span('spawned_after_s')} after `fadelab run` began; " if any(
        r.get("spawned_after_s") is not None for r in results) else ""
    n = len(results)
    return (f"{n} process{'' if n == 1 else 'es'}: {began}start-up {span('startup_s')} before the first cell, "
            f"model load {span('model_load_s')} within it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(folder: Path, cell) -> bool:
    """Take `cell` for this process: create folder/<cell id> holding our pid; False when another
    process created it first (O_EXCL makes the creation atomic)."""
    try:
        fd = os.open(folder / cell.id, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


#: The claim that run_local_jobs writes for a cell already done when it starts.
DONE_BEFORE = "done"


def _claim_text(folder: Path, cell) -> str | None:
    try:
        return (folder / cell.id).read_text()
    except OSError:
        return None


def _claimer_alive(folder: Path, cell) -> bool:
    try:
        return _alive(int(_claim_text(folder, cell) or 0))
    except ValueError:
        return False


def queued_cells(all_cells: list, out: Path, folder: Path, poll_s: float = 2.0):
    """The cells this process claims, one at a time, from a queue `folder` that several local
    processes share: each takes the first cell in grid order that nobody has claimed, so long
    cells (the debias ones) do not pile up in one shard as with `shard`. An edit x fine-tune cell
    whose edit cell another live process is still running is passed over while other cells
    remain, then waited for (polling every poll_s seconds) rather than recomputed; if that process
    has died, it is run anyway and recomputes the edit (fadelab.cells.edit_of).

    Nothing here opens a cell's store: a reader's lock while a writer opens it would fail the
    writer (store.journal). run_local_jobs claims the cells done before it starts, and a process
    that finishes a cell leaves <cell id>.done beside its claim."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = {c.edit: c for c in all_cells if c.kind == "edit"}

    def blocked(cell) -> bool:
        dep = owner.get(cell.edit) if "edit" in cell.needs else None
        return (dep is not None and (folder / dep.id).exists() and not (folder / f"{dep.id}.done").exists()
                and _claim_text(folder, dep) != DONE_BEFORE and _claimer_alive(folder, dep))

    while True:
        left = [c for c in all_cells if not (folder / c.id).exists()]
        if not left:
            return
        ready = [c for c in left if not blocked(c)]
        if not ready:
            time.sleep(poll_s)
            continue
        if _claim(folder, ready[0]):
            yield ready[0]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def child_gpu(i: int, gpus: int, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES of local process i: round robin over the `gpus` GPUs this process
    sees, named as the parent names them (a parent limited to "2,3" gives "2", "3", "2", ...;
    an index alone would point a child at physical GPU 0)."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    ids = ids[:gpus] if len(ids) >= gpus else [str(k) for k in range(gpus)]
    return ids[i % gpus]


#: Processes per GPU that `auto_jobs` starts at most, and the GPU memory it counts per process: on
#: one H100 the main job's 8 processes peaked at 36 GB together (docs/measured/2026-12-05-h100-mainjob-jobs8.txt).
JOBS_PER_GPU, GIB_PER_JOB = 8, 6


def auto_jobs(device: str, family: str = "organism") -> int:
    """`--jobs auto`: 1 on the CPU (an organism step there is compute-bound); on CUDA one process
    per visible GPU for real families (SD1.4's full fine-tuning alone takes 25 GiB), and for the
    organism up to JOBS_PER_GPU processes per GPU, fewer where the GPU has under GIB_PER_JOB GiB
    per process or the machine under 2 CPU cores per process: one organism process leaves a GPU
    mostly idle (its steps are launch-bound), so several share each GPU."""
    import torch

    gpus = _cuda_count() if device.startswith("cuda") else 0
    if not gpus:
        return 1
    if family != "organism":
        return gpus
    cores = max(1, (os.cpu_count() or 1) // (2 * gpus))
    per = [min(JOBS_PER_GPU, cores, max(1, int(torch.cuda.get_device_properties(k).total_memory / 2**30 // GIB_PER_JOB)))
           for k in range(gpus)]
    return sum(per)


MPS_MODES = ("auto", "on", "off")
#: Where a system-wide MPS control daemon keeps its pipes when CUDA_MPS_PIPE_DIRECTORY is unset.
DEFAULT_MPS_PIPE = Path("/tmp/nvidia-mps")


@contextmanager
def mps_daemon(required: bool = False):
    """A private CUDA MPS control daemon for the duration of the block: yields the environment
    its clients need (CUDA_MPS_PIPE_DIRECTORY, CUDA_MPS_LOG_DIRECTORY), or None where none was
    started (no nvidia-cuda-mps-control on PATH, or it failed) and `required` is False. The
    daemon is stopped ("quit") on exit, also when the block raises.

    Without MPS, processes sharing a GPU take turns on it; under MPS their kernels run side by
    side. The organism's 9-cell throughput slice with 8 processes on one H100 took 96 s under MPS
    against 122 s without, run one after the other on one machine
    (docs/measured/2026-12-07-h100-ab-mps.txt). A daemon started with CUDA_VISIBLE_DEVICES set
    renumbers the GPUs it sees from 0 for its clients (NVIDIA's MPS documentation), which is
    why clients are given indices, not the parent's names (`run_local_jobs`). A daemon whose
    `fadelab run` was killed (SIGKILL leaves no time to quit it) is quit by the next one started
    (`_quit_orphans`)."""
    import shutil
    import subprocess
    import tempfile

    from models.errors import FadelabError

    binary = shutil.which("nvidia-cuda-mps-control")
    if binary is None:
        if required:
            raise FadelabError("--mps on: nvidia-cuda-mps-control is not on PATH; use --mps off or auto")
        log.info("CUDA MPS: nvidia-cuda-mps-control is not on PATH; processes take turns on the GPU")
        yield None
        return
    _quit_orphans(binary)
    # a short path: the daemon's pipes are Unix sockets, whose paths may not exceed ~100 bytes
    pipe = Path(tempfile.mkdtemp(prefix=MPS_PREFIX))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(pipe / "log")}
    (pipe / "log").mkdir()
    (pipe / "owner").write_text(str(os.getpid()))
    full = {**os.environ, **env}
    try:
        started = subprocess.run([binary, "-d"], env=full, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        started = subprocess.CompletedProcess([binary], 1, "", str(e))
    if started.returncode != 0:
        shutil.rmtree(pipe, ignore_errors=True)
        why = (started.stderr or started.stdout or "").strip().splitlines()
        msg = f"CUDA MPS: the control daemon did not start (exit {started.returncode}{': ' + why[-1] if why else ''})"
        if required:
            raise FadelabError(msg)
        log.warning("%s; processes take turns on the GPU", msg)
        yield None
        return
    log.info("CUDA MPS: control daemon started, pipes in %s", pipe)
    try:
        yield env
    finally:
        try:
            subprocess.run([binary], input="quit\n", env=full, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("CUDA MPS: quitting the control daemon failed (%s); it may still run "
                        "(`pkill -f nvidia-cuda-mps-control` ends it)", e)
        shutil.rmtree(pipe, ignore_errors=True)


MPS_PREFIX = "fadelab-mps-"  # mps_daemon's pipe folders in the temporary directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _quit_orphans(binary: str) -> None:
    """Quit the daemons of `mps_daemon` whose owner process is gone (killed before it could quit
    them; each holds its GPU's MPS server) and remove their folders. Folders of live owners, and
    those without an owner file, are left alone."""
    import shutil
    import subprocess
    import tempfile

    for pipe in Path(tempfile.gettempdir()).glob(f"{MPS_PREFIX}*"):
        try:
            owner = int((pipe / "owner").read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(pipe / "log")}
        try:
            subprocess.run([binary], input="quit\n", env=env, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("CUDA MPS: quitting the daemon left in %s failed (%s)", pipe, e)
            continue
        shutil.rmtree(pipe, ignore_errors=True)
        log.info("CUDA MPS: quit the daemon left in %s by process %d, which is gone", pipe, owner)


def use_mps(mode: str, jobs: int, gpus: int) -> bool:
    """Whether `run_local_jobs` starts an MPS daemon: `--mps on` always (on CUDA); auto where
    processes share a GPU and no MPS daemon of the user's own is in use (CUDA_MPS_PIPE_DIRECTORY
    set, or one at DEFAULT_MPS_PIPE): their clients' GPU numbering is theirs."""
    from models.errors import FadelabError

    if mode not in MPS_MODES:
        raise FadelabError(f"--mps {mode!r}: accepted are {', '.join(MPS_MODES)}")
    if mode == "on" and not gpus:
        raise FadelabError("--mps on: CUDA MPS needs --device cuda and a visible GPU")
    if not gpus or mode == "off":
        return False
    if mode == "on":
        return True
    return jobs > gpus and not _mps_daemon_in_env()


def _mps_daemon_in_env() -> bool:
    """Whether CUDA work of this process would reach an MPS daemon already: one named by
    CUDA_MPS_PIPE_DIRECTORY (ours, for run_local_jobs' children, or the user's) or a system-wide
    one at DEFAULT_MPS_PIPE."""
    return bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")) or (DEFAULT_MPS_PIPE / "control").exists()


def mps_client(device: str) -> bool:
    """Whether this process's CUDA work goes through an MPS daemon. Cells record it with their
    timings, which MPS changes (docs/measured/2026-12-07-h100-ab-mps.txt)."""
    return str(device).startswith("cuda") and _mps_daemon_in_env()


def run_local_jobs(config: str | None, out: Path, jobs: int, device: str,
                   smoke: bool | None = None, progress: bool = True, mps: str = "auto") -> list[dict]:
    """`jobs` processes side by side (one GPU each, round robin over the visible GPUs, when the
    device is CUDA; several may share one), each taking the next unclaimed cell from a queue
    folder under out/cells (`queued_cells`) until none is left. A failed process fails the call
    with its number named; the cells it finished stay done. `mps` ("auto", "on", "off"): run the
    processes as clients of a private CUDA MPS daemon (`use_mps`, `mps_daemon`). Starts no more
    processes than cells are left, and none when every cell is done."""
    from fadelab.grid import cell_done, cell_path, cells, load_experiment
    from models.errors import FadelabError

    if jobs < 1:
        raise FadelabError(f"--jobs {jobs}: give a positive number of processes")
    grid = cells(load_experiment(config, smoke=smoke))
    before = [c for c in grid if cell_done(cell_path(out, c), c)]  # before any writer starts
    # no more processes than cells left to run: each one starts CUDA and loads the model for nothing
    jobs = min(jobs, len(grid) - len(before))
    if jobs == 0:
        log.info("all %d cells are done in %s; no process started", len(grid), out)
        return []
    gpus = _cuda_count() if device.startswith("cuda") else 0
    if not use_mps(mode=mps, jobs=jobs, gpus=gpus):
        return _local_jobs(config, out, jobs, device, smoke, progress, gpus, None, grid, before)
    with mps_daemon(required=mps == "on") as mps_env:
        return _local_jobs(config, out, jobs, device, smoke, progress, gpus, mps_env, grid, before)


def _local_jobs(config, out, jobs, device, smoke, progress, gpus, mps_env, grid, before) -> list[dict]:
    import subprocess
    import sys

    from models.errors import FadelabError

    queue = Path(out) / "cells" / f".queue-{os.getpid()}-{time.time_ns()}"
    queue.mkdir(parents=True)
    for c in before:
        (queue / c.id).write_text(DONE_BEFORE)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    procs, spawned_after = [], []
    for i in range(jobs):
        env = dict(os.environ)
        if mps_env is not None:  # the daemon numbers the GPUs it sees from 0 for its clients
            env.update(mps_env)
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        elif gpus:
            env["CUDA_VISIBLE_DEVICES"] = child_gpu(i, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        env.setdefault("OMP_NUM_THREADS", threads)  # N processes, not N x all cores of threads
        env["TQDM_DISABLE"] = "1"  # the children run --quiet; the parent's bar counts their cells
        env[SPAWNED_AT] = repr(time.time())
        spawned_after.append(process_age())
        cmd = [sys.executable, "-m", "fadelab.cli", "run", *([config] if config else []),
               "--out", str(out), "--queue", str(queue), "--device", device, "--no-report",
               "--quiet", *(["--smoke"] if smoke else [])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    results, failed = [], []
    try:
        _watch(queue, len(grid), len(before), procs, progress)
        for i, p in enumerate(procs):
            stdout, _ = p.communicate()
            if p.returncode != 0:
                failed.append(f"{i}/{jobs} (exit {p.returncode})")
                continue
            summary = json.loads(stdout.strip().splitlines()[-1])
            if spawned_after[i] is not None:  # this (the parent) process's age at the Popen
                summary["spawned_after_s"] = round(spawned_after[i], 1)
            results.append(summary)
    finally:
        import shutil

        shutil.rmtree(queue, ignore_errors=True)
    if failed:
        raise FadelabError(f"process(es) {', '.join(failed)} failed; rerun `fadelab run` to redo "
                           f"their unfinished cells")
    return results


def _watch(queue: Path, total: int, before: int, procs: list, progress: bool, poll_s: float = 1.0) -> None:
    """Until every process has exited: a bar of the grid's done cells (the processes run --quiet),
    counted from the queue's .done marks, not by opening stores that processes are writing.
    Polled every second: the merge waits on the last exit (a 5 s poll cost the GPU main job up
    to 5 s, 2026-12-07)."""
    from tqdm.auto import tqdm

    done = lambda: before + len(list(queue.glob("*.done")))  # noqa: E731
    with tqdm(total=total, initial=done(), desc=f"cells ({len(procs)} processes)", unit="cell",
              disable=not progress) as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(poll_s)
            if progress:
                bar.update(done() - bar.n)
        bar.update(done() - bar.n)


def _slurm_task(config: str | None, out: str, shard: str, device: str, smoke: bool | None = None) -> dict:
    """One Slurm array task (module-level, so submitit can pickle it)."""
    return run_cells(config, Path(out), shard=shard, device=device, progress=False, smoke=smoke)


def run_slurm(config: str | None, out: Path, tasks: int, device: str, *, cluster: str | None = None,
              slurm: dict | None = None, smoke: bool | None = None) -> list[dict]:
    """Submit the grid as a Slurm job array of `tasks` shards through submitit and wait.

    `cluster=None` lets submitit pick (Slurm where sbatch exists); "local" runs the same array
    on this machine with submitit's local executor (how the tests exercise this path).
    `slurm` passes executor parameters such as {"slurm_partition": "gpu", "gpus_per_node": 1,
    "timeout_min": 240}. Logs go to out/submitit/.
    """
    import submitit

    from models.errors import FadelabError

    executor = submitit.AutoExecutor(folder=str(out / "submitit"), cluster=cluster)
    params = {"timeout_min": 240, **(slurm or {})}
    if executor.cluster == "slurm":
        params.setdefault("slurm_array_parallelism", tasks)
    executor.update_parameters(**params)
    shards = [f"{i}/{tasks}" for i in range(tasks)]
    jobs = executor.map_array(_slurm_task, [config] * tasks, [str(out)] * tasks, shards,
                              [device] * tasks, [smoke] * tasks)
    log.info("submitted %d array tasks to %s (first job id %s)", tasks, executor.cluster,
             jobs[0].job_id if jobs else "-")
    results, failed = [], []
    for shard_name, job in zip(shards, jobs):
        try:
            results.append(job.result())
        except Exception as e:  # noqa: BLE001 - submitit re-raises the task's failure of any type
            failed.append(f"{shard_name}: {str(e).splitlines()[-1] if str(e) else type(e).__name__}")
    if failed:
        raise FadelabError(f"array task(s) failed ({'; '.join(failed)}); logs in {out / 'submitit'}")
    return results
