import pytest

from pipeline.config import ConfigError, load_config

BASE = {"input": {"paths": ["x/*.tar"]}, "model": {"target": "models/target"}, "output": {"path": "out"}}


def test_demo_config_is_valid():
    cfg = load_config("configs/demo.yaml")
    cfg.check_job()
    assert cfg.task.kind == "vqa" and cfg.model.target == "models/target"


def test_defaults_fill_the_prompt_from_the_task_kind():
    cfg = load_config({**BASE, "task": {"kind": "ocr"}})
    assert cfg.task.prompt == "What does the text say?"


@pytest.mark.parametrize("raw, field", [
    ({**BASE, "bogus": 1}, "bogus"),
    ({**BASE, "decoding": {"max_new_tokens": 0}}, "decoding.max_new_tokens"),
    ({**BASE, "decoding": {"num_draft_tokens": "sometimes"}}, "decoding.num_draft_tokens"),
    ({**BASE, "decoding": {"num_draft_tokens": 99}}, "decoding.num_draft_tokens"),
    ({**BASE, "input": {"paths": ["a"], "format": "zip"}}, "input.format"),
    ({**BASE, "task": {"kind": "custom"}}, "task.prompt"),
    ({**BASE, "resources": {"num_actors": 0}}, "resources.num_actors"),
    ({**BASE, "model": {"target": "m", "drafter": "d"}, "decoding": {"backend": "hf"}}, "model.drafter"),
    ({**BASE, "decoding": {"max_batch_size": 0}}, "decoding.max_batch_size"),
    ({**BASE, "decoding": {"kv_cache_gb": -1}}, "decoding.kv_cache_gb"),
    ({**BASE, "decoding": {"dtype": "int3"}}, "decoding.dtype"),
    ({**BASE, "decoding": {"compile": "sometimes"}}, "decoding.compile"),
    ({**BASE, "decoding": {"compile": "on", "decoder": "hf"}}, "decoding.compile"),
    ({"input": {"paths": ["a"]}, "output": {"path": "o"}}, "model"),
    ({**BASE, "compression": {"visual_tokens": {"keep": 0.5, "tower_layer": -1}}},
     "compression.visual_tokens.tower_layer"),
    ({**BASE, "compression": {"visual_tokens": {"keep": 0.5, "tower_layer": 1}}}, "compression.visual_tokens.method"),
    ({**BASE, "compression": {"visual_tokens": {"keep": 0.5, "method": "spread"}}}, "compression.visual_tokens.method"),
    ({**BASE, "compression": {"visual_tokens": {"keep": 0.5, "tower_layer": 1, "method": "diversity", "merge": True}}},
     "compression.visual_tokens.merge"),
])
def test_bad_config_names_the_field_in_one_line(raw, field):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(field), msg


def test_overrides_take_yaml_values():
    cfg = load_config(BASE, ["decoding.max_new_tokens=7", "input.paths=[a.tar, b.tar]", "decoding.temperature=0.5",
                             "decoding.kv_cache_gb=2.5", "decoding.compile=on"])
    assert cfg.decoding.max_new_tokens == 7 and cfg.engine().kv_cache_gb == 2.5 and cfg.engine().compile == "on"
    assert cfg.input.paths == ["a.tar", "b.tar"]
    assert cfg.decoding.temperature == 0.5


def test_job_fields_are_required_for_a_job_only():
    cfg = load_config({"model": {"target": "m"}})  # enough for pipeline.generate(ds, ...)
    with pytest.raises(ConfigError, match="^input.paths"):
        cfg.check_job()


def test_config_hash_follows_the_content():
    assert load_config(BASE).hash() == load_config(BASE).hash()
    assert load_config(BASE).hash() != load_config(BASE, ["decoding.seed=1"]).hash()
