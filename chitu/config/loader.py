"""Composing the configuration: the Hydra compose API for library use, `hydra.main` for scripts."""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from chitu.config.key_help import format_key_help
from chitu.errors import UserError
from chitu.config.schema import ChituConfig, ConfigError, config_keys, unknown_key_message, validate_config

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_NAME = "serve_config"
logger = logging.getLogger(__name__)


def config_location() -> tuple[str, str]:
    """(directory, name) of the config file: `CONFIG_PATH` / `CONFIG_NAME` env, else serve_config.yaml."""
    directory = os.environ.get("CONFIG_PATH", str(CONFIG_DIR))
    name = os.environ.get("CONFIG_NAME", DEFAULT_CONFIG_NAME)
    name = name.removesuffix(".yaml")
    if not (Path(directory) / f"{name}.yaml").is_file():
        raise ConfigError(f"CONFIG_NAME={name}: no file {name}.yaml in {directory}")
    if Path(directory).resolve() == CONFIG_DIR / "models":
        raise ConfigError("chitu/config/models/*.yaml are model fragments, not whole configs: select them with models=<name>")
    return os.path.abspath(directory), name


def search_path_override(directory: str) -> list[str]:
    """A config outside the package can still use serve_config and models/ from the package."""
    return [] if Path(directory) == CONFIG_DIR else [f"hydra.searchpath=[file://{CONFIG_DIR}]"]


def model_name_case_insensitive(arg: str) -> str:
    """`models=deepseek-r1` → `models=DeepSeek-R1`: a model is named as in chitu/config/models/, whatever
    the case (as the benchmark's --model is)."""
    key, sep, value = arg.partition("=")
    if key != "models" or not sep or (CONFIG_DIR / "models" / f"{value}.yaml").is_file():
        return arg
    matches = [p.stem for p in (CONFIG_DIR / "models").glob("*.yaml") if p.stem.lower() == value.lower()]
    return f"models={matches[0]}" if len(matches) == 1 else arg


# Keys the manual adds with `+key=value` (serve_config.yaml leaves them out); `key=value` is taken too.
APPENDED_KEYS = ("cpu_layer_num",)


def normalize_override(arg: str) -> str:
    """A model named in any case, and `cpu_layer_num=58` taken as the manual's `+cpu_layer_num=58`."""
    arg = model_name_case_insensitive(arg)
    return f"+{arg}" if arg.partition("=")[0] in APPENDED_KEYS else arg


# Config groups: `models=<name>` picks a file, it sets no key.
CONFIG_GROUPS = ("models",)


def check_override_keys(overrides: Sequence[str]) -> None:
    """An override of a key the schema lacks stops with "did you mean …", before Hydra answers it with
    a "+key" hint that would then fail as an unknown key. Appends (`+key`) are checked by the schema."""
    parser, known = OverridesParser.create(), set(config_keys())
    for arg in overrides:
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # not an override (a flag's value) or a malformed one: Hydra's own message says where
        key = override.key_or_group
        if (override.is_add() or override.is_delete() or key in CONFIG_GROUPS or key.startswith("hydra.")
                or key == "hydra" or key in known or any(k.startswith(f"{key}.") for k in known)):
            continue
        raise ConfigError(unknown_key_message(key))


def compose_config(overrides: Sequence[str] = ()) -> ChituConfig:
    """The validated configuration for `overrides` (Hydra override grammar)."""
    directory, name = config_location()
    overrides = [normalize_override(arg) for arg in overrides]
    check_override_keys(overrides)
    try:
        with initialize_config_dir(config_dir=directory, version_base=None):
            cfg = compose(config_name=name, overrides=overrides + search_path_override(directory))
    except HydraException as e:
        raise ConfigError(str(e)) from None
    return validate_config(cfg)


def hydra_entry(task: Callable[[ChituConfig], object]) -> Callable[[], object]:
    """Decorate a script's main: Hydra parses the command line, logs go to outputs/, the config is validated."""

    def main() -> object:
        try:
            directory, name = config_location()
        except ConfigError as e:
            sys.exit(f"config error: {e}")
        if {"--help", "-h"} & set(sys.argv[1:]):
            print_help(task, [arg for arg in sys.argv[1:] if arg not in ("--help", "-h")])
            sys.exit(0)
        secrets = [arg for arg in sys.argv[1:] if _is_secret_override(arg)]
        sys.argv = ([normalize_override(arg) for arg in sys.argv if arg not in secrets]
                    + search_path_override(directory))
        try:
            check_override_keys([arg for arg in sys.argv[1:] if not arg.startswith("-")])
        except ConfigError as e:
            sys.exit(f"config error: {e}")

        @hydra.main(config_path=directory, config_name=name, version_base=None)
        @functools.wraps(task)
        def run(cfg: DictConfig) -> object:
            try:
                _apply_secret_overrides(cfg, secrets)
                return task(validate_config(cfg))
            except UserError as e:
                logger.error("%s: %s", type(e).__name__, e)
                sys.exit(1)

        return run()

    return main


def print_help(task: Callable, overrides: list[str]) -> None:
    """What the script does and every key with its default (after `overrides`, e.g. models=<name>) and meaning."""
    try:
        defaults = compose_config(overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    script = Path(sys.argv[0]).name
    print(f"usage: {'python -m chitu' if script == '__main__.py' else script} [key=value ...]\n")
    print((sys.modules[task.__module__].__doc__ or "").strip() + "\n")
    print("Keys (Hydra overrides; defaults from serve_config.yaml and the chosen models=<name>):")
    print(format_key_help(defaults))
    print("\nmodels=<name> picks a fragment of chitu/config/models/ (any case); --hydra-help: Hydra's own flags.")


# API keys given on the command line are kept from Hydra, which would write them into outputs/ and
# print them with its errors; they are merged into the config afterwards, and the saved copy of the
# config (outputs/…/.hydra/config.yaml) shows them redacted.
SECRET_KEYS = ("serve.api_keys",)
REDACTED = "<redacted>"


def _is_secret_override(arg: str) -> bool:
    return any(arg.lstrip("+~").startswith(f"{key}=") for key in SECRET_KEYS)


def _apply_secret_overrides(cfg: DictConfig, secrets: list[str]) -> None:
    try:
        overrides = OverridesParser.create().parse_overrides(secrets)
    except HydraException as e:
        raise ConfigError(f"bad override of serve.api_keys: {e}") from None
    for override in overrides:
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False, force_add=True)
    saved = Path(HydraConfig.get().runtime.output_dir) / str(HydraConfig.get().output_subdir) / "config.yaml"
    if saved.is_file() and OmegaConf.select(cfg, "serve.api_keys"):
        redacted = cfg.copy()
        redacted.serve.api_keys = [REDACTED] * len(cfg.serve.api_keys)
        OmegaConf.save(redacted, saved)