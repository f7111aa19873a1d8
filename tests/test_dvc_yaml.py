"""dvc.yaml lists, for every stage, its own module and every project module it imports (directly or
through other project modules), and the stage module's declared --in/--out names."""
import ast
from pathlib import Path

import yaml

from helpers import ROOT


def project_imports(module_path: Path, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    tree = ast.parse(module_path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: from .diffusion import ... inside dpldm/
            package = module_path.relative_to(ROOT).parent.as_posix().replace("/", ".")
            names = [f"{package}.{node.module}"] if node.module else [f"{package}.{a.name}" for a in node.names]
        else:
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if name.split(".")[0] in ("dpldm", "stages"):
                rel = name.replace(".", "/") + ".py"
                if (ROOT / rel).exists() and rel not in seen and not rel.endswith("__init__.py"):
                    seen.add(rel)
                    project_imports(ROOT / rel, seen)
    return seen


def test_every_stage_lists_its_code_and_the_modules_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        module = st["cmd"].split()[2]
        path = module.replace(".", "/") + ".py"
        assert st["deps"][0] == path, name
        missing = project_imports(ROOT / path) - set(st["deps"])
        assert not missing, f"{name} imports {sorted(missing)} but dvc.yaml does not list them"


def test_stage_cli_names_match_the_modules():
    import importlib

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        mod = importlib.import_module(st["cmd"].split()[2])
        words = st["cmd"].split()
        ins = {words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "--in"}
        outs = {words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "--out"}
        state = {words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "--state"}
        assert ins == set(mod.INPUTS) and outs == set(mod.OUTPUTS) and state == set(getattr(mod, "STATE", ())), name


def test_params_are_only_the_sections_each_stage_reads():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "finetune" not in str(stages["sample"]["params"]) and stages["dp_finetune"]["params"][0] == "finetune"
    for early in ("prepare_public", "prepare_private", "pretrain_ae", "encode_public", "encode_private", "pretrain_ldm", "reference"):
        assert not any(p.startswith(("finetune", "sample")) for p in stages[early]["params"]), early


def test_no_stage_imports_another_stage_and_no_stale_code_deps():
    """Shared code lives in the library or in the shared stage modules (common, artifacts, prepare,
    encode, classify), never in another stage's module; and a stage lists no code it does not import
    (a stale dep re-runs it for nothing)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stage_modules = {st["cmd"].split()[2].replace(".", "/") + ".py" for st in stages.values()}
    for name, st in stages.items():
        path = st["cmd"].split()[2].replace(".", "/") + ".py"
        imported = project_imports(ROOT / path)
        assert not (imported & stage_modules) - {path}, f"{name} imports stage modules {sorted((imported & stage_modules) - {path})}"
        code_deps = {d for d in st["deps"] if d.endswith(".py")}
        stale = code_deps - imported - {path}
        assert not stale, f"{name} lists {sorted(stale)} in dvc.yaml but does not import them"
