"""Files a user would miss survive a SIGKILL at any moment: the final name holds the complete old or the
complete new version, temporaries live beside the target (never in `$TMPDIR`), and the next start removes
the ones a kill left.

The kill tests run a writer process that saves again and again (forked from a `forkserver` that imported
torch and piip once, so each kill costs a fork, not an interpreter start) with `TMPDIR` on a tmpfs
(/dev/shm) while the target is on the normal disk, kill it with SIGKILL after a random delay, and read the
target back with `torch.load(weights_only=True)`. The checkpoint IO is the one `build_trainer` gives a
Trainer, so the test covers what training uses. A bigger grid runs under `-m slow`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from piip.data import files
from piip.data.synthetic import imagenet as synthetic_imagenet
from piip.run import build

SHM = Path("/dev/shm")
needs_shm = pytest.mark.skipif(os.name != "posix" or not SHM.is_dir(), reason="needs a tmpfs at /dev/shm")


def trainer_config(root: Path) -> DictConfig:
    """The smallest run config `build_trainer` accepts."""
    trainer = {
        "_target_": "lightning.pytorch.Trainer",
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return OmegaConf.create({"trainer": trainer})


def checkpoint_io(root: Path) -> Any:
    """The CheckpointIO a Trainer built by the run layer writes single-file checkpoints through."""
    return build.build_trainer(trainer_config(root), [], []).strategy.checkpoint_io


def next_start(run_dir: Path, checkpoints: Path) -> None:
    """What the next run does first: build its trainer, with a ModelCheckpoint writing to `checkpoints`."""
    build.build_trainer(trainer_config(run_dir), [ModelCheckpoint(dirpath=checkpoints)], [])


def fake_checkpoint(version: int, numel: int) -> dict[str, Any]:
    return {"state_dict": {"w": torch.full((numel,), float(version))}, "version": version}


def read_version(path: Path, numel: int) -> int:
    """The version of a complete checkpoint; fails on a truncated or mixed one."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    weights = saved["state_dict"]["w"]
    assert weights.numel() == numel and bool((weights == saved["version"]).all()), path
    return saved["version"]


def use_tmpdir(tmpdir: str) -> None:
    os.environ["TMPDIR"] = tmpdir
    tempfile.tempdir = tmpdir  # tempfile caches its folder; fsspec's mkstemp reads it


# -- the writer processes (run in the forkserver's children) ----------------------------------------------
def save_file_forever(io: Any, target: str, tmpdir: str, numel: int, first: int, started: Any) -> None:
    use_tmpdir(tmpdir)
    version = first
    while True:
        version += 1
        checkpoint = fake_checkpoint(version, numel)
        started.value = version
        io.save_checkpoint(checkpoint, target)


SHARDS = 4


def save_folder_forever(target: str, tmpdir: str, numel: int, first: int, started: Any) -> None:
    """As `FSDP2Strategy.save_checkpoint` does: shards + meta.pt into a sibling temp folder, fsync, swap."""
    use_tmpdir(tmpdir)
    final, version = Path(target), first
    while True:
        version += 1
        started.value = version
        temp = files.temp_sibling(final)
        temp.mkdir()
        for rank in range(SHARDS):
            torch.save(torch.full((numel,), float(version)), temp / f"__{rank}_0.distcp")
        torch.save({"version": version}, temp / "meta.pt")
        files.fsync_tree(temp)
        files.replace_folder(temp, final)


def read_folder_version(folder: Path, numel: int) -> int:
    version = torch.load(folder / "meta.pt", weights_only=True)["version"]
    shards = sorted(folder.glob("*.distcp"))
    assert len(shards) == SHARDS, f"{folder}: {len(shards)} of {SHARDS} shards"
    for shard in shards:
        tensor = torch.load(shard, weights_only=True)
        assert tensor.numel() == numel and bool((tensor == version).all()), shard
    return version


@pytest.fixture(scope="module")
def forkserver() -> mp.context.BaseContext:
    context = mp.get_context("forkserver")
    # what this module imports (Python 3.11's forkserver ignores the parent's sys.path, so not this module
    # itself: pytest imports it from tests/; the server finds packages from the working directory)
    context.set_forkserver_preload(
        ["pytest", "torch", "lightning.pytorch", "piip.run.build", "piip.data.files"]
    )
    return context


@pytest.fixture
def shm_tmpdir() -> Path:
    folder = Path(tempfile.mkdtemp(dir=SHM, prefix="piip-test-tmpdir-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def kill_after(process: mp.process.BaseProcess, started: Any, first: int, delay: float) -> None:
    """SIGKILL `process` `delay` seconds after it started its first save."""
    process.start()
    deadline = time.monotonic() + 60
    while started.value <= first and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert process.is_alive(), f"the writer died on its own (exit code {process.exitcode})"
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL


def stray(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def file_kill_grid(context, tmp_path: Path, tmpdir: Path, kills: int, megabytes: int, seed: int) -> Counter:
    """Kill a writer of `last.ckpt` `kills` times, then start again; returns where the kills landed."""
    run_dir, numel = tmp_path / "run", megabytes * 2**20 // 4
    folder = run_dir / "checkpoints"
    target = folder / "last.ckpt"
    io = checkpoint_io(run_dir)
    began = time.monotonic()
    io.save_checkpoint(fake_checkpoint(0, numel), target)  # the previous good checkpoint
    duration, full_size = time.monotonic() - began, target.stat().st_size
    rng, landed, version = random.Random(seed), Counter(), 0
    for _ in range(kills):
        started = context.Value("q", version)
        process = context.Process(
            target=save_file_forever, args=(io, str(target), str(tmpdir), numel, version, started)
        )
        before = set(stray(folder))
        kill_after(process, started, version, rng.uniform(0.0, 2.5 * duration))
        found = read_version(target, numel)  # complete, or this raises
        assert list(tmpdir.iterdir()) == [], "a checkpoint write went through $TMPDIR"
        assert found in (started.value - 1, started.value), (found, started.value)
        left = [p for p in stray(folder) if p not in before]
        if left and left[0].stat().st_size < full_size:
            landed["while writing the temp file"] += 1
        elif left:
            landed["temp file complete, before the rename"] += 1
        elif found == started.value:
            landed["after the rename"] += 1
        else:
            landed["before the temp file existed"] += 1
        landed[f"target holds {'the old' if found == version else 'a new'} version"] += 1
        version = found
    landed["temp files left by the kills"] = len(stray(folder))
    (folder / "notes.txt").write_text("not ours: stays")
    next_start(run_dir, folder)
    assert stray(folder) == [], "the next start left temporaries"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "notes.txt"]
    assert read_version(target, numel) == version
    return landed


@needs_shm
def test_a_killed_checkpoint_write_leaves_the_old_or_the_new_file_and_the_next_start_cleans_up(
    tmp_path, forkserver, shm_tmpdir
):
    landed = file_kill_grid(forkserver, tmp_path, shm_tmpdir, kills=20, megabytes=8, seed=0)
    assert landed["while writing the temp file"] >= 1, landed  # the dangerous moment was hit
    print(dict(landed))


@needs_shm
def test_a_killed_sharded_folder_swap_leaves_a_complete_folder(tmp_path, forkserver, shm_tmpdir):
    run_dir, numel = tmp_path / "run", 2**18
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    final = folder / "last.ckpt"
    began = time.monotonic()
    temp = files.temp_sibling(final)
    temp.mkdir()
    for rank in range(SHARDS):
        torch.save(torch.zeros(numel), temp / f"__{rank}_0.distcp")
    torch.save({"version": 0}, temp / "meta.pt")
    files.fsync_tree(temp)
    files.replace_folder(temp, final)
    duration, rng, version, landed = time.monotonic() - began, random.Random(1), 0, Counter()
    for _ in range(12):
        started = forkserver.Value("q", version)
        process = forkserver.Process(
            target=save_folder_forever, args=(str(final), str(shm_tmpdir), numel, version, started)
        )
        kill_after(process, started, version, rng.uniform(0.0, 3.0 * duration))
        found = read_folder_version(final, numel)  # complete, or this raises
        landed["temp folder left" if stray(folder) else "no temp"] += 1
        landed[f"final holds {'the old' if found == version else 'a new'} version"] += 1
        assert found in (started.value - 1, started.value)
        version = found
    next_start(run_dir, folder)
    assert stray(folder) == [] and [p.name for p in folder.iterdir()] == ["last.ckpt"]
    print(dict(landed))


def test_an_interrupted_two_rename_swap_is_undone_at_the_next_start(tmp_path):
    """Where the filesystem cannot exchange two folders, a kill between the two renames leaves the old
    folder as `.<name>.<hex>.old` and nothing under the final name: the next start puts it back."""
    folder = tmp_path / "checkpoints"
    old = folder / ".last.ckpt.0123abcd.old"
    old.mkdir(parents=True)
    (old / "meta.pt").write_bytes(b"old")
    newer = folder / ".last.ckpt.4567cdef.tmp"
    newer.mkdir()
    next_start(tmp_path, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert (folder / "last.ckpt" / "meta.pt").read_bytes() == b"old"


def test_folder_swap_without_an_exchange_keeps_the_final_name_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = tmp_path / "last.ckpt"
    for version in ("one", "two"):
        temp = files.temp_sibling(final)
        temp.mkdir()
        (temp / "meta.pt").write_text(version)
        files.replace_folder(temp, final)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert (final / "meta.pt").read_text() == "two"


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = files.write_json(tmp_path / "results.json", {"score": 1})
    with pytest.raises(TypeError):
        files.write_json(path, {"score": object()})  # not JSON: fails half-way through dumping
    assert path.read_text() == '{\n  "score": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())  # not mkstemp's private 0600


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_killed_data_generation_leaves_no_root_and_the_next_one_removes_its_temp(tmp_path, forkserver):
    root = tmp_path / "shapes"
    process = forkserver.Process(target=generate_until_stuck, args=(str(root),))
    process.start()
    deadline = time.monotonic() + 60
    while not stray(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".shapes.tmp-")]
    assert len(left) == 1 and not root.exists()
    synthetic_imagenet.ensure_imagenet_layout(root, **SMALL_DATA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


SMALL_DATA = dict(train_per_class=2, val_per_class=1, image_size=32, seed=0)


def generate_until_stuck(root: str) -> None:
    """Generates the data, hanging after a few images (to be killed there)."""
    real, drawn = synthetic_imagenet.render_image, []

    def render(scene: Any) -> Any:
        drawn.append(scene)
        if len(drawn) > 3:
            time.sleep(3600)
        return real(scene)

    synthetic_imagenet.render_image = render
    synthetic_imagenet.ensure_imagenet_layout(Path(root), **SMALL_DATA)


@pytest.mark.slow
@needs_shm
def test_many_kills_during_large_checkpoint_writes(tmp_path, forkserver, shm_tmpdir):
    landed = file_kill_grid(forkserver, tmp_path, shm_tmpdir, kills=200, megabytes=64, seed=7)
    assert landed["while writing the temp file"] >= 20, landed
    assert min(landed["target holds a new version"], landed["target holds the old version"]) >= 20, landed
    print(dict(landed))
