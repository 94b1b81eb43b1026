"""The Prefect flow ``train-model`` and its deployment: a thin wrapper over ``training``.

Evaluation is a command (``dereverb evaluate``), not a flow: nothing serves or schedules it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.types.entrypoint import EntrypointType

from training.config import load_train_config


@flow(name="train-model", log_prints=True)
def train_model(
    data_url: str,
    out_dir: str,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Train (or resume) a model on a store; publish the final validation metrics."""
    from training.train import train

    logger = get_run_logger()
    config = load_train_config(config_path, overrides)
    logger.info(
        "training %s on %s for %d steps into %s", config.model, data_url, config.steps, out_dir
    )
    metrics = train(config, data_url, out_dir)
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in sorted(metrics.items())
    )
    create_markdown_artifact(
        key="training-run",
        markdown=f"# Training run: {config.model}\n\nData `{data_url}`, run folder `{out_dir}`.\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n",
        description=f"Training of {config.model}",
    )
    return metrics


def train_deployment(data_url: str, out_dir: str, config_path: str | None, cron: str | None = None):
    """A ``train-model`` deployment (no schedule unless ``cron``): ``prefect deployment run
    train-model/train`` retrains on the latest store, resuming an unfinished run."""
    if config_path and "://" not in config_path:
        config_path = str(Path(config_path).resolve())
    return train_model.to_deployment(
        name="train",
        cron=cron,
        parameters={"data_url": data_url, "out_dir": out_dir, "config_path": config_path},
        description=f"Train on {data_url} into {out_dir}",
        tags=["dereverb"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
