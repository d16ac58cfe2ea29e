"""Checkpoint integrity (issue #17): recorded SHA-256s verified on load, weights-only loading
of both ``.pt`` files, no non-finite weights saved, and no directory replaced that is not a
checkpoint."""

import json
import logging

import pytest
import torch

from pgasr.checkpoint import load_checkpoint, save_checkpoint
from pgasr.config import load_config
from pgasr.provenance import sha256_file

_UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    _UNPICKLED.append("code ran")
    return "payload"


class _Payload:
    """Unpickling this runs ``_record_unpickling``: what a malicious file would do."""

    def __reduce__(self):
        return (_record_unpickling, ())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _train_state(model: torch.nn.Module) -> dict:
    """Shaped like ``pgasr.training.fit``'s: optimiser state, counters, torch RNG state."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"optims": {"opt": opt.state_dict()}, "step": 1, "epoch": 0, "nan_skipped": 0,
            "torch_rng": torch.get_rng_state()}


def _save(path, model=None, **kw):
    model = model if model is not None else _model()
    return save_checkpoint(path, stage=1, modules={"model": model}, cfg=load_config(None, []),
                           meta={"metrics": {"val_psnr": 1.0}}, **kw)


def _drop_hashes(ck) -> None:
    meta = json.loads((ck / "meta.json").read_text())
    meta.pop("sha256", None)
    (ck / "meta.json").write_text(json.dumps(meta))


def test_checkpoint_records_and_verifies_file_hashes(tmp_path):
    m = _model()
    ck = _save(tmp_path / "ck", m, train_state=_train_state(m))
    meta = json.loads((ck / "meta.json").read_text())
    assert set(meta["sha256"]) == {"model.safetensors", "config.yaml", "train_state.pt"}
    assert all(meta["sha256"][f] == sha256_file(ck / f) for f in meta["sha256"])
    loaded = load_checkpoint(ck, with_train_state=True)
    torch.testing.assert_close(loaded.state_dicts["model"]["weight"], m.weight.detach())
    # a valid but different weights file put there afterwards is caught, naming the file
    from safetensors.torch import save_file

    save_file({"model.weight": torch.zeros(2, 3), "model.bias": torch.zeros(2)},
              str(ck / "model.safetensors"), metadata={"stage": "1", "modules": '["model"]'})
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 .* does not match"):
        load_checkpoint(ck)


def test_checkpoint_weights_are_safetensors_and_old_ones_load(tmp_path):
    """Weights are a safetensors file (no pickle); a format-1 checkpoint (weights in
    ``model.pt``, written by the code before format 2) still loads, verified, and a weights
    file that is not safetensors is refused with the file named."""
    from safetensors import safe_open

    from pgasr.checkpoint import is_checkpoint

    m = _model()
    ck = _save(tmp_path / "ck", m)
    assert sorted(p.name for p in ck.iterdir()) == ["config.yaml", "meta.json",
                                                     "model.safetensors"]
    with safe_open(str(ck / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"model.weight", "model.bias"}
        assert f.metadata()["stage"] == "1"
    assert json.loads((ck / "meta.json").read_text())["format"] == "pgasr-checkpoint/2"

    # format 1, exactly as the previous code wrote it
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"stage": 1, "state_dicts": {"model": m.state_dict()}}, old / "model.pt")
    (old / "config.yaml").write_text((ck / "config.yaml").read_text())
    meta = json.loads((ck / "meta.json").read_text())
    meta["format"] = "pgasr-checkpoint/1"
    meta["sha256"] = {"model.pt": sha256_file(old / "model.pt"),
                      "config.yaml": sha256_file(old / "config.yaml")}
    (old / "meta.json").write_text(json.dumps(meta))
    assert is_checkpoint(old) and is_checkpoint(ck) and not is_checkpoint(tmp_path)
    loaded = load_checkpoint(old)
    assert loaded.stage == 1
    torch.testing.assert_close(loaded.state_dicts["model"]["weight"], m.weight.detach())

    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    _drop_hashes(ck)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a PGASR weights file"):
        load_checkpoint(ck)
    meta = json.loads((ck / "meta.json").read_text())
    meta["format"] = "pgasr-checkpoint/9"
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unsupported checkpoint format 'pgasr-checkpoint/9'"):
        load_checkpoint(ck)


def test_changed_train_state_is_caught_when_it_is_read(tmp_path):
    m = _model()
    ck = _save(tmp_path / "ck", m, train_state=_train_state(m))
    torch.save({"step": 99}, ck / "train_state.pt")
    assert load_checkpoint(ck).train_state is None  # not read: not checked
    with pytest.raises(ValueError, match=r"train_state\.pt: SHA-256"):
        load_checkpoint(ck, with_train_state=True)


def test_checkpoint_without_hashes_loads_with_a_warning(tmp_path, caplog):
    ck = _save(tmp_path / "ck")
    _drop_hashes(ck)  # as written before hashes were recorded
    with caplog.at_level(logging.WARNING, logger="pgasr.checkpoint"):
        assert load_checkpoint(ck).stage == 1
    assert "no file hashes" in caplog.text and str(ck) in caplog.text


def test_train_state_loads_weights_only_and_refuses_pickled_objects(tmp_path):
    m = _model()
    ts = _train_state(m)
    ck = _save(tmp_path / "ck", m, train_state=ts)
    got = load_checkpoint(ck, with_train_state=True).train_state
    assert got["step"] == 1 and torch.equal(got["torch_rng"], ts["torch_rng"])
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    opt.load_state_dict(got["optims"]["opt"])  # what resuming does with it
    # a train_state.pt holding an arbitrary object (legacy meta: no hash stops it first)
    _UNPICKLED.clear()
    torch.save({"step": 1, "payload": _Payload()}, ck / "train_state.pt")
    _drop_hashes(ck)
    with pytest.raises(ValueError, match=r"train_state\.pt: holds objects other than tensors"):
        load_checkpoint(ck, with_train_state=True)
    assert _UNPICKLED == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_saved(tmp_path, bad):
    m = _model()
    with torch.no_grad():
        m.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"non-finite weights in 'model': weight"):
        _save(tmp_path / "ck", m)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp dir left


def test_save_checkpoint_never_replaces_what_it_did_not_write(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="did not write"):
        _save(out)
    (out / "meta.json").write_text(json.dumps({"format": "some other tool"}))
    with pytest.raises(ValueError, match="did not write"):
        _save(out)
    assert (out / "thesis.txt").read_text() == "years of work"
    # an empty directory and an earlier checkpoint are fine, and leave nothing aside
    (tmp_path / "ck").mkdir()
    _save(tmp_path / "ck")
    _save(tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "runs"]


def test_publish_checkpoint_copies_verified_and_refuses_foreign_dest(tmp_path):
    from pgasr.checkpoint import publish_checkpoint

    m = _model()
    src = _save(tmp_path / "src", m, train_state=_train_state(m))
    dest = tmp_path / "best"
    dest.mkdir()
    (dest / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        publish_checkpoint(src, dest)
    assert (dest / "notes.md").read_text() == "mine"
    (dest / "notes.md").unlink()
    publish_checkpoint(src, dest, keep_train_state=False)
    assert not (dest / "train_state.pt").exists() and load_checkpoint(dest).stage == 1
    publish_checkpoint(src, dest)  # over its own earlier copy
    assert load_checkpoint(dest, with_train_state=True).train_state["step"] == 1
    (src / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256"):
        publish_checkpoint(src, dest)  # a damaged source is never published
    assert load_checkpoint(dest).state_dicts["model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "src"]
