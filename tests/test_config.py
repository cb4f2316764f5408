import pytest
import yaml

from lowmem.config import (RunConfig, all_keys, find_preset, list_presets, load_config, parse_size,
                           read_yaml_layer)
from lowmem.errors import ConfigError


@pytest.mark.parametrize("text, expected", [
    ("24G", 24 * 2**30), ("24GB", 24 * 2**30), ("24GiB", 24 * 2**30), ("24gib", 24 * 2**30),
    ("500M", 500 * 2**20), ("0.5T", 2**39), ("1048576", 2**20), (" 12 G ", 12 * 2**30), ("1M", 2**20),
])
def test_sizes_accept_the_usual_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24X", "G", "", "-3G", "24 GiBs", "24B", "24KB", "1048575"])
def test_sizes_reject_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_vram_is_stored_in_bytes():
    assert load_config(overrides=["vram=12GB"]).vram == 12 * 2**30


def test_preset_then_flags_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 10\nlr: 1.0e-4\nlora:\n  rank: 4\n")
    config = load_config(str(preset), {"steps": 20, "lora.rank": 8}, ["lora.rank=32", "lr=3e-4"])
    assert (config.steps, config.lora.rank, config.lr) == (20, 32, 3e-4)
    assert load_config(str(preset)).steps == 10


def test_unknown_yaml_key_names_the_file_the_line_and_the_fix(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 10\nlora:\n  rnak: 4\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: line 3: unknown key 'lora\.rnak' \(did you mean 'lora\.rank'\?\)"):
        load_config(str(preset))


def test_bad_yaml_names_the_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 10\nlr: [1,\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: line \d+, column \d+: bad YAML"):
        load_config(str(preset))


@pytest.mark.parametrize("override, message", [
    ("steps=ten", "expected a whole number"),
    ("steps=0", "below the minimum 1"),
    ("lora.dropout=1.5", "above the maximum"),
    ("method=magic", "expected one of"),
    ("grad_checkpointing=maybe", "expected true or false"),
    ("adam_betas=0.9", r"expected two numbers in \[0, 1\), got \(0.9,\)"),
    ("adam_betas=x", "a list of numbers"),
    ("adam_betas=0.9,1.5", "two numbers in"),
    ("lr", "expected key=value"),
    ("lr=0", "key 'lr': expected a number above 0, got 0"),
    ("lr=.inf", "key 'lr': expected a finite number, got inf"),
    ("lr=nan", "key 'lr': expected a finite number, got nan"),
    ("max_grad_norm=.nan", "expected a finite number"),
    ("adam_betas=0.9,nan", "a list of finite numbers"),
    ("lora.alpha=0", "key 'lora.alpha': expected a number above 0"),
    ("galore.scale=0", "expected a number above 0"),
    ("model=", "key 'model' is empty: expected a model"),
    ("data=", "key 'data' is empty: expected training data"),
    ("lora=4", r"'lora' is a section, not a value: set its keys, as lora.rank=…"),
    ("steps=4 warmup_steps=9", "warmup_steps': 9 warmup steps in a run of 4 steps: .* give at most 4"),
    ("seed=18446744073709551616", "key 'seed': 18446744073709551616 is above the maximum 9223372036854775807"),
    ("loram.layer_ratios=0,1.0", r"key 'loram.layer_ratios': expected prune ratios from 0 to 0.95, as loram.ratio"),
    ("loram.layer_ratios=0.5,0.99", r"expected prune ratios from 0 to 0.95"),
    ("loram.layer_ratios=-0.5", r"expected prune ratios from 0 to 0.95"),
    ("lora.targets=model.layers.0.self_attn.q_proj", "'model.layers.0.self_attn.q_proj' names one block's "
                                                     r"projection; .* give its name \(q_proj\)"),
    ("steps=1:30", "key 'steps': expected a whole number, got '1:30'"),
    ("name=a/b", r"override 'name=a/b': key 'name': expected a folder name \(no / .*got 'a/b'"),
    ("name=..", "key 'name': expected a folder name"),
    ("runs_dir=", r"key 'runs_dir' is empty: expected the folder that holds run directories \(default: runs"),
])
def test_bad_values_are_refused_with_the_key_and_what_was_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override.split(" "))


def test_missing_preset_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_every_shipped_preset_is_valid():
    presets = list_presets()
    assert "demo-cpu" in presets
    for name in presets:
        try:
            assert isinstance(load_config(name), RunConfig)
        except ConfigError as e:       # a preset for your own model asks for it
            assert "chat-lora-cuda.yaml: line 3: this preset leaves 'model' for you to give: a model" in str(e) \
                and name == "chat-lora-cuda", (name, e)
            assert load_config(name, {"model": "./my-llama"}).model == "./my-llama"


def test_defaults_are_the_demo_preset():
    """`lowmem train` with no options and `--preset demo-cpu` run the same job."""
    assert load_config("demo-cpu") == RunConfig()


def test_yaml_layer_records_lines():
    values, origins = read_yaml_layer("a: 1\nlora:\n  rank: 4\n", "x.yaml")
    assert values == {"a": 1, "lora.rank": 4}
    assert origins["lora.rank"] == "x.yaml: line 3: "


def test_every_key_is_a_flag():
    from lowmem.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for key in all_keys():
        assert "--" + key.replace(".", "-").replace("_", "-") in help_text


@pytest.mark.parametrize("targets", ["q_proj,lm_head", "[embed_tokens]", "q_proj,qproj"])
def test_lora_targets_must_be_block_projections(targets):
    with pytest.raises(ConfigError, match=r"key 'lora.targets': '(lm_head|embed_tokens|qproj)' is not a block "
                                          r"projection; adapters go on q_proj, k_proj"):
        load_config(overrides=[f"lora.targets={targets}"])



def test_a_dotted_target_is_its_projection_which_the_plan_counts():
    """`self_attn.q_proj` was kept as written: the plan counted no adapter for it (0 B), then
    training matched the projection and trained one."""
    from lowmem import memory
    from lowmem.planner import plan_from_config
    from lowmem.spec import builtin_spec

    dotted = load_config(overrides=["lora.targets=self_attn.q_proj,mlp.down_proj,q_proj", "device=cpu"])
    assert dotted.lora.targets == ("q_proj", "down_proj")
    plain = load_config(overrides=["lora.targets=q_proj,down_proj", "device=cpu"])
    spec = builtin_spec("smollm2-135m")
    assert memory.adapter_bytes(spec, plan_from_config(dotted)) == memory.adapter_bytes(spec, plan_from_config(plain)) > 0


def test_an_empty_yaml_value_is_null_and_an_empty_section_is_nothing(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("eval_data:\nname: ~\nlora:\nsteps: 7\n")
    config = load_config(str(preset))
    assert config.eval_data == RunConfig().eval_data and config.steps == 7
    assert config.lora == RunConfig().lora


def test_a_preset_that_is_not_utf8_or_is_a_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "p.yaml").write_bytes("steps: 3\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="p.yaml: not UTF-8 text"):
        load_config(str(tmp_path / "p.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_a_size_without_a_unit_is_refused_where_it_would_be_a_few_bytes():
    with pytest.raises(ValueError, match=r"'24' has no unit: did you mean 24G\? sizes are like 24G .*a memory budget is 1M or more"):
        parse_size("24")
    with pytest.raises(ValueError, match="'24' has no unit"):
        parse_size(24)                                  # `vram: 24` in a preset
    assert parse_size("24G") == 24 * 2**30 and parse_size("1048576") == 2**20 and parse_size(2**20) == 2**20
    with pytest.raises(ValueError, match=r"'24B' is 24B: did you mean 24G\? .*a memory budget is 1M or more"):
        parse_size("24B")


def test_a_key_given_twice_in_a_preset_is_refused_with_both_lines(tmp_path):
    (tmp_path / "p.yaml").write_text("steps: 3\nlora:\n  rank: 4\nsteps: 4\n")
    with pytest.raises(ConfigError, match=r"p.yaml: line 4: 'steps' is given twice \(also on line 1\)"):
        load_config(str(tmp_path / "p.yaml"))


def test_unset_lr_and_warmup_follow_the_method_and_the_steps():
    """A LoRA learning rate on a full fine-tune made the smoke run's loss rise (2.79 -> 5.02)."""
    assert load_config(overrides=["method=full"]).lr == 5e-5
    assert load_config(overrides=["method=galore"]).lr == 2e-4
    assert load_config(overrides=["method=qlora"]).lr == 2e-3
    assert load_config(overrides=["method=full", "lr=1e-4"]).lr == 1e-4      # a set lr stays
    assert load_config(overrides=["steps=4"]).warmup_steps == 0              # was 5: never at peak
    assert load_config(overrides=["steps=30"]).warmup_steps == 3
    assert load_config(overrides=["steps=500"]).warmup_steps == 5
    assert load_config(overrides=["steps=4", "warmup_steps=4"]).warmup_steps == 4


def test_yaml_tags_text_keys_and_duplicates_across_forms(tmp_path):
    preset = tmp_path / "p.yaml"
    for text, message in (("steps: !!int abc\n", r"line 1: 'steps': cannot read the value int 'abc'"),
                          ("model: !env HOME\n", r"line 1: 'model': cannot read the value !env 'HOME'"),
                          ("lr: !!float\n", r"line 1: 'lr': cannot read the value float '' \(there is no value"),
                          ("lora.rank: 8\nlora:\n  rank: 4\n", r"line 3: 'lora.rank' is given twice \(also on line 1\)"),
                          ("lora: 8\n", r"line 1: 'lora' is a section, not a value")):
        preset.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(preset))
    preset.write_text("name: 007\ndata: on\nmodel: !!str 1.10\n")
    config = load_config(str(preset), overrides=["eval_data=1.10"])
    assert (config.name, config.data, config.model, config.eval_data) == ("007", "on", "1.10", "1.10")
    assert load_config(overrides=["name=007"]).name == "007"


@pytest.mark.parametrize("text", ["none", "NONE", "auto", ""])
def test_a_size_key_takes_none_for_no_budget(text):
    assert load_config(overrides=[f"vram={text}", f"host_ram={text}"]).vram is None


def test_null_clears_a_text_key_and_quotes_are_not_part_of_it(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("eval_data: null\nname: ~\nmodel: ./m\n")
    config = load_config(str(preset))
    assert (config.eval_data, config.name, config.model) == ("", "", "./m")
    config = load_config(overrides=["eval_data=null", 'name="my run"', "model='./m'"])
    assert (config.eval_data, config.name, config.model) == ("", "my run", "./m")


def test_a_resume_keeps_its_schedule_even_when_steps_shrink_below_warmup(tmp_path):
    """A run's config.yaml is its schedule: resuming it with fewer steps is not refused for
    its warmup (the check is for new configs)."""
    from lowmem.trainer import resumed_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(RunConfig(steps=100, warmup_steps=20).to_dict()))
    assert resumed_config(run, {"steps": 4}).warmup_steps == 20
    (run / "config.yaml").write_text(yaml.safe_dump(RunConfig(steps=3, warmup_steps=5).to_dict()))
    assert resumed_config(run, {}).steps == 3          # written before the check existed



def test_a_presets_lr_and_warmup_give_way_to_a_method_and_steps_given_after_it(tmp_path):
    """demo-cpu's lr 2e-3 is LoRA's: `--preset demo-cpu --method full` trained every weight at it,
    and `--steps 3` was refused for the preset's 5 warmup steps. The note says what happened."""
    said = []
    full = load_config("demo-cpu", overrides=["method=full"], note=said.append)
    assert full.lr == 5e-5 and full.method == "full"
    assert said == ["lr 5e-05: the default for full; the lr 0.002 given (" + str(find_preset("demo-cpu"))
                    + ": line 9) is for lora (set lr to choose)"]
    said.clear()
    assert load_config("demo-cpu", overrides=["method=qlora"], note=said.append).lr == 2e-3   # LoRA's, still
    assert load_config("demo-cpu", overrides=["method=full", "lr=1e-4"], note=said.append).lr == 1e-4
    short = load_config("demo-cpu", overrides=["steps=3"], note=said.append)
    assert short.warmup_steps == 0 and short.steps == 3
    assert said == [f"warmup_steps 0: the 5 given ({find_preset('demo-cpu')}: line 10) are more than steps=3"]
    (tmp_path / "p.yaml").write_text("method: full\nlr: 1.0e-3\n")     # given together: kept
    assert load_config(str(tmp_path / "p.yaml"), overrides=["steps=9"]).lr == 1e-3
    with pytest.raises(ConfigError, match="9 warmup steps in a run of 3"):   # given after the steps
        load_config("demo-cpu", overrides=["steps=3", "warmup_steps=9"])
    # The user's own lr and warmup stand: only a preset's give way.
    assert load_config(flags={"lr": 1e-4}, overrides=["method=full"], note=said.append).lr == 1e-4
    with pytest.raises(ConfigError, match="4 warmup steps in a run of 3"):
        load_config(flags={"warmup_steps": 4}, overrides=["steps=3"])
    assert len(said) == 1


def test_numbers_read_as_typed_not_as_yaml_1_1_octal_or_base_60(tmp_path):
    assert load_config(overrides=["steps=010"]).steps == 10      # YAML 1.1: 8
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 010\nsave_every: 0x10\nlr: 1.5e-3\nname: 010\n")
    config = load_config(str(preset))
    assert (config.steps, config.save_every, config.lr, config.name) == (10, 16, 1.5e-3, "010")
    preset.write_text("steps: 20\nwarmup_steps: 1:30\n")
    with pytest.raises(ConfigError, match=r"p.yaml: line 2: 'warmup_steps': cannot read .*base 60 .*\(90\); "
                                          r"write the number itself"):
        load_config(str(preset))


def test_layer_ratios_are_cleared_as_the_help_says(tmp_path):
    assert load_config(overrides=["loram.layer_ratios=0.1,0.2"]).loram.layer_ratios == (0.1, 0.2)
    assert load_config(overrides=["loram.layer_ratios="]).loram.layer_ratios == ()
    (tmp_path / "p.yaml").write_text("loram:\n  layer_ratios:\n")
    assert load_config(str(tmp_path / "p.yaml"), overrides=[]).loram.layer_ratios == ()


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    assert load_config("smoke").steps == 4
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="mine is a directory; expected a preset YAML file"):
        load_config("mine")


def test_the_same_key_twice_on_the_command_line_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"override 'steps=6': steps is given twice \('steps=5' before it\)"):
        load_config(overrides=["steps=5", "steps=6"])


def test_a_tab_in_a_preset_is_located_and_explained(tmp_path):
    (tmp_path / "tab.yaml").write_text("steps: 3\nlora:\n\trank: 4\n")
    with pytest.raises(ConfigError, match=r"tab.yaml: line 3, column 1: bad YAML: .*'\\t'.*indents with spaces"):
        load_config(str(tmp_path / "tab.yaml"))


def test_names_and_switches_are_read_as_people_type_them():
    assert load_config("DEMO-CPU") == load_config("demo-cpu")
    config = load_config(overrides=["method=LoRA", "schedule=Linear", "grad_checkpointing=1", "packing=0"])
    assert (config.method, config.schedule, config.grad_checkpointing, config.packing) == ("lora", "linear", True, False)
    with pytest.raises(ConfigError, match="key 'grad_checkpointing': expected true or false, got 2"):
        load_config(overrides=["grad_checkpointing=2"])


def test_sizes_are_written_as_typed_and_read_back_the_same():
    config = load_config(overrides=["vram=24G", "host_ram=1536M"])
    plain = config.to_dict()
    assert (plain["vram"], plain["host_ram"]) == ("24G", "1536M")
    assert load_config(overrides=[f"vram={plain['vram']}", f"host_ram={plain['host_ram']}"]) == config
    odd = config.replace(vram=24 * 2**30 + 1).to_dict()["vram"]
    assert odd == 24 * 2**30 + 1 and load_config(overrides=[f"vram={odd}"]).vram == odd
    assert RunConfig().to_dict()["vram"] is None
