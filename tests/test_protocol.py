"""The stage protocol: methods are declarations found in medgpt/stages/methods; nothing else lists them."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from conftest import CONF, ROOT, compose

from medgpt.config import MethodConfig, method_schema, validate
from medgpt.data.formats import FORMATS
from medgpt.errors import DataError
from medgpt.stages import protocol
from medgpt.stages.protocol import Stage, method_for_format, methods, register_stage


def test_every_method_is_declared_once_with_its_yaml_and_schema():
    declared = methods()
    assert {"sft", "pt", "dpo"} <= set(declared)
    for name, stage in declared.items():
        assert (CONF / "method" / f"{name}.yaml").exists(), name
        assert issubclass(stage.schema, MethodConfig) and method_schema(name) is stage.schema
        assert set(stage.formats) <= set(FORMATS) and stage.formats
        assert set(stage.reported) <= set(stage.summary_fields)
        cfg = compose([f"method={name}", "model=tiny"])
        assert set(cfg.method.keys()) == {f.name for f in dataclasses.fields(stage.schema)}  # the YAML starts from the schema
        validate(cfg)
        assert cfg.data.name  # every method brings its default data


def test_each_format_has_a_method():
    owners = {fmt: [n for n, s in methods().items() if fmt in s.formats] for fmt in FORMATS}
    assert all(v for v in owners.values()), owners
    assert {"dpo", "rm"} <= set(owners.pop("preference"))  # reward models (and KTO) train on DPO's pairs too; hints name dpo
    assert all(len(v) == 1 for v in owners.values()), owners
    assert method_for_format("preference") == "dpo" and method_for_format("text") == "pt"


def test_registry_runs_methods_through_the_one_lifecycle():
    from medgpt import registry
    from medgpt.stages.lifecycle import run_stage

    stage = registry.get("sft")
    assert isinstance(stage, functools.partial) and stage.func is run_stage and stage.args == (methods()["sft"],)
    assert registry.get("merge").__name__ == "merge_mode"  # modes are plain functions


@pytest.mark.parametrize("method,data,suggested", [("sft", "dpo_demo", "method=dpo"), ("dpo", "medical_demo", "method=sft"),
                                                   ("pt", "medical_demo", "method=sft")])
def test_data_the_method_cannot_train_on_is_refused_by_its_declaration(method, data, suggested):
    from medgpt.stages.lifecycle import check_data_format

    cfg = compose([f"method={method}", f"data={data}", "model=tiny", f"paths.root={ROOT}"])
    with pytest.raises(DataError, match=f"method={method} needs .* data; use {suggested}"):
        check_data_format(cfg, methods()[method])


def test_a_new_method_is_one_declaration(monkeypatch):
    """What a new method module does (register_stage) is all the config store, validation and the pipeline need."""

    @dataclasses.dataclass
    class ToyConfig(MethodConfig):
        toy_knob: float = 1.0

    toy = Stage(name="toy", schema=ToyConfig, formats=("preference",), build_data=lambda ctx: None)
    monkeypatch.setitem(protocol._STAGES, "toy", toy)
    assert register_stage(toy) is toy and methods()["toy"] is toy
    assert method_schema("toy") is ToyConfig
    from medgpt.config import register_configs

    register_configs()  # the schema is stored for conf/method/toy.yaml to start from
    from hydra.core.config_store import ConfigStore

    assert ConfigStore.instance().load("method/toy_schema.yaml").node.toy_knob == 1.0


def test_method_modules_import_no_torch():
    import subprocess
    import sys

    code = "import sys; from medgpt.stages.protocol import methods; methods(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-500:]
