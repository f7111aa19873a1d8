import pytest

from dpldm.config import ConfigError, load_all, load_section
from helpers import ROOT, params


def test_params_yaml_loads_and_matches_defaults_types():
    cfgs = load_all(params())
    assert cfgs["finetune"].layers == (1, 7)
    assert isinstance(cfgs["finetune"].delta, float)


def test_dvc_string_float_is_accepted():
    p = params()
    p["finetune"]["delta"] = "1e-06"  # what `dvc exp run -S finetune.delta=1e-06` writes
    assert load_section(p, "finetune").delta == 1e-06


@pytest.mark.parametrize("section,key,value,needle", [
    ("finetune", "epsilon", 0, "finetune.epsilon"),
    ("finetune", "epsilon", "ten", "finetune.epsilon"),
    ("finetune", "layers", [3, 2], "finetune.layers"),
    ("finetune", "noise_multiplicity", 0, "finetune.noise_multiplicity"),
    ("finetune", "t_range", [500, 100], "finetune.t_range"),
    ("finetune", "t_range", [-1, 100], "finetune.t_range"),
    ("finetune", "adam_beta1", 1.0, "finetune.adam_beta1"),
    ("finetune", "adam_bc_floor", -0.1, "finetune.adam_bc_floor"),
    ("finetune", "mode", "attn", "finetune.mode"),
    ("finetune", "epsilonn", 1.0, "finetune.epsilonn"),
    ("ldm", "block_out_channels", [30, 64], "ldm.block_out_channels"),
    ("ldm", "attention_head_dim", 3, "ldm.attention_head_dim"),  # heads must divide 32 and 64
    ("ldm", "attention_head_dim", 0, "ldm.attention_head_dim"),
    ("ldm", "ff_mult", 0, "ldm.ff_mult"),
    ("runtime", "device", "tpu", "runtime.device"),
    ("sample", "steps", 2.5, "sample.steps"),
    ("ae", "recon_loss", "l3", "ae.recon_loss"),
])
def test_bad_values_raise_naming_the_key(section, key, value, needle):
    p = params()
    p[section][key] = value
    with pytest.raises(ConfigError) as err:
        load_section(p, section)
    assert needle in str(err.value) and repr(value) in str(err.value)


def test_nested_key_and_unknown_section():
    p = params()
    p["data"]["private"]["imgsize"] = 32
    with pytest.raises(ConfigError, match=r"data\.private\.imgsize"):
        load_section(p, "data")
    p = params()
    p["finetuen"] = {}
    with pytest.raises(ConfigError, match="finetuen"):
        load_all(p)


def test_font_ranges_are_validated_with_their_key():
    p = params()
    assert load_section(p, "data").public.font_stroke == (0, 2)
    p["data"]["private"]["font_stroke"] = [3, 1]
    with pytest.raises(ConfigError, match=r"data\.private\.font_stroke"):
        load_section(p, "data")
    p = params()
    p["data"]["public"]["font_elastic_alpha"] = [-1, 30]
    with pytest.raises(ConfigError, match=r"data\.public\.font_elastic_alpha"):
        load_section(p, "data")


def test_bool_is_not_a_number():
    p = params()
    p["finetune"]["epsilon"] = True
    with pytest.raises(ConfigError, match="finetune.epsilon"):
        load_section(p, "finetune")


def test_params_yaml_writes_out_every_key_and_the_code_has_no_defaults():
    """params.yaml is the one source of defaults: the dataclasses carry none, and every field of every
    section (nested ones too) is a key in params.yaml, so `dvc exp run -S key=value` works for all."""
    import dataclasses
    import typing

    from dpldm.config import SECTIONS

    def walk(cls, node, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}"
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f"{key} has a code default"
            assert f.name in node, f"{key} is not written out in params.yaml"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], node[f.name], key)

    p = params()
    for name, cls in SECTIONS.items():
        walk(cls, p[name], name)


def test_missing_key_names_it():
    p = params()
    del p["finetune"]["clip_norm"]
    with pytest.raises(ConfigError, match=r"finetune\.clip_norm is missing"):
        load_section(p, "finetune")
    p = params()
    del p["data"]["private"]["root"]
    with pytest.raises(ConfigError, match=r"data\.private\.root is missing"):
        load_section(p, "data")


def test_overrides_write_into_a_copy_and_unknown_keys_are_named():
    from dpldm.config import with_overrides

    params = {"finetune": {"epsilon": 10, "lora": {"rank": 4}}}
    out = with_overrides(params, {"finetune.epsilon": 1, "finetune.lora.rank": 16})
    assert out == {"finetune": {"epsilon": 1, "lora": {"rank": 16}}} and params["finetune"]["lora"]["rank"] == 4
    for bad in ("finetune.epsilom", "finetune.lora.rank.x", "fine.epsilon"):
        with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
            with_overrides(params, {bad: 1})


PROFILES = sorted(p.name for p in (ROOT / "benchmarks" / "profiles").glob("*.yaml")) + ["../../tests/tiny_params.yaml"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_applies_to_params_yaml_and_validates(profile, tmp_path):
    """The profiles the README and docs tell people to apply: scripts/apply_profile.py accepts each (no key
    outside params.yaml) and the merged params pass every section's validation."""
    import shutil
    import subprocess
    import sys

    import yaml

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "apply_profile.py"), str(ROOT / "benchmarks" / "profiles" / profile),
                    "--params", str(tmp_path / "params.yaml")], check=True)
    merged = yaml.safe_load((tmp_path / "params.yaml").read_text())
    over = yaml.safe_load((ROOT / "benchmarks" / "profiles" / profile).read_text())
    load_all(merged)
    for section, values in over.items():  # what the profile sets is what the merged params hold
        for key, value in values.items():
            assert merged[section][key] == value if not isinstance(value, dict) else all(
                merged[section][key][k] == v for k, v in value.items() if not isinstance(v, dict))


@pytest.mark.parametrize("section", ["ae", "sample"])
def test_precision_is_auto_fp32_or_bf16(section):
    p = params()
    assert load_section(p, section).precision in ("auto", "fp32", "bf16")
    p[section]["precision"] = "fp16"
    with pytest.raises(ConfigError, match=f"{section}.precision"):
        load_section(p, section)
    for value in ("auto", "fp32", "bf16"):
        p[section]["precision"] = value
        assert load_section(p, section).precision == value


@pytest.mark.parametrize("key, bad, good", [("solver", "euler", "dpmpp_2m_sde"), ("spacing", "uniform", "trailing")])
def test_sample_solver_and_spacing_are_one_of_three(key, bad, good):
    p = params()
    p["sample"][key] = bad
    with pytest.raises(ConfigError, match=f"sample.{key}"):
        load_section(p, "sample")
    p["sample"][key] = good
    assert getattr(load_section(p, "sample"), key) == good
