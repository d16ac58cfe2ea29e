"""A researcher's own BIDS dataset end to end (issue #16): two contrasts and mixed spacing
(1 mm and 0.8 x 0.8 x 3 mm) prepared on one 1 mm grid, a tiny model trained on it, served
over HTTP (in process), and the dataset's LR scans super-resolved into BIDS derivatives."""

import asyncio
import gzip
import json

import httpx
import nibabel as nib
import numpy as np
import pytest

from pgasr.cli import main
from pgasr.config import load_config
from pgasr.data.ixi import image_to_bytes
from pgasr.data.prepare import prepare
from pgasr.training import train_local
from serve_fixtures import TINY
from test_sources import _bids


@pytest.mark.slow
def test_bids_prepared_trained_served_and_super_resolved(tmp_path):
    from pgasr.inference import Predictor
    from serve import app as A

    root = _bids(tmp_path / "bids")  # 5 subjects, T2w + T1w, sub-03/04 at 0.8 x 0.8 x 3 mm
    cfg = load_config(None, TINY + [
        f"data.source={root}", f"data.prepared_dir={tmp_path}/prep", "data.size=96",
        "data.slices_per_volume=4", "data.train_subjects=3", "data.val_subjects=1",
        "data.test_subjects=1", "data.rows_per_shard=8", "data.scales=[2]",
        "stage1.max_steps=3", "stage1.batch_size=2", "stage2.max_steps=3",
        "stage2.batch_size=2", "stage1.disc_start=100", "model.acg=false"])
    prep = prepare(cfg, progress=False)
    man = json.loads((prep.out_dir / "manifest.json").read_text())
    assert man["contrast"] == ["T2w"] and man["voxel_size"] == 1.0
    train_local(1, cfg, prep.out_dir, tmp_path / "s1", progress=False)
    train_local(2, cfg, prep.out_dir, tmp_path / "s2", stage1_checkpoint=tmp_path / "s1",
                progress=False)
    pred = Predictor.from_checkpoint(tmp_path / "s2", device="cpu")
    assert pred.ckpt.meta["contrast"] == ["T2w"]
    assert pred.ckpt.meta["voxel_size"][:2] == pytest.approx([1.0, 1.0], abs=0.02)

    # served: an LR scan of the dataset (degraded 2 mm) in, its SR out
    lr_img = nib.load(root / "sub-05" / "anat" / "sub-05_T2w.nii.gz")
    lr = nib.Nifti1Image(np.asarray(lr_img.dataobj)[::2, ::2], lr_img.affine @ np.diag([2, 2, 1, 1]))
    key = "own-data-key-0123456789"
    scfg = load_config(None, TINY + [f"serve.checkpoint={tmp_path / 's2'}",
                                     "serve.api_keys_env=PGASR_TEST_NO_SUCH_VAR"])
    svc = A.Service(pred, scfg, A.KeyChecker([key]))

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=A.make_api(svc)),
                                     base_url="http://t", timeout=120) as c:
            h = {"X-API-Key": key}
            out = [await c.post(f"/v1/sr?scale=2{q}", content=image_to_bytes(lr), headers=h)
                   for q in ("", "&contrast=T1w", "&contrast=t2", "&contrast=T1%3B")]
            return out, await c.get("/v1/model", headers=h)

    try:
        (r, r_t1, r_t2, r_bad), model = asyncio.run(call())
    finally:
        svc.close()
    assert r.status_code == 200, r.text
    assert model.json()["contrast"] == ["T2w"]
    # another contrast than the model's: served, with a warning saying so; the same: none
    assert r_t1.status_code == 200 and "X-PGASR-Warning" not in r.headers
    assert "trained on T2w images; the input is T1w" in r_t1.headers["X-PGASR-Warning"]
    assert r_t2.status_code == 200 and "X-PGASR-Warning" not in r_t2.headers
    assert r_bad.status_code == 422 and "contrast must be" in r_bad.json()["detail"]
    sr = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert sr.shape == (80, 88, 24) and np.isfinite(np.asarray(sr.dataobj)).all()

    # the whole dataset through `pgasr sr`: derivatives on the model's 1 mm grid
    assert main(["sr", "--checkpoint", str(tmp_path / "s2"), "--scale", "2", "--input",
                 str(root), "--quiet"]) == 0
    outs = sorted((root / "derivatives" / "pgasr").rglob("*_desc-sr2_T2w.nii.gz"))
    assert len(outs) == 6  # 5 subjects, sub-02 with two sessions; no T1w
    for p in outs:
        side = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
        assert side["Grid"]["resampled"] is True  # 1 and 0.8 mm inputs -> the 2 mm LR grid
        assert nib.load(p).header.get_zooms()[:2] == pytest.approx((1.0, 1.0))
