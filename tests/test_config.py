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


def test_yaml_off_for_a_string_field_is_the_word(tmp_path):
    """YAML 1.1 reads ``off`` as False: ``stage2.residual_head=off`` must mean "off"."""
    assert load_config(None, ["stage2.residual_head=off"]).stage2.residual_head == "off"
    p = tmp_path / "c.yaml"
    p.write_text("stage2:\n  residual_head: off\n")
    assert load_config(p).stage2.residual_head == "off"
    with pytest.raises(ConfigError, match="stage1.epochs"):  # still no booleans for numbers
        load_config(None, ["stage1.epochs=off"])


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


@pytest.mark.parametrize("item, message", [
    ("stage1.epochs=true", "stage1.epochs: expected a number, got True"),
    ("data.size=abc", "data.size: input should be a valid integer"),
    ("serve.port=0", "serve.port must be in 1..65535"),
    ("tune.alpha1={type: grid, valuez: [1]}",
     "unknown key 'tune.alpha1.valuez'; valid keys: high, low, n, type, values"),
    ("tune.alpha1=[0.1, x]", "tune.alpha1.1: input should be a valid number"),
])
def test_errors_name_the_dotted_key(item, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert str(e.value) == f"--set: {message}" or str(e.value).startswith(f"--set: {message}")
    assert "SearchSpace" not in str(e.value) and "list[float]" not in str(e.value)


def test_yaml_scalars_are_read_the_lax_way(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: 123\nstage2:\n  lr: 1e-3\n  epochs: 5.0\nmodel:\n  acg: yes\n")
    cfg = load_config(p)  # YAML reads 1e-3 as a string and 123 as an int
    assert (cfg.name, cfg.stage2.lr, cfg.stage2.epochs, cfg.model.acg) == ("123", 1e-3, 5, True)
    p.write_text("stage2:\n  epochs: 5.5\n")
    with pytest.raises(ConfigError, match="stage2.epochs"):
        load_config(p)


def test_assignment_is_checked_again_by_revalidate():
    from pgasr.config import revalidate

    cfg = load_config(None)
    cfg.data.scales = [3]  # attribute assignment itself is not validated
    with pytest.raises(ConfigError, match="pgasr prepare: data.scales may contain only 2 and 4"):
        revalidate(cfg, "pgasr prepare")


def test_config_show_and_schema_cli(repo_root, capsys):
    import json

    import yaml

    from pgasr.cli import main

    assert main(["config", "show", "--config", str(repo_root / "configs" / "demo.yaml"),
                 "--set", "stage2.lr=2e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage2"]["lr"] == 2e-4 and shown["name"] == "demo"
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(RunConfig.model_fields)
    stage2 = schema["$defs"]["Stage2Config"]
    assert stage2["additionalProperties"] is False and "residual_head" in stage2["properties"]
    assert main(["config", "show", "--set", "data.nope=1"]) == 2
    assert "unknown key 'data.nope'" in capsys.readouterr().err
