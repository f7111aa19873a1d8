import pytest
import yaml

from dpldm.config import ConfigError, load_all, load_section
from helpers import ROOT


def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


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
    ("finetune", "mode", "attn", "finetune.mode"),
    ("finetune", "epsilonn", 1.0, "finetune.epsilonn"),
    ("ldm", "block_out_channels", [30, 64], "ldm.block_out_channels"),
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


def test_bool_is_not_a_number():
    p = params()
    p["finetune"]["epsilon"] = True
    with pytest.raises(ConfigError, match="finetune.epsilon"):
        load_section(p, "finetune")
