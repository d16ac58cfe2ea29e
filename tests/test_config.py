import pytest

from pgasr.config import ConfigError, RunConfig, dump_config, load_config


def test_defaults_and_roundtrip(tmp_path):
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.slices_per_volume == 80 and cfg.model.codebook_size == 256
    p = tmp_path / "c.yaml"
    dump_config(cfg, p)
    assert load_config(p) == cfg


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  slices_per_volum: 80\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "slices_per_volum" in str(e.value) and str(p) in str(e.value)


def test_unknown_top_level_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dataa: {}\n")
    with pytest.raises(ConfigError, match="dataa"):
        load_config(p)


def test_overrides_typed():
    cfg = load_config(None, ["data.slices_per_volume=40", "stage2.alpha1=0.5", "model.acg=false",
                             "data.scales=[2]"])
    assert cfg.data.slices_per_volume == 40
    assert cfg.stage2.alpha1 == 0.5
    assert cfg.model.acg is False
    assert cfg.data.scales == [2]


@pytest.mark.parametrize("bad", ["data.nope=1", "nope.x=1", "data.slices_per_volume", "data.size=abc",
                                 "data.scales=[3]", "model.acg=maybe"])
def test_bad_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_shipped_configs_load(repo_root):
    files = sorted((repo_root / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_config_import_does_not_pull_in_torch():
    """`pgasr.config` is imported by every CLI/driver entry point; torch (+ SAM) costs seconds."""
    import subprocess
    import sys

    code = ("import sys, pgasr.config; "
            "bad = [m for m in ('torch', 'segment_anything', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
