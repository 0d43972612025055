"""Config resolution: recipes resolve, overrides are typed, unknown keys list the valid ones."""

import logging

import pytest
import torch
from torch import nn

from selfsup.backbones import create_backbone
from selfsup.config import apply_overrides, load_config, load_recipe, recipe_names, resolve

BASE = {
    "method": {"name": "simclr"},
    "backbone": {"name": "resnet18", "stem": "small", "width": 0.125},
    "data": {"name": "synthetic"},
    "views": {"name": "none"},
}


def test_every_recipe_resolves():
    assert recipe_names(), "no recipes found"
    for name in recipe_names():
        config = load_config(name)
        assert config.method["name"] and config.optim.batch_size > 0


def test_overrides_are_yaml_parsed_and_typed():
    overrides = ["optim.lr=0.1", "train.epochs=2", "optim.clip=1", "optim.weight_decay=5e-4"]
    config = resolve(apply_overrides(BASE, overrides))
    assert config.optim.weight_decay == 5e-4  # YAML reads "5e-4" as a string
    assert config.optim.lr == 0.1 and config.train.epochs == 2.0 and config.optim.clip == 1.0
    assert isinstance(config.train.epochs, float)


def test_unknown_dataclass_key_names_the_close_match_and_the_valid_keys():
    with pytest.raises(ValueError) as error:
        resolve(apply_overrides(BASE, ["optim.learning_rate=0.1"]))
    message = str(error.value)
    assert "optim.learning_rate" in message and "did you mean 'lr'" in message
    assert "batch_size" in message and "weight_decay" in message


def test_unknown_registry_key_lists_the_constructor_parameters():
    with pytest.raises(ValueError) as error:
        resolve(apply_overrides(BASE, ["method.temprature=0.1"]))
    message = str(error.value)
    assert "method.temprature" in message and "did you mean 'temperature'" in message
    assert "dim=128" in message


def test_unknown_names_and_sections_suggest_valid_ones():
    with pytest.raises(ValueError, match="did you mean 'simclr'"):
        resolve({**BASE, "method": {"name": "simclrr"}})
    with pytest.raises(ValueError, match="did you mean 'optim'"):
        apply_overrides(BASE, ["optimizer.lr=0.1"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(BASE, ["lr=0.1"])


def test_wrong_types_are_rejected_with_the_key():
    with pytest.raises(ValueError, match="'optim.batch_size' expects int"):
        resolve(apply_overrides(BASE, ["optim.batch_size=big"]))
    with pytest.raises(ValueError, match="'train.channels_last' expects true or false"):
        resolve(apply_overrides(BASE, ["train.channels_last=3"]))


def test_registry_values_are_typed_from_the_constructor_signature():
    config = resolve(apply_overrides(BASE, ["method.temperature=5e-1", "method.dim=64"]))
    assert config.method["temperature"] == 0.5 and config.method["dim"] == 64
    with pytest.raises(ValueError, match="'method.dim' expects int"):
        resolve(apply_overrides(BASE, ["method.dim=wide"]))


def test_list_values_of_registry_entries_are_typed_when_the_config_is_read():
    # views.scale is Sequence[float], blur_p float | Sequence[float]: a number where a list is
    # wanted (or a word in the list) fails here, naming the key, not where the views are built
    views = {"views": {"name": "byol", "size": 20}}
    config = resolve({**BASE, **views, "views": {**views["views"], "scale": [0.2, 1]}})
    assert config.views["scale"] == [0.2, 1.0]
    with pytest.raises(ValueError, match="'views.scale' expects a list of float, got 0"):
        resolve(apply_overrides({**BASE, **views}, ["views.scale=0"]))
    with pytest.raises(
        ValueError, match=r"'views.scale' expects a list of float, got \[0.2, 'x'\]"
    ):
        resolve(apply_overrides({**BASE, **views}, ["views.scale=[0.2,x]"]))
    with pytest.raises(ValueError, match=r"'views.blur_p' expects a list of float"):
        resolve(apply_overrides({**BASE, **views}, ["views.blur_p=[0.5,x]"]))
    with pytest.raises(ValueError, match="'views.blur_p' expects float, got 'x'"):
        resolve(apply_overrides({**BASE, **views}, ["views.blur_p=x"]))
    assert resolve(apply_overrides({**BASE, **views}, ["views.blur_p=[1,0.1]"])).views[
        "blur_p"
    ] == [
        1.0,
        0.1,
    ]


def test_engine_supplied_parameters_cannot_be_set_by_a_recipe():
    with pytest.raises(ValueError, match="set by the engine"):
        resolve({**BASE, "data": {"name": "synthetic", "split": "test"}})


def test_resolved_config_round_trips_through_its_dict():
    config = resolve(BASE)
    assert resolve(config.to_dict()) == config


def test_missing_recipe_lists_the_recipes():
    with pytest.raises(FileNotFoundError, match="simclr/fashion_mnist"):
        load_config("simclr/fashion_mnits")


def test_linear_weight_decay_is_one_value_or_a_list_of_candidates():
    assert load_config("simclr/fashion_mnist").eval.linear_weight_decay == (
        1e-2, 1e-3, 1e-4, 1e-5, 1e-6,
    )  # fmt: skip
    fixed = load_config("simclr/fashion_mnist", ["eval.linear_weight_decay=1e-3"])
    assert fixed.eval.linear_weight_decay == 1e-3
    listed = load_config("simclr/fashion_mnist", ["eval.linear_weight_decay=[1e-3, 1e-4]"])
    assert listed.eval.linear_weight_decay == (1e-3, 1e-4)
    with pytest.raises(ValueError, match="eval.linear_weight_decay"):
        load_config("simclr/fashion_mnist", ["eval.linear_weight_decay=strong"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.batch_size=0", "'optim.batch_size' must be > 0, got 0"),
        ("optim.batch_size=-4", "'optim.batch_size' must be > 0, got -4"),
        ("train.epochs=-3", "'train.epochs' must be > 0"),
        ("optim.momentum=1.5", "'optim.momentum' must be in \\[0, 1\\)"),
        ("eval.linear_weight_decay=[0.1, -1]", "'eval.linear_weight_decay' must be >= 0"),
        ("train.budget_minutes=0", "'train.budget_minutes' must be > 0"),
    ],
)
def test_out_of_range_settings_fail_when_the_config_is_read(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("simclr/fashion_mnist", [override])


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_a_zero_temperature_fails_where_the_method_is_built(method):
    from selfsup.registry import METHODS

    with pytest.raises(ValueError, match="'method.temperature' must be > 0, got 0"):
        METHODS.build({"name": method, "temperature": 0}, backbone=nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("method", "key", "value", "message"),
    [
        ("unigrad", "correlation_momentum", 1,
         r"'method.correlation_momentum' must be in \[0, 1\)"),
        ("unigrad", "balance", 0, "'method.balance' must be > 0, got 0"),
        ("cmc", "num_negatives", 0, "'method.num_negatives' must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_a_method_parameter_has_one_limit_when_read_and_where_built(method, key, value, message):
    from selfsup.registry import METHODS

    with pytest.raises(ValueError, match=message):
        load_config(f"{method}/fashion_mnist", [f"method.{key}={value}"])
    supplied = {"backbone": nn.Linear(2, 2), "make_backbone": None, "num_samples": 10}
    with pytest.raises(ValueError, match=message):
        METHODS.build({"name": method, key: value}, **supplied)


def test_a_stricter_limit_of_one_method_is_stated_where_it_is_built():
    from selfsup.registry import METHODS

    # queue_size 0 is valid by name (SimCLR, SwAV: no queue), but MoCo's queue is its dictionary
    assert load_config("simclr/fashion_mnist", ["method.queue_size=0"]).method["queue_size"] == 0
    config = load_config("moco_v2/fashion_mnist", ["method.queue_size=0"])
    with pytest.raises(ValueError, match="'method.queue_size' must be >= 1, got 0"):
        METHODS.build(config.method, backbone=nn.Linear(2, 2))


def test_a_dotted_override_sets_one_field_of_a_parameter_group():
    raw = load_recipe("simsiam/fashion_mnist")
    config = resolve(
        apply_overrides(
            raw, ["optim.groups.backbone.layer4.lr=0.01", "optim.groups.predictor.frozen_epochs=1"]
        )
    )
    assert config.optim.groups["backbone.layer4"].lr == 0.01
    assert config.optim.groups["predictor"].frozen_epochs == 1
    assert "groups" not in raw["optim"]  # the recipe's own dict is left as it was


@pytest.mark.parametrize("key", ["train.epochs", "train.budget_minutes"])
def test_an_endless_training_length_is_refused_when_the_config_is_read(key):
    with pytest.raises(ValueError, match=f"'{key}' must be > 0 and finite, got inf"):
        load_config("simclr/fashion_mnist", [f"{key}=.inf"])


def test_a_backbone_name_override_replaces_the_section_and_says_what_it_dropped(caplog):
    caplog.set_level(logging.INFO, logger="selfsup.config")
    # the ResNet keys of the recipe (stem, width) would be unknown to a ViT
    vit = load_config("simclr/fashion_mnist", ["backbone.patch_size=4", "backbone.name=vit_tiny"])
    assert vit.backbone == {"name": "vit_tiny", "patch_size": 4}  # in either order
    assert "dropped: backbone.stem=small, backbone.width=" in caplog.text
    model = create_backbone(**vit.backbone, in_channels=1, image_size=28)
    assert model(torch.zeros(2, 1, 28, 28)).shape[0] == 2
    # the same name keeps the section; another method starts from its own defaults
    same = load_config("simclr/fashion_mnist", ["backbone.name=resnet18", "backbone.width=0.5"])
    assert same.backbone == {"name": "resnet18", "stem": "small", "width": 0.5}
    assert load_config("simclr/fashion_mnist", ["method.name=byol"]).method == {"name": "byol"}


def test_small_views_are_refused_for_a_method_that_does_not_train_on_them():
    multi_crop = ["views.name=dino", "views.size=16", "views.small_size=8"]
    with pytest.raises(ValueError) as error:
        load_config("simclr/fashion_mnist", multi_crop)
    message = str(error.value)
    assert "views.name=dino makes 8 small views per image" in message
    assert "method 'simclr'" in message and "views.num_small=0" in message
    for taker in ("barlow_twins", "dino", "emp_ssl", "swav"):  # the methods that use them
        assert taker in message
    assert load_config("simclr/fashion_mnist", [*multi_crop, "views.num_small=0"]).views
    assert load_config("barlow_twins/fashion_mnist", multi_crop).views["name"] == "dino"


def test_lars_clip_is_refused_for_an_optimiser_other_than_lars():
    with pytest.raises(ValueError, match="optim.lars_clip=true .* optim.name=sgd has none"):
        load_config("simsiam/fashion_mnist", ["optim.lars_clip=true"])
    assert load_config("barlow_twins/fashion_mnist", ["optim.lars_clip=true"]).optim.lars_clip


@pytest.mark.parametrize(
    "key, value, close",
    [
        ("optim.name", "lasr", "lars"),
        ("optim.schedule", "cosin", "cosine"),
        ("optim.lr_scaling", "linaer", "linear"),
        ("train.precision", "fp61", "fp16"),
    ],
)
def test_a_setting_with_fixed_values_is_checked_when_the_config_is_read(key, value, close):
    with pytest.raises(
        ValueError, match=f"unknown {key} '{value}' \\(did you mean '{close}'\\?\\)"
    ):
        load_config("simclr/fashion_mnist", [f"{key}={value}"])
