"""Latent-resolution sweep for stage 1: how much does the latent factor f cost and lose?

Stage 2 decodes with the *frozen* G of stage 1, so stage-1 reconstruction quality is a hard
ceiling on SR quality. With N = 256 codes each latent position carries 8 bits, i.e.
8 / f^2 bits per pixel. For every f in ``--fs`` this script trains stage 1 briefly (same steps,
batch, crop and learning rate for every f; no GAN) and reports, on held-out full slices:

* reconstruction PSNR / SSIM (``pgasr.metrics``; data range = the slice's max - min),
* code usage: perplexity of the code histogram and number of codes used,
* statistics of a = softmax(-d / tau) at tau = 1 (max probability, entropy), which
  informs the stage-2 temperature,
* forward GFLOPs per 256^2 slice (``torch.utils.flop_counter.FlopCounterMode``), parameters,
* peak tensor memory (activations and temporaries, parameters excluded; tracked with a
  ``TorchDispatchMode``) and CPU wall time of an inference forward and of a training
  forward + backward on one 256^2 slice.

Data: ``pgasr.data.synth.synthesize_subject`` when that module is available, else axial
slices of nilearn's bundled MNI152 1 mm template (no download), else a generated phantom —
the JSON records which. The ACG prior is a simple intensity-tissue map (3 quantile classes,
summed and normalised to [0, 1]) standing in for SAM, which this benchmark does not need.

Writes ``benchmarks/results/latent_sweep.json`` and ``latent_sweep.png``.

Usage::

    python benchmarks/latent_sweep.py --steps 150 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgasr.config import RunConfig  # noqa: E402
from pgasr.metrics import psnr, ssim  # noqa: E402
from pgasr.models import build_stage1, count_parameters  # noqa: E402
from pgasr.models.pgasr import code_log_probs  # noqa: E402
from pgasr.steps import make_stage1_optimizers, stage1_update  # noqa: E402

SIZE = 256


# --------------------------------------------------------------------------- data


def _crop_or_pad(img: np.ndarray, size: int) -> np.ndarray:
    out = np.full((size, size), img.min(), dtype=np.float32)
    h, w = img.shape
    sh, sw = max((h - size) // 2, 0), max((w - size) // 2, 0)
    dh, dw = max((size - h) // 2, 0), max((size - w) // 2, 0)
    ch, cw = min(h, size), min(w, size)
    out[dh : dh + ch, dw : dw + cw] = img[sh : sh + ch, sw : sw + cw]
    return out


def _phantom_volume(n: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth head-like phantom: nested ellipses (skull, CSF, GM, WM) with textured tissue."""
    yy, xx = np.mgrid[-1 : 1 : SIZE * 1j, -1 : 1 : SIZE * 1j]
    vol = []
    noise = rng.standard_normal((SIZE // 8, SIZE // 8))
    tex = F.interpolate(torch.tensor(noise)[None, None].float(), size=(SIZE, SIZE), mode="bicubic")[0, 0].numpy()
    for k in range(n):
        s = 1 - 0.3 * abs(k - n / 2) / n
        r = (xx / (0.75 * s)) ** 2 + (yy / (0.9 * s)) ** 2
        img = np.where(r < 1, 0.3, 0.0) + np.where(r < 0.85, 0.5, 0.0)
        img += np.where(r < 0.7, 0.2 + 0.1 * np.sin(8 * np.arctan2(yy, xx) + k / 5) * tex, 0.0)
        vent = ((xx - 0.15) / 0.12) ** 2 + (yy / 0.3) ** 2 < 1
        img = np.where(vent | (((xx + 0.15) / 0.12) ** 2 + (yy / 0.3) ** 2 < 1), 0.9, img)
        vol.append(img.astype(np.float32))
    return np.stack(vol)


def load_slices(n_slices: int, seed: int) -> tuple[np.ndarray, str]:
    """(S, 256, 256) z-scored axial slices and a description of their source."""
    try:  # the project's synthetic IXI-like cohort, when available
        from pgasr.config import SynthConfig
        from pgasr.data.synth import synthesize_subject

        scfg = SynthConfig(size=SIZE, slices=120, seed=seed)
        vol, _ = synthesize_subject(0, scfg)  # (X, Y, Z) RAS+, axial slices vol[:, :, k]
        z0 = vol.shape[2] // 2 - n_slices // 2
        vol = np.moveaxis(vol[:, :, z0 : z0 + n_slices], -1, 0)  # (Z, X, Y) central slices
        src = f"pgasr.data.synth.synthesize_subject(0, {scfg}), {n_slices} central axial slices"
    except Exception as e:  # noqa: BLE001 - any failure: fall back, and say why
        why = f"{type(e).__name__}: {e}"
        try:
            from nilearn.datasets import load_mni152_template

            t = load_mni152_template(resolution=1).get_fdata().astype(np.float32)  # (X, Y, Z)
            z0 = t.shape[2] // 2 - n_slices // 2 + 10
            vol = np.stack([_crop_or_pad(np.rot90(t[:, :, z]), SIZE) for z in range(z0, z0 + n_slices)])
            src = f"nilearn MNI152 1mm template, axial slices (synth unavailable: {why})"
        except Exception as e2:  # noqa: BLE001
            vol = _phantom_volume(n_slices, np.random.default_rng(seed))
            src = f"generated phantom (synth unavailable: {why}; nilearn: {e2})"
    vol = vol[: n_slices].astype(np.float32)
    vol = (vol - vol.mean()) / (vol.std() + 1e-8)  # HR z-scoring (paper Sec. 3)
    return vol, src


def tissue_prior(x: torch.Tensor) -> torch.Tensor:
    """Stand-in anatomical prior: sum of 3 quantile tissue masks of the head, scaled to [0, 1].

    Args:
        x: (B, 1, H, W) z-scored slices. Returns (B, 1, H, W) in [0, 1].
    """
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        v = x[i]
        head = v > v.min() + 0.1 * (v.max() - v.min())
        if head.sum() < 10:
            continue
        q = torch.quantile(v[head], torch.tensor([1 / 3, 2 / 3]))
        seg = head.float() + (v > q[0]).float() * head + (v > q[1]).float() * head
        out[i] = seg / 3.0
    return out


# --------------------------------------------------------------------------- measures


def gflops_per_slice(cfg: RunConfig) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build_stage1(cfg)
    model.eval()
    x = torch.randn(1, 1, SIZE, SIZE)
    p = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        with FlopCounterMode(display=False) as total:
            model(x, p)
        with FlopCounterMode(display=False) as enc:
            model.encode(x, p)
    return {"gflops_fwd": total.get_total_flops() / 1e9, "gflops_encoder": enc.get_total_flops() / 1e9}


class _TensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (activations, grads, temporaries;
    parameters created before are not counted). Storages are freed when their last tensor
    dies (polled through weak references)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _poll(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._poll()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.live:
                    self.live[key] = (StorageWeakRef(st), n)
                    self.current += n
        self.peak = max(self.peak, self.current)
        return out


def memory_and_time(cfg: RunConfig) -> dict[str, float]:
    """Peak tensor memory (MiB, excluding parameters) and CPU seconds on one 256^2 slice, for an
    inference forward and a training forward + backward."""
    model, _ = build_stage1(cfg)
    x, p = torch.randn(1, 1, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE)
    mib = 2.0**20
    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(x, p)

    def train_step() -> None:
        model.train()
        out = model(x, p)
        (out.recon.abs().mean() + out.quant.codebook_loss).backward()

    times = {}
    for name, fn in (("infer", infer), ("train", train_step)):
        fn()  # warm-up (also initialises the codebook from data)
        t0 = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t0  # timed outside the (slow) tracking mode
    with _TensorMemory() as mem_inf:
        infer()
    with _TensorMemory() as mem_train:
        train_step()
    t_inf, t_train = times["infer"], times["train"]
    return {
        "peak_mem_infer_mib": mem_inf.peak / mib,
        "peak_mem_train_mib": mem_train.peak / mib,
        "cpu_s_infer": t_inf,
        "cpu_s_train": t_train,
    }


@torch.no_grad()
def evaluate(model, slices: np.ndarray, tau: float = 1.0) -> tuple[dict[str, float], np.ndarray]:
    model.eval()
    x = torch.from_numpy(slices)[:, None]  # (S, 1, 256, 256)
    pri = tissue_prior(x)
    psnrs, ssims, idx_all, pmax, ent, recons = [], [], [], [], [], []
    for i in range(0, x.shape[0], 2):
        hr, pr = x[i : i + 2], pri[i : i + 2]
        out = model(hr, pr)
        dr = (hr.flatten(1).max(1).values - hr.flatten(1).min(1).values)
        psnrs.append(psnr(out.recon, hr, dr))
        ssims.append(ssim(out.recon, hr, dr))
        idx_all.append(out.quant.indices.flatten())
        lp = code_log_probs(out.quant.distances, tau)
        pmax.append(lp.exp().amax(1).flatten())
        ent.append(-(lp.exp() * lp).sum(1).flatten())
        recons.append(out.recon[:, 0].numpy())
    idx = torch.cat(idx_all)
    counts = torch.bincount(idx, minlength=model.quantizer.codebook_size).double()
    p = counts / counts.sum()
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "perplexity": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())),
        "codes_used": int((counts > 0).sum()),
        "a_max_prob_tau1": float(torch.cat(pmax).mean()),
        "a_entropy_tau1": float(torch.cat(ent).mean()),
    }, np.concatenate(recons)


def train_one(f: int, args, train: np.ndarray, rng: np.random.Generator) -> tuple[dict, object]:
    cfg = RunConfig()
    cfg.model.latent_factor = f
    cfg.stage1.lr = args.lr
    cfg.stage1.disc_start = 10**9  # no GAN: the sweep measures the reconstruction ceiling
    cfg.stage1.perceptual = args.perceptual
    torch.manual_seed(args.seed)
    model, disc = build_stage1(cfg)
    opt_g, _ = make_stage1_optimizers(cfg, model, None)
    data = torch.from_numpy(train)
    c = args.crop
    t0 = time.perf_counter()
    log = []
    for step in range(args.steps):
        idx = rng.integers(0, data.shape[0], args.batch)
        ys = rng.integers(0, SIZE - c + 1, args.batch)
        xs = rng.integers(0, SIZE - c + 1, args.batch)
        hr = torch.stack([data[i, y : y + c, x : x + c] for i, y, x in zip(idx, ys, xs)])[:, None]
        batch = {"hr": hr, "prior_hr": tissue_prior(hr)}
        m = stage1_update(model, None, opt_g, None, batch, cfg, step)
        if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
            log.append({"step": step, "l1": m["l1"], "psnr": m["psnr"], "perplexity": m["perplexity"]})
            print(f"  f={f} step {step:4d} l1 {m['l1']:.4f} psnr {m['psnr']:.2f} ppl {m['perplexity']:.1f}", flush=True)
    train_s = time.perf_counter() - t0
    return {"train_s": train_s, "train_log": log, "params_stage1": count_parameters(model),
            "params_disc": count_parameters(disc), "cfg": cfg}, model


def patch_vq_ceiling(train: np.ndarray, test: np.ndarray, f: int, k: int = 256, iters: int = 25,
                     n_fit: int = 100_000, seed: int = 0) -> dict[str, float]:
    """Budget-free reference: PSNR/SSIM of k-means vector quantisation of f x f patches.

    256 centroids of non-overlapping f x f patches (Lloyd's algorithm on ``n_fit`` sampled
    training patches) is what 8 bits per f x f block buys *without* a learned encoder/decoder
    (no context, no overlap). A trained VQGAN at the same f should approach or beat it; a brief
    training run that falls far below it is undertrained, not capacity-limited.
    """
    g = torch.Generator().manual_seed(seed)

    def patches(v: np.ndarray) -> torch.Tensor:  # (S, H, W) -> (S * H/f * W/f, f*f)
        t = torch.from_numpy(np.ascontiguousarray(v))[:, None]
        return F.unfold(t, f, stride=f).transpose(1, 2).reshape(-1, f * f)

    x = patches(train)
    x = x[torch.randperm(x.shape[0], generator=g)[:n_fit]]
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()  # (k, f*f)
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).float()
        empty = cnt == 0
        c = torch.where(empty[:, None], x[torch.randint(x.shape[0], (k,), generator=g)], sums / cnt.clamp_min(1)[:, None])
    xt = patches(test)
    rec = c[torch.cdist(xt, c).argmin(1)]  # (P, f*f)
    s, h, w = test.shape
    rec = F.fold(rec.reshape(s, -1, f * f).transpose(1, 2), (h, w), f, stride=f)  # (S, 1, H, W)
    hr = torch.from_numpy(np.ascontiguousarray(test))[:, None]
    dr = hr.flatten(1).max(1).values - hr.flatten(1).min(1).values
    return {"vq_patch_psnr": float(psnr(rec, hr, dr).mean()), "vq_patch_ssim": float(ssim(rec, hr, dr).mean())}


def plot(results: list[dict], test: np.ndarray, recons: dict[int, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs = [r["f"] for r in results]
    fig = plt.figure(figsize=(4 * (len(fs) + 1), 8))
    ax = fig.add_subplot(2, 2, 1)
    ax.plot(fs, [r["psnr"] for r in results], "o-", label="VQGAN, brief training")
    if all("vq_patch_psnr" in r for r in results):
        ax.plot(fs, [r["vq_patch_psnr"] for r in results], "^--", label="patch k-means VQ")
    ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latent factor f")
    ax.set_ylabel("recon PSNR (dB)")
    ax.grid(True)
    ax2 = fig.add_subplot(2, 2, 2)
    ax2.plot(fs, [r["gflops_fwd"] for r in results], "s-")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("latent factor f")
    ax2.set_ylabel("GFLOPs / 256² slice (fwd)")
    ax2.grid(True)
    k = len(fs) + 1
    ax = fig.add_subplot(2, k, k + 1)
    ax.imshow(test[0], cmap="gray")
    ax.set_title("HR")
    ax.axis("off")
    for j, f in enumerate(fs):
        ax = fig.add_subplot(2, k, k + 2 + j)
        ax.imshow(recons[f][0], cmap="gray", vmin=test[0].min(), vmax=test[0].max())
        r = results[j]
        ax.set_title(f"f={f}: {r['psnr']:.1f} dB")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fs", type=int, nargs="+", default=[8, 4, 2, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--perceptual", default="fallback")
    ap.add_argument("--slices", type=int, default=48, help="slices loaded (last 8 held out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--only-vq", action="store_true",
                    help="only (re)compute the patch-VQ reference for the rows of an existing JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vol, source = load_slices(args.slices, args.seed)
    train, test = vol[:-8], vol[-8:][::2]  # 4 held-out slices (every other of the last 8)
    print(f"data: {source}; train {train.shape}, test {test.shape}", flush=True)
    if args.only_vq:
        path = Path(args.out) / "latent_sweep.json"
        data = json.loads(path.read_text())
        for row in data["results"]:
            row.update(patch_vq_ceiling(train, test, row["f"], seed=args.seed))
            print(row["f"], row["vq_patch_psnr"], row["vq_patch_ssim"], flush=True)
        path.write_text(json.dumps(data, indent=2))
        print_table(data["results"])
        return
    results, recons = [], {}
    for f in args.fs:
        rng = np.random.default_rng(args.seed)
        info, model = train_one(f, args, train, rng)
        ev, rec = evaluate(model, np.ascontiguousarray(test))
        recons[f] = rec
        cfg = info.pop("cfg")
        row = {"f": f, "bits_per_pixel": 8.0 / f**2, **ev,
               **patch_vq_ceiling(train, test, f, seed=args.seed), **gflops_per_slice(cfg),
               **memory_and_time(cfg), **info}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "train_log"}), flush=True)
        write_results(args, source, results, test, recons)  # after every f: partial runs count
    print_table(results)


def write_results(args, source: str, results: list[dict], test: np.ndarray, recons: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "data": source,
        "steps": args.steps, "batch": args.batch, "crop": args.crop, "lr": args.lr,
        "perceptual": args.perceptual, "threads": args.threads, "torch": torch.__version__,
        "model": {k: v for k, v in RunConfig().model.__dict__.items() if k != "latent_factor"},
        "eval": "4 held-out 256x256 slices; PSNR/SSIM with data_range = slice max - min",
    }
    (out / "latent_sweep.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, test, recons, out / "latent_sweep.png")


def print_table(results: list[dict]) -> None:
    print("\n| f | bits/px | PSNR dB | SSIM | patch-VQ PSNR / SSIM | perplexity | codes used | "
          "GFLOPs fwd/256² | peak MiB infer/train | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vq = f"{r['vq_patch_psnr']:.2f} / {r['vq_patch_ssim']:.4f}" if "vq_patch_psnr" in r else "-"
        print(f"| {r['f']} | {r['bits_per_pixel']:.3g} | {r['psnr']:.2f} | {r['ssim']:.4f} | {vq} | "
              f"{r['perplexity']:.1f} | {r['codes_used']} | {r['gflops_fwd']:.1f} | "
              f"{r['peak_mem_infer_mib']:.0f}/{r['peak_mem_train_mib']:.0f} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
