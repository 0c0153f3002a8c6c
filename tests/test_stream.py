"""Streaming and several processes (issue 14): row I/O, the memory budget, streamed == in memory, DDP on gloo,
a dead rank, a full disk. Real code paths on tiny data; the subprocess tests run the real CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unpoison.data import load_dataset, make_synthetic, save_dataset
from unpoison.data.rows import NpyWriter, RowReader, file_backing, save_rows
from unpoison.defenses.dvae import DVAEPurifier
from unpoison.errors import UserError
from unpoison.stream import (
    ResidentSource,
    StreamedSource,
    make_source,
    memory_budget,
    shard_batches,
    shard_ranges,
)
from unpoison.train import TrainConfig, train_classifier

SRC = str(Path(__file__).resolve().parents[1] / "src")
# One thread: "bit-identical" holds for one CPU thread; with several, oneDNN's reductions differ between the
# streamed and resident batch layouts in the last bits (measured: equal at one thread, p_hat off by one float16
# step on 2 % of values at two).
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"preset": "cpu", "width": 8, "latent": 8, "epochs": 2, "batch_size": 20, "device": "cpu",
        "progress": False, "seed": 1}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _npy_folder(tmp_path: Path, n: int = 96, size: int = 16, name: str = "in") -> Path:
    save_dataset(make_synthetic(n=n, size=size, channels=3, classes=4, seed=0), tmp_path / name, "npy")
    return tmp_path / name


# --- row I/O ----------------------------------------------------------------------------------------------
def test_rows_read_gather_and_write_match_numpy(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (300, 5, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", x)
    m = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert file_backing(m[7:]) == (str(tmp_path / "a.npy"), file_backing(m)[1] + 7 * 60)  # type: ignore[index]
    assert file_backing(m[:, :2]) is None and file_backing(x) is None  # not contiguous rows / not a file
    idx = np.random.default_rng(1).permutation(293)[:120]
    idx[5] = idx[6]  # duplicates allowed
    for arr, from_file in ((m[7:], True), (x[7:], False)):  # from the file (pread) and from memory
        with RowReader(arr) as r:
            assert r.from_file is from_file
            assert np.array_equal(r.gather(idx), x[7:][idx])
            assert np.array_equal(r.read(5, 100), x[12:107])
            with pytest.raises(IndexError):
                r.gather(np.array([293]))
    # two writers (two ranks) fill disjoint rows of one file
    w0 = NpyWriter.create(tmp_path / "b.npy", x.shape, np.uint8)
    w1 = NpyWriter.open(tmp_path / "b.npy")
    w1.write(150, x[150:])
    w0.write(0, x[:150])
    for w in (w0, w1):
        w.flush()
        w.close()
    assert np.array_equal(np.load(tmp_path / "b.npy"), x)
    save_rows(m, tmp_path / "c.npy", chunk_bytes=1000)
    assert np.array_equal(np.load(tmp_path / "c.npy"), x)
    with pytest.raises(FileExistsError):  # never written over
        NpyWriter.create(tmp_path / "c.npy", x.shape, np.uint8)


def test_sources_give_the_same_batches_and_shards_cover_everything(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (101, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    m = np.load(tmp_path / "x.npy", mmap_mode="r")
    res, st = ResidentSource.from_numpy(m, torch.device("cpu")), StreamedSource(m, torch.device("cpu"), prefetch=2)
    perm = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    a = [(i.clone(), b) for i, b in res.batches(list(perm.split(16)))]
    b = [(i.clone(), b) for i, b in st.batches(list(perm.split(16)))]
    assert len(a) == len(b) == 7
    for (ia, xa), (ib, xb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb) and xa.is_contiguous() and xb.is_contiguous()
        assert torch.equal(xa, torch.from_numpy(x[ia.numpy()]).permute(0, 3, 1, 2))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(res.ranges(shard_ranges(101, 30)),
                                                             st.ranges(shard_ranges(101, 30))))
    it = st.batches(list(perm.split(4)))
    next(it)
    it.close()  # leaving early stops the prefetch thread
    st.close()
    # shards: every global batch split across ranks; whole inference batches dealt to ranks
    got = torch.cat([torch.cat(shard_batches(perm, 16, r, 3)) for r in range(3)]).sort().values
    assert torch.equal(got, torch.arange(101))
    ranges = [shard_ranges(101, 30, r, 2) for r in range(2)]
    assert ranges[0] + ranges[1] == shard_ranges(101, 30) and ranges[0] == [(0, 30), (30, 60)]


def test_budget_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memory_budget("2G") == 2 << 30 and memory_budget("512M") == 512 << 20 and memory_budget("1.5GiB") == 3 << 29
    assert memory_budget(4096) == 4096
    for bad in ("lots", "-1G", "2X"):
        with pytest.raises(UserError, match="--memory-budget"):
            memory_budget(bad)
    assert memory_budget(None) > 0
    monkeypatch.setenv("UNPOISON_MAX_MEMORY", "1M")
    assert 0 < memory_budget(None) <= 1 << 20  # the load cap also caps the default budget


# --- streamed == in memory --------------------------------------------------------------------------------
def test_streamed_purification_equals_in_memory(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    ds = load_dataset(_npy_folder(tmp_path), mmap=True)
    assert isinstance(ds.x_train, np.memmap)
    mem = DVAEPurifier(**TINY, stream=False)
    a = mem.fit_purify(np.array(ds.x_train), ds.y_train)
    st = DVAEPurifier(**TINY, stream=True)
    b = st.fit_purify(ds.x_train, ds.y_train)
    assert mem.plan_["streamed"] is False and st.plan_["streamed"] is True
    assert isinstance(b, np.memmap) and not isinstance(a, np.memmap)  # the streamed result is a file
    assert np.array_equal(a, b) and np.array_equal(mem.extras_["p_hat"], st.extras_["p_hat"])
    assert mem.info_["psnr_db"] == st.info_["psnr_db"]
    losses = [[(h["loss"], h["kld"]) for h in p.history_["stage2"]] for p in (mem, st)]
    assert losses[0] == losses[1]
    assert all(v.shape[0] == 8 for v in st.stages_.values())  # only the grid's rows are kept in memory
    st.close()
    assert not Path(b.filename).exists()  # type: ignore[arg-type]
    # the CLI: a budget below the data streams, a large one does not; same bytes either way
    common = ["--method", "dvae", "--preset", "cpu", "--width", "8", "--latent", "8", "--epochs", "1",
              "--batch-size", "32", "--device", "cpu", "--quiet", "--seed", "2"]
    outs = {}
    for name, budget in (("small", "1k"), ("large", "64G")):
        rc, out, err = run_cli("purify", tmp_path / "in", tmp_path / name, *common, "--memory-budget", budget)
        assert rc == 0, err
        man = json.loads((tmp_path / f"{name}.report" / "manifest.json").read_text())
        assert man["stats"]["stream"]["streamed"] is (budget == "1k")
        assert ("streaming from disk" in out) is (budget == "1k")
        outs[name] = load_dataset(tmp_path / name).x_train
        assert not list((tmp_path / f"{name}.report" / "checkpoints").glob("purified.npy"))  # work files removed
    assert np.array_equal(outs["small"], outs["large"])
    rc, _, err = run_cli("purify", tmp_path / "in", tmp_path / "j", "--method", "jpeg", "--memory-budget", "1k")
    assert rc == 2 and "--memory-budget applies to" in err


def test_streamed_scoring_protocol_equals_in_memory(tmp_path: Path) -> None:
    ds = load_dataset(_npy_folder(tmp_path, n=128), mmap=True)
    cfg = TrainConfig.preset("smoke", epochs=2)
    a = train_classifier(ds.replace(x_train=np.array(ds.x_train), x_test=np.array(ds.x_test)), None, cfg, 1, "cpu",
                         progress=False)
    b = train_classifier(ds, None, cfg, 1, "cpu", progress=False, memory_budget="1k")
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert (a.final_acc, a.per_class_acc) == (b.final_acc, b.per_class_acc)


_BOUNDED = r"""
import sys, numpy as np, torch
from unpoison.data import load_dataset
from unpoison.data.fingerprint import content_fingerprint
from unpoison.stream import make_source

def peak():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, from before exec)
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

ds = load_dataset(sys.argv[1], mmap=True)
x = ds.x_train
for budget in (16 << 20, 1 << 40):  # streamed first, then resident (whose peak the measurement must see)
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak here
    before = peak()
    src = make_source(x, torch.device("cpu"), budget=budget)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    total = 0
    for idx, xb in src.batches(list(perm.split(64))):
        total += int(xb[:, 0, 0, 0].sum())
    content_fingerprint(x, ds.y_train)
    print(type(src).__name__, x.nbytes, peak() - before, total == int(x[:, 0, 0, 0].astype(np.int64).sum()))
    src.close()
    del src
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak RSS through /proc (Linux)")
def test_memory_budget_streams_a_split_that_would_not_fit_and_memory_stays_bounded(tmp_path: Path) -> None:
    """96 MiB of images, a 16 MiB budget: the split streams, and one shuffled epoch plus its content
    fingerprint raise the peak RSS by a few batches, not by the split. With a budget it fits, the same
    script holds the split (the measurement can see it)."""
    d = tmp_path / "big"
    d.mkdir()
    n, shape = 2048, (128, 128, 3)  # 96 MiB
    w = NpyWriter.create(d / "x_train.npy", (n, *shape), np.uint8)
    rng = np.random.default_rng(0)
    for i in range(0, n, 512):
        w.write(i, rng.integers(0, 256, (min(512, n - i), *shape), dtype=np.uint8))
    w.close()
    np.save(d / "y_train.npy", np.arange(n) % 4)
    r = subprocess.run([sys.executable, "-c", _BOUNDED, str(d)], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    grew = {}
    for line in r.stdout.splitlines():
        kind, nbytes, grown, ok = line.split()
        assert ok == "True" and int(nbytes) == n * 128 * 128 * 3
        grew[kind] = int(grown)
    # 80 MiB: well below the 96 MiB split that a whole load adds. Measured growth: below 48 MiB on a quiet
    # machine, 57 MiB once with the suite sharing 2 cores with four other jobs (more batches alive at once).
    assert grew["StreamedSource"] < 80 << 20, f"peak RSS grew by {grew['StreamedSource'] >> 20} MiB streaming 96 MiB"
    assert grew["ResidentSource"] > 96 << 20  # loaded whole, the split is in the peak


# --- a full disk ----------------------------------------------------------------------------------------
_LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); "
            "from unpoison.cli import main; sys.exit(main(sys.argv[1:]))")


def test_streamed_output_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Files are capped at 400 KiB (RLIMIT_FSIZE): the checkpoints fit, the 768 KiB stage images do not. The
    writer reserves the whole file first, so this fails at once with one line, and OUT never appears."""
    src = _npy_folder(tmp_path, n=256, size=32)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _LIMITED.format(400 << 10), "purify", str(src), str(out), "--method",
                        "dvae", "--preset", "cpu", "--width", "4", "--width1", "4", "--latent", "4", "--epochs", "1",
                        "--width-rule", "fixed",  # widths as given on these RGB images: the checkpoints fit
                        "--device", "cpu", "--quiet", "--memory-budget", "1k"], env=_env(), capture_output=True,
                       text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "stage1_images.npy" in lines[0] and "full" in lines[0]
    assert not out.exists()
    ck = tmp_path / "out.report" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.suffix == ".npy" or ".tmp" in p.name) == []


# --- several processes ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stage_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a tiny D-VAE stage (n=128, global batch 32): its loss curve and a checksum of its weights."""
    from unpoison import distributed
    from unpoison.checkpoints import CheckpointStore
    from unpoison.defenses.dvae import DVAEConfig, train_autoencoder
    from unpoison.models.dvae import DVAE, dvae_loss

    ctx, dev = distributed.SINGLE, torch.device("cpu")
    if world > 1:  # a spawned rank (the one-process run stays in pytest's process, whose environment stays clean)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        ctx, dev = distributed.init("cpu", 120)
    ds = make_synthetic(n=128, size=16, channels=3, classes=4, seed=0)
    cfg = DVAEConfig.preset("cpu", width=8, latent=8, epochs=3, batch_size=32)
    torch.manual_seed(5)
    model = DVAE(3, (16, 16), 4, 8, 8, 2)
    hist = train_autoencoder(model, dvae_loss, make_source(ds.x_train, dev, stream=world > 1),
                             torch.as_tensor(ds.y_train), cfg, 1.0, "s", 3, CheckpointStore(None, "x", {}, False),
                             False, None, dist=ctx)
    weights = float(sum(p.detach().double().sum() for p in model.parameters()))
    Path(f"{out}.{rank}").write_text(json.dumps({"loss": [h["loss"] for h in hist], "weights": weights}))
    distributed.shutdown(ctx)


def test_two_gloo_processes_train_a_stage_like_one(tmp_path: Path) -> None:
    """Same global batch: the 2-process loss curve stays within 5% of the 1-process one (measured: <= 2%,
    docs/results/stream_scale.md; the gap is BatchNorm statistics over half batches and other latent samples),
    and both ranks end with the same weights."""
    import torch.multiprocessing as mp

    _stage_worker(0, 1, 0, str(tmp_path / "one"))
    mp.spawn(_stage_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one = json.loads((tmp_path / "one.0").read_text())
    r0, r1 = (json.loads((tmp_path / f"two.{r}").read_text()) for r in range(2))
    assert r0 == r1  # DDP kept the ranks in step (all-reduced losses, identical weights)
    a, b = np.array(one["loss"]), np.array(r0["loss"])
    assert a[-1] < a[0] and b[-1] < b[0]
    assert np.all(np.abs(a - b) / a < 0.05), (a, b)
    assert not np.array_equal(a, b)  # it really ran as two halves


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _rank(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc (Linux)")
def test_a_dead_rank_ends_the_job_with_one_line_and_resume_finishes_it(tmp_path: Path) -> None:
    src = _npy_folder(tmp_path, n=48)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "unpoison", "purify", str(src), str(out), "--method", "dvae", "--preset", "cpu",
           "--width", "8", "--latent", "8", "--epochs", "40", "--batch-size", "16", "--device", "cpu", "--quiet",
           "--nproc", "2"]  # 40 epochs a stage: the job outlives the wait below by far
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # training is under way once any checkpoint exists: stage 1's epoch file, then stage1.done.pt, which
    # stays for the rest of the job (waiting for the short-lived epoch file alone could miss it on a busy
    # machine); the bounds are generous, for start-up on shared cores
    cks = tmp_path / "out.report" / "checkpoints"
    t0 = time.monotonic()
    try:
        while not any(cks.glob("*.pt")):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() - t0 < 900, "no checkpoint after 900 s"
            time.sleep(0.05)
        ranks = [c for k in _children(p.pid) for c in [k, *_children(k)] if _rank(c) == 1]
        assert ranks, "rank 1 not found"
        os.kill(ranks[0], signal.SIGKILL)
        killed = time.monotonic()
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, err
    assert "rank 1 of 2" in lines[0] and "SIGKILL" in lines[0] and "--resume" in lines[0]
    # the others stop on the lost peer, long before --dist-timeout (900 s) would end a hang
    assert time.monotonic() - killed < 300 and not out.exists()
    r = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "out.report" / "manifest.json").read_text())
    assert man["stats"]["distributed"]["world_size"] == 2
    assert load_dataset(out).x_train.shape == (48, 16, 16, 3)


def test_nproc_and_torchrun_flags_are_checked(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    src = _npy_folder(tmp_path, n=32)
    rc, _, err = run_cli("purify", src, tmp_path / "o", "--nproc", "0")
    assert rc == 2 and "--nproc must be >= 1" in err
    rc, _, err = run_cli("purify", src, src, "--nproc", "2")  # OUT = IN refused before any process starts
    assert rc == 2 and "input" in err
    rc, _, err = run_cli("purify", src, tmp_path / "o", "--dist-timeout", "0")
    assert rc == 2 and "--dist-timeout" in err


def test_psnr_arrays_matches_the_in_memory_formula(tmp_path: Path) -> None:
    from unpoison.utils import psnr

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    np.save(tmp_path / "a.npy", a)
    assert psnr(np.load(tmp_path / "a.npy", mmap_mode="r"), b, chunk_bytes=500) == pytest.approx(psnr(a, b))
    assert psnr(a, a) == float("inf")



def test_a_bench_cell_given_two_processes_purifies_data_parallel(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """``resources: {nproc: 2}`` (or ``num_gpus: 2`` under Ray) runs the cell's D-VAE as two DDP ranks."""
    import yaml

    cfg = {"name": "t", "kind": "purify", "device": "cpu", "resources": {"num_cpus": 2, "nproc": 2},
           "axes": {"dataset": ["synthetic:n=48,size=8,channels=3,classes=4,seed=0"], "attack": ["none"],
                    "defense": [{"name": "dvae", "params": {"preset": "cpu", "width": 8, "latent": 8, "epochs": 1,
                                                            "batch_size": 16}}], "model": ["tinycnn"]},
           "train": {"preset": "smoke", "epochs": 1}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli("bench", tmp_path / "g.yaml", tmp_path / "out", "--quiet")
    assert rc == 0, err
    (man,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cells").glob("*/manifest.json")]
    assert man["error"] is None, man["error"]
    assert man["results"]["defense_info"]["distributed"]["world_size"] == 2
    assert 0 <= man["results"]["final_acc"] <= 100


def test_inference_batch_scales_with_image_size() -> None:
    """The default inference batch holds as many pixels as 256 CIFAR images (CPU), not 256 images of any size."""
    p = DVAEPurifier(preset="cpu", device="cpu")
    p._start_fit()  # the switches are resolved when a fit starts (device_, accel_), not in __init__
    assert p._infer_accel((32, 32, 3)).infer_batch == 256 and p._infer_accel((28, 28, 1)).infer_batch == 256
    assert p._infer_accel((224, 224, 3)).infer_batch == 5
    given = DVAEPurifier(preset="cpu", device="cpu", infer_batch=64)
    given._start_fit()
    assert given._infer_accel((224, 224, 3)).infer_batch == 64
