"""The training job: `python -m flywheel_trainer.job --dataset ID --base-version VERSION [--job-id ID]`."""
